//! Prometheus metrics at `GET /metrics`. Counters and histograms are recorded where things
//! happen; gauges of fleet and job state are read from the registry and the database when
//! scraped, so they are never stale.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use shared::api::AgentStatus;

use crate::app::AppState;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once. None if another recorder got there first.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
                )
                .ok()?;
            match builder.install_recorder() {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

pub fn message_received(kind: &'static str) {
    counter!("muster_ws_messages_received_total", "type" => kind).increment(1);
}

pub fn message_sent(kind: &'static str) {
    counter!("muster_ws_messages_sent_total", "type" => kind).increment(1);
}

/// A connection closed at accept because a cap was reached (`cap` names the setting).
pub fn connection_refused(cap: &'static str) {
    counter!("muster_connections_refused_total", "cap" => cap).increment(1);
}

/// A request refused for its body: too large (413) or too slow (408).
pub fn body_refused(why: &'static str) {
    counter!("muster_request_bodies_refused_total", "reason" => why).increment(1);
}

/// Agent messages dropped for being over the agent's budget.
pub fn agent_over_budget(kind: &'static str) {
    counter!("muster_agent_messages_over_budget_total", "budget" => kind).increment(1);
}

/// Output chunks refused: they overlapped stored output with different bytes, or left a gap.
pub fn output_refused(why: &'static str) {
    counter!("muster_output_chunks_refused_total", "reason" => why).increment(1);
}

pub fn db_batch(records: usize, took: Duration) {
    histogram!("muster_db_batch_write_seconds").record(took.as_secs_f64());
    counter!("muster_db_records_written_total").increment(records as u64);
}

pub fn run_result(dispatch_to_result: Duration) {
    histogram!("muster_run_dispatch_to_result_seconds").record(dispatch_to_result.as_secs_f64());
}

/// The text Prometheus scrapes, with the state gauges refreshed first.
pub async fn render(app: &AppState) -> Result<String, crate::store::StoreError> {
    let Some(handle) = handle() else { return Ok(String::new()) };
    let fleet = app.store.fleet_counts().await?;
    for (status, n) in [(AgentStatus::Online, fleet.online), (AgentStatus::Stale, fleet.stale), (AgentStatus::Offline, fleet.offline)] {
        gauge!("muster_agents", "status" => status.as_str()).set(n as f64);
    }
    gauge!("muster_agents_connected").set(app.registry.len() as f64);
    let (held, unauthenticated) = app.admission.held();
    gauge!("muster_connections").set(held as f64);
    gauge!("muster_connections_unauthenticated").set(unauthenticated as f64);
    let (runs, jobs) = app.store.state_totals().await?;
    for (state, n) in runs {
        gauge!("muster_runs", "state" => state.as_str()).set(n as f64);
    }
    for (state, n) in jobs {
        gauge!("muster_jobs", "state" => state).set(n as f64);
    }
    let stats = app.recorder.stats();
    counter!("muster_heartbeats_dropped_total").absolute(stats.dropped_heartbeats.load(std::sync::atomic::Ordering::Relaxed));
    gauge!("muster_build_info", "version" => shared::VERSION).set(1.0);
    Ok(handle.render())
}
