//! muster-agent: parse the config, start logging, run the reconnect loop on a single thread.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Exit status for a bad configuration (EX_USAGE): systemd's RestartPreventExitStatus can
/// stop a broken config from restarting in a loop.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    // Before anything else opens: commands must not inherit what started the agent.
    let inherited = agent::descriptors::close_inherited_on_exec();
    let cli = agent::config::Cli::parse();
    if let Some(agent::config::Command::Uninstall(args)) = &cli.command {
        return report("uninstall", agent::install::uninstall(args));
    }
    let config = match agent::config::Config::resolve(&cli.settings) {
        Ok(c) => c,
        Err(e) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("muster-agent: {e}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).init();
    if inherited > 0 {
        tracing::debug!(descriptors = inherited, "inherited descriptors marked close-on-exec");
    }
    if rustls::crypto::ring::default_provider().install_default().is_err() {
        tracing::error!("a TLS crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    // One thread is plenty for one connection, and keeps the agent small.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().max_blocking_threads(2).build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    if let Some(agent::config::Command::Install(args)) = &cli.command {
        return report("install", runtime.block_on(agent::install::install(&config, args)));
    }
    if let Some(agent::config::Command::Check) = cli.command {
        return runtime.block_on(async {
            let outcome = agent::check::run(&config).await;
            let mut out = std::io::stdout().lock();
            for line in config.policy.describe() {
                let _ = writeln!(out, "{line}");
            }
            match agent::trust(&config) {
                Ok(t) => {
                    for line in t.describe() {
                        let _ = writeln!(out, "{line}");
                    }
                }
                Err(e) => {
                    let _ = writeln!(out, "signed jobs: {e:#}");
                }
            }
            match outcome {
                Ok(ok) => {
                    let _ = writeln!(out, "{ok}");
                    ExitCode::SUCCESS
                }
                Err(problem) => {
                    let _ = writeln!(std::io::stderr(), "muster-agent check: {problem}");
                    ExitCode::FAILURE
                }
            }
        });
    }
    let result = runtime.block_on(async {
        let cancel = CancellationToken::new();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let stop = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received; stopping"),
                _ = int.recv() => tracing::info!("SIGINT received; stopping"),
            }
            stop.cancel();
        });
        agent::run(config, cancel).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints what a one-shot command did, or its one-line failure.
fn report(what: &str, result: Result<Vec<String>, String>) -> ExitCode {
    match result {
        Ok(done) => {
            let mut out = std::io::stdout().lock();
            for line in done {
                let _ = writeln!(out, "{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "muster-agent {what}: {e}");
            ExitCode::FAILURE
        }
    }
}
