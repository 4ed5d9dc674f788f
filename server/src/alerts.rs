//! Webhook alerts: an agent went offline or stale, or recovered; a job finished with failures.
//!
//! The alerter follows the fleet event stream, so it never holds up the server: deliveries go
//! through a bounded queue (full: the alert is dropped and logged) to one sender that retries
//! with backoff. Each POST carries `X-Muster-Signature: sha256=<hex HMAC-SHA256 of the body>`.
//!
//! Hold-down: after a problem alert about an agent, further problem alerts about it wait
//! `alert_hold_down` (5 min by default); a recovery is sent only for an agent whose problem was
//! alerted. A flapping agent thus yields at most one problem and one recovery per window.
//!
//! A webhook's URL often holds a secret of its own (a path token), so it is never logged:
//! [`WebhookUrl`] shows only its scheme and host, and transport errors are logged without the
//! URL reqwest puts in them. URLs are https:// unless `webhook_allow_http`; redirects are not
//! followed unless `webhook_allow_redirects` (a receiver that moved is a failed delivery, not a
//! reason to post alerts and signatures somewhere else).

use std::collections::HashMap;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use shared::api::{AgentStatus, FleetEvent};
use shared::job::StateCounts;
use shared::{AgentId, Timestamp};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fleet_events::FleetEvents;

const QUEUE: usize = 1024;
const ATTEMPTS: u32 = 5;
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Redirects followed when they are allowed at all.
const MAX_REDIRECTS: usize = 5;

/// A webhook's URL, checked when the config loads. `Display` and `Debug` show its scheme and
/// host only (`https://hooks.example/…`): the path, query and user info may be credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookUrl(reqwest::Url);

impl WebhookUrl {
    /// An `https://` URL with a host, or an `http://` one if `allow_http`.
    pub fn parse(s: &str, allow_http: bool) -> Result<WebhookUrl, String> {
        // The parser's error never contains the input.
        let url = reqwest::Url::parse(s).map_err(|e| format!("not a URL ({e})"))?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err("the URL has no host".into());
        }
        let shown = WebhookUrl(url.clone()).to_string();
        match url.scheme() {
            "https" => Ok(WebhookUrl(url)),
            "http" if allow_http => Ok(WebhookUrl(url)),
            "http" => Err(format!(
                "{shown} is plain http, which sends alerts and their signatures readable by anyone on the way; use https, or set webhook_allow_http = true (--webhook-allow-http)"
            )),
            _ => Err(format!("{shown} must be an https:// URL")),
        }
    }

    pub fn as_url(&self) -> &reqwest::Url {
        &self.0
    }
}

impl std::fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = self.0.host_str().unwrap_or("");
        match self.0.port() {
            Some(p) => write!(f, "{}://{host}:{p}/…", self.0.scheme()),
            None => write!(f, "{}://{host}/…", self.0.scheme()),
        }
    }
}

impl std::fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebhookUrl({self})")
    }
}

/// How deliveries treat redirects: none followed, unless allowed; then a few, never from https
/// down to http unless that is allowed too.
fn redirect_policy(allow_redirects: bool, allow_http: bool) -> reqwest::redirect::Policy {
    if !allow_redirects {
        return reqwest::redirect::Policy::none();
    }
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            attempt.error("too many redirects")
        } else if attempt.url().scheme() != "https" && !allow_http {
            attempt.error("a redirect to a URL that is not https")
        } else {
            attempt.follow()
        }
    })
}

/// A transport error as logged: reqwest's message and its causes, without the URL it carries.
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// The JSON body of every webhook.
#[derive(Clone, Debug, Serialize)]
pub struct Alert {
    /// `agent.offline`, `agent.stale`, `agent.recovered`, `agent.credential_conflict`,
    /// `agent.clone_suspected` or `job.failed`.
    pub event: &'static str,
    pub at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<AgentId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<shared::JobId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counts: Option<StateCounts>,
}

pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length, so this never returns early.
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()) else { return String::new() };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Which alerts an event calls for, after hold-down.
#[derive(Default)]
pub struct Policy {
    hold_down: Duration,
    agents: HashMap<AgentId, (Instant, bool)>,
    conflicts: HashMap<(AgentId, &'static str), Instant>,
}

impl Policy {
    pub fn new(hold_down: Duration) -> Self {
        Policy { hold_down, agents: HashMap::new(), conflicts: HashMap::new() }
    }

    /// An alert about an agent's credential (two copies in use, a retired one back), held
    /// down per agent and kind.
    fn identity_alert(&mut self, agent_id: &AgentId, event: &'static str, at: Timestamp, reason: String, now: Instant) -> Option<Alert> {
        let key = (agent_id.clone(), event);
        if self.conflicts.get(&key).is_some_and(|last| now.duration_since(*last) < self.hold_down) {
            return None;
        }
        self.conflicts.insert(key, now);
        Some(Alert { event, at, agent_id: Some(agent_id.clone()), reason: Some(reason), job_id: None, counts: None })
    }

    pub fn decide(&mut self, event: &FleetEvent, now: Instant) -> Option<Alert> {
        match event {
            FleetEvent::AgentStatus { agent_id, to, reason, at, .. } => {
                let kind = match to {
                    AgentStatus::Offline => "agent.offline",
                    AgentStatus::Stale => "agent.stale",
                    AgentStatus::Online => {
                        let alerted = self.agents.get_mut(agent_id).is_some_and(|(_, down)| std::mem::replace(down, false));
                        return alerted.then(|| Alert {
                            event: "agent.recovered",
                            at: *at,
                            agent_id: Some(agent_id.clone()),
                            reason: Some(reason.clone()),
                            job_id: None,
                            counts: None,
                        });
                    }
                };
                if self.agents.get(agent_id).is_some_and(|(last, _)| now.duration_since(*last) < self.hold_down) {
                    return None;
                }
                self.agents.insert(agent_id.clone(), (now, true));
                Some(Alert {
                    event: kind,
                    at: *at,
                    agent_id: Some(agent_id.clone()),
                    reason: Some(reason.clone()),
                    job_id: None,
                    counts: None,
                })
            }
            FleetEvent::CredentialConflict { agent_id, previous_addr, current_addr, at } => self.identity_alert(
                agent_id,
                "agent.credential_conflict",
                *at,
                format!("the agent's credential is in use from {current_addr} while a session from {previous_addr} was still alive"),
                now,
            ),
            FleetEvent::CloneSuspected { agent_id, from_addr, at } => self.identity_alert(
                agent_id,
                "agent.clone_suspected",
                *at,
                format!("a credential this agent gave up in a rotation was presented from {from_addr}; it was refused"),
                now,
            ),
            FleetEvent::JobFinished { job_id, counts, .. } => {
                let failed = shared::job::failures(counts) > 0;
                failed.then(|| Alert {
                    event: "job.failed",
                    at: Timestamp::now(),
                    agent_id: None,
                    reason: None,
                    job_id: Some(job_id.clone()),
                    counts: Some(counts.clone()),
                })
            }
            _ => None,
        }
    }
}

/// A live session was replaced by another connection with the same credential: say so in the
/// log, the metrics, the fleet event stream and (through the policy above) a webhook.
pub fn credential_conflict(app: &crate::app::AppState, agent_id: &AgentId, c: crate::registry::Conflict) {
    metrics::counter!("muster_agent_credential_conflicts_total").increment(1);
    tracing::warn!(agent = %agent_id, previous = %c.previous, current = %c.current, "two connections share one agent credential");
    app.fleet.publish(FleetEvent::CredentialConflict {
        agent_id: agent_id.clone(),
        previous_addr: c.previous.to_string(),
        current_addr: c.current.to_string(),
        at: Timestamp::now(),
    });
}

/// Where and how alerts are delivered.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub urls: Vec<WebhookUrl>,
    pub allow_http: bool,
    pub allow_redirects: bool,
}

/// Follows the fleet events and delivers alerts until cancelled.
pub async fn run(fleet: FleetEvents, delivery: Delivery, secret: String, hold_down: Duration, cancel: CancellationToken) {
    let Delivery { urls, allow_http, allow_redirects } = delivery;
    if urls.is_empty() {
        return;
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let built = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(ATTEMPT_TIMEOUT)
        .redirect(redirect_policy(allow_redirects, allow_http))
        .build();
    let http = match built {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %describe(e), "webhooks disabled: cannot build an HTTP client");
            return;
        }
    };
    let (tx, rx) = mpsc::channel::<Alert>(QUEUE);
    let sender = tokio::spawn(deliver(http, urls, secret, rx, cancel.clone()));
    let (mut events, _) = fleet.subscribe(None);
    let mut policy = Policy::new(hold_down);
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => break,
            e = events.recv() => e,
        };
        match event {
            Ok((_, event)) => {
                if let Some(alert) = policy.decide(&event, Instant::now())
                    && tx.try_send(alert).is_err()
                {
                    tracing::warn!("webhook queue full: an alert was dropped");
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => tracing::warn!(missed = n, "the alerter fell behind the fleet events"),
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
    drop(tx);
    let _ = sender.await;
}

async fn deliver(http: reqwest::Client, urls: Vec<WebhookUrl>, secret: String, mut rx: mpsc::Receiver<Alert>, cancel: CancellationToken) {
    let mut delivery = 0u64;
    while let Some(alert) = rx.recv().await {
        delivery += 1;
        let body = serde_json::to_vec(&alert).unwrap_or_default();
        let sig = signature(&secret, &body);
        for url in &urls {
            let mut delay = Duration::from_secs(1);
            for attempt in 1..=ATTEMPTS {
                let sent = http
                    .post(url.as_url().clone())
                    .header("content-type", "application/json")
                    .header("x-muster-event", alert.event)
                    .header("x-muster-delivery", delivery.to_string())
                    .header("x-muster-signature", &sig)
                    .body(body.clone())
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => break,
                    // Asking again would be answered the same; where it points is not logged.
                    Ok(r) if r.status().is_redirection() => {
                        let status = r.status().as_u16();
                        tracing::error!(webhook = %url, status, event = alert.event, "webhook answered with a redirect, which is not followed (webhook_allow_redirects); alert dropped");
                        break;
                    }
                    Ok(r) => tracing::warn!(webhook = %url, attempt, status = r.status().as_u16(), "webhook refused"),
                    Err(e) => tracing::warn!(webhook = %url, attempt, error = %describe(e), "webhook failed"),
                }
                if attempt == ATTEMPTS {
                    tracing::error!(webhook = %url, event = alert.event, "webhook given up after {ATTEMPTS} attempts");
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return,
                }
                delay *= 2;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(to: AgentStatus) -> FleetEvent {
        FleetEvent::AgentStatus {
            agent_id: AgentId::from_bytes([1; 8]),
            from: None,
            to,
            reason: "r".into(),
            at: Timestamp::from_unix_millis(0),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_flapping_agent_yields_one_problem_and_one_recovery_per_hold_down() {
        let mut p = Policy::new(Duration::from_secs(300));
        let mut sent = Vec::new();
        for _ in 0..5 {
            for to in [AgentStatus::Offline, AgentStatus::Online] {
                if let Some(a) = p.decide(&status(to), Instant::now()) {
                    sent.push(a.event);
                }
            }
            tokio::time::advance(Duration::from_secs(10)).await;
        }
        assert_eq!(sent, ["agent.offline", "agent.recovered"]);
        tokio::time::advance(Duration::from_secs(300)).await;
        assert_eq!(p.decide(&status(AgentStatus::Stale), Instant::now()).map(|a| a.event), Some("agent.stale"));
    }

    #[test]
    fn a_webhook_url_is_shown_without_what_may_be_its_credentials() {
        let u = WebhookUrl::parse("https://user:pass@hooks.example:8443/services/T0/B1/xyzzy?token=abc", false).unwrap();
        assert_eq!(u.to_string(), "https://hooks.example:8443/…");
        assert_eq!(format!("{u:?}"), "WebhookUrl(https://hooks.example:8443/…)");
        assert!(WebhookUrl::parse("http://hooks.example/x", false).unwrap_err().contains("webhook_allow_http"));
        assert!(WebhookUrl::parse("http://hooks.example/x", true).is_ok());
        for bad in ["ftp://hooks.example/x", "hooks.example/x", "https://", "file:///etc/passwd"] {
            let err = WebhookUrl::parse(bad, true).unwrap_err();
            assert!(!err.contains("/x") && !err.contains("passwd"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        let sig = signature("Jefe", b"what do ya want for nothing?");
        assert_eq!(sig, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
