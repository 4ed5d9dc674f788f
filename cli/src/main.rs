//! muster: the operator's command line. `main` maps the outcome to an exit status; `run`
//! does the work.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

mod args;
mod audit;
mod client;
mod commands;
mod keys;
mod output;
mod run;
mod sse;
mod watch;

use args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "muster: {e:#}");
    ExitCode::FAILURE
}

/// `muster agents | head` closing the pipe early is not an error.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// The operator token: given as a value, or read from a file or standard input.
fn token(conn: &args::Connection) -> anyhow::Result<String> {
    match (&conn.token, &conn.token_file) {
        (Some(t), _) => Ok(t.clone()),
        (None, Some(path)) if path.as_os_str() == shared::secret::STDIN => {
            shared::secret::read(std::io::stdin().lock()).context("the token on standard input")
        }
        (None, Some(path)) => {
            let file = std::fs::File::open(path).with_context(|| format!("token file {}", path.display()))?;
            shared::secret::read(file).with_context(|| format!("token file {}", path.display()))
        }
        (None, None) => anyhow::bail!("no token: set MUSTER_TOKEN or MUSTER_TOKEN_FILE, or pass --token-file PATH"),
    }
}

/// Ok(false): the command worked, but a job it reports on did not fully succeed.
async fn run(cli: Cli) -> anyhow::Result<bool> {
    // Keys are local: no server needed.
    if let Command::Key(k @ (args::KeyCommand::Generate { .. } | args::KeyCommand::Show)) = &cli.command {
        let stdout = std::io::stdout();
        return commands::key_local(&cli.conn, k, &mut stdout.lock()).map(|()| true);
    }
    let server = cli.conn.server.as_deref().context("no server: set MUSTER_SERVER or pass --server https://host:port")?;
    let token = token(&cli.conn)?;
    let client = client::Client::new(server, &token, cli.conn.ca.as_deref())?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let ok = match &cli.command {
        Command::Agents(a) => commands::agents(&client, a, &mut out).await.map(|()| true),
        Command::Agent(a) => commands::agent(&client, a, &mut out).await.map(|()| true),
        Command::Fleet { json } => commands::fleet(&client, *json, &mut out).await.map(|()| true),
        Command::EnrollToken(c) => commands::enroll_token(&client, &cli.conn, c, &mut out).await.map(|()| true),
        Command::Token(c) => commands::token(&client, c, &mut out).await.map(|()| true),
        Command::Whoami => commands::whoami(&client, &mut out).await.map(|()| true),
        Command::Run(r) => run::run(&client, r, signer(&cli.conn, r.no_sign)?.as_ref(), &mut out).await.map(|o| o.all_succeeded),
        Command::Key(args::KeyCommand::Revoke { key }) => {
            let signer = signer(&cli.conn, false)?.context("no signing key: a revocation is signed with one (--signing-key)")?;
            commands::key_revoke(&client, &signer, key, &mut out).await.map(|()| true)
        }
        Command::Key(_) => Ok(true),
        Command::Jobs { limit, json } => run::jobs(&client, *limit, *json, &mut out).await.map(|()| true),
        Command::Job(j) => run::job(&client, j, &mut out).await.map(|o| o.all_succeeded),
        Command::Watch { json } => watch::watch(&client, *json, &mut out).await.map(|()| true),
        Command::Audit(a) => audit::audit(&client, a, &mut out).await,
    }?;
    out.flush()?;
    Ok(ok)
}

/// The signing key for `muster run`: `--signing-key`, else the default file if it exists.
fn signer(conn: &args::Connection, no_sign: bool) -> anyhow::Result<Option<keys::Signer>> {
    if no_sign {
        return Ok(None);
    }
    match &conn.signing_key {
        Some(path) => keys::Signer::load(path).map(Some),
        None => match keys::default_path().filter(|p| p.exists()) {
            Some(path) => keys::Signer::load(&path).map(Some),
            None => Ok(None),
        },
    }
}
