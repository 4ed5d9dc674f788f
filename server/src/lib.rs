//! muster-server as a library: `main.rs` parses the config and calls [`run`]; tests build an
//! [`app::Application`] directly.

pub mod admission;
pub mod alerts;
pub mod api;
pub mod app;
pub mod audit;
pub mod auth;
pub mod budget;
pub mod check;
pub mod config;
pub mod dev;
pub mod dispatch;
pub mod events;
pub mod fleet_events;
pub mod gateway;
pub mod health;
pub mod identity;
pub mod logging;
pub mod migrate_db;
pub mod output;
pub mod recorder;
pub mod registry;
pub mod runs;
pub mod scope;
pub mod shutdown;
pub mod store;
pub mod telemetry;
#[cfg(test)]
pub mod testing;
pub mod tls;
pub mod web;

pub use app::Application;
pub use config::{Cli, Command, Config};

use std::io::Write;

use anyhow::Context;
use shared::api::{CreateToken, Role};
use tokio_util::sync::CancellationToken;

/// Runs what the command line asked for.
pub async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    shutdown::cancel_on_signal(cancel.clone()).context("installing signal handlers")?;
    match (cli.command, cli.dev) {
        (Some(Command::Bootstrap { name }), _) => bootstrap(&config, &name).await,
        (Some(Command::MigrateDb { to, password_file }), _) => {
            let copied = migrate_db::run(&config, &to, password_file.as_deref()).await?;
            let mut out = std::io::stdout().lock();
            for (table, rows) in &copied {
                writeln!(out, "{table}: {rows} rows")?;
            }
            writeln!(out, "copied {} tables into {}", copied.len(), config::Database::postgres(&to, None)?.describe())?;
            Ok(())
        }
        (Some(Command::Check), _) => {
            let lines = check::run(&config).await.map_err(|problem| anyhow::anyhow!("check: {problem}"))?;
            let mut out = std::io::stdout().lock();
            for l in lines {
                writeln!(out, "ok: {l}")?;
            }
            Ok(())
        }
        (_, true) => dev::run(config, cancel).await,
        (None | Some(Command::Serve), false) => Application::build(config, cancel).await?.run().await,
    }
}

/// `muster-server bootstrap`: an admin token straight into the database, printed once.
async fn bootstrap(config: &Config, name: &str) -> anyhow::Result<()> {
    let store = app::open_store(config).await?;
    let req = CreateToken { name: name.to_owned(), role: Role::Admin, ttl_secs: None, scope: None };
    let (created, entry) = api::create_token_row(&*store, &req, "muster-server bootstrap").await.map_err(|e| anyhow::anyhow!("{e}"))?;
    // Beside a running server, through the database's own lock: one chain either way.
    store::audit_or_log(&*store, entry).await;
    store.close().await;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", created.token)?;
    let mut err = std::io::stderr().lock();
    writeln!(err, "Created admin token {:?} ({}). It is shown only this once; store it safely.", created.info.name, created.info.id)?;
    Ok(())
}
