//! muster-agent as a library: the reconnect loop around one session at a time.
//!
//! **Invariant:** the agent never gives up. Every failure (refused credential included) is
//! followed by a jittered, capped backoff and another attempt, so an agent left alone recovers
//! by itself when the server or the network comes back.

pub mod check;
pub mod config;
pub mod credential;
pub mod descriptors;
pub mod executor;
pub mod install;
pub mod ledger;
pub mod metrics;
pub mod pin;
pub mod policy;
pub mod session;
pub mod tls;
pub mod trust;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::session::{Outcome, Presenting, Session};
use shared::backoff::{self, Backoff, HEALTHY_AFTER};

pub async fn run(config: Config, cancel: CancellationToken) -> anyhow::Result<()> {
    let tls = tls::client_config(config.ca.as_deref()).context("TLS")?;
    let mut collector = metrics::Collector::new();
    credential::create_state_dir(&config.state_dir)
        .with_context(|| format!("creating the state directory {}", config.state_dir.display()))?;
    let executor = executor::Executor::open(&config.state_dir, config.max_runs, config.policy.clone(), trust(&config)?)
        .with_context(|| format!("opening the run ledger in {}", config.state_dir.display()))?;
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    tracing::info!(server = %config.server, state_dir = %config.state_dir.display(), "muster-agent starting");
    loop {
        // Re-read every time: the credential appears after the first successful enrollment.
        let presenting = match credential::load(&config.state_dir)? {
            Some(c) => Presenting::Credential(c),
            None => match &config.enroll_token {
                Some(t) => Presenting::EnrollToken(t.read().map_err(|e| anyhow::anyhow!(e))?),
                None => anyhow::bail!(
                    "no credential in {} and no enrollment token: pass --enroll-token-file PATH (or --enroll-token), or set MUSTER_ENROLL_TOKEN",
                    config.state_dir.display()
                ),
            },
        };
        let outcome = Session { config: &config, tls: tls.clone(), collector: &mut collector, executor: &executor, cancel: &cancel }
            .run(&presenting)
            .await;
        match outcome {
            Outcome::Stopped => return Ok(()),
            Outcome::Ended { healthy_for, reason, close_code } => {
                if healthy_for >= HEALTHY_AFTER {
                    backoff.reset();
                }
                tracing::warn!(%reason, "disconnected");
                if let Some(delay) = close_code.and_then(backoff::after_close) {
                    tracing::warn!(delay_s = delay.as_secs(), "the server said not to come back soon; waiting");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = cancel.cancelled() => return Ok(()),
                    }
                    continue;
                }
            }
            Outcome::Failed(reason) => tracing::warn!(%reason, "connection failed"),
            Outcome::Busy { retry_after, reason } => {
                // Muster asked for this wait: honour it, spread by as much again at random so
                // a fleet turned away together does not come back together. The backoff
                // schedule is left where it was: a busy server is not a failing one.
                let delay = backoff::after_busy(retry_after);
                tracing::info!(%reason, delay_ms = delay.as_millis() as u64, "server busy; trying again when it asked");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return Ok(()),
                }
                continue;
            }
        }
        if cancel.is_cancelled() {
            return Ok(());
        }
        let delay = backoff.next_delay();
        tracing::info!(delay_ms = delay.as_millis() as u64, "reconnecting after a delay");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return Ok(()),
        }
    }
}

/// The signed-job checks, from the config's trusted keys and the state directory.
pub fn trust(config: &Config) -> anyhow::Result<std::sync::Arc<trust::Trust>> {
    let t = trust::Trust::open(&config.state_dir, &config.trusted_keys, &config.labels)
        .with_context(|| format!("opening the signed-job record in {}", config.state_dir.display()))?;
    Ok(std::sync::Arc::new(t))
}
