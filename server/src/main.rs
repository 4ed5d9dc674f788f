//! muster-server: parse the config, start logging, hand over to the library.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use server::{Cli, Config};

/// Exit status for a bad configuration (EX_USAGE), so service managers can tell it apart.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every connection is a file: take the hard limit on open files, as the default
    // max_connections (the limit less 512) is derived from it.
    raise_open_files_limit();
    let config = match Config::resolve(&cli.settings) {
        Ok(c) => c,
        Err(e) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("muster-server: {e}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).init();
    if rustls::crypto::ring::default_provider().install_default().is_err() {
        tracing::error!("a TLS crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(server::run(cli, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One plain line on stderr, whatever the log format: scripts and `check` read it.
            let _ = writeln!(std::io::stderr(), "muster-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
}
