//! One function per command: a request, then output for a person or, with `--json`, a script.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use shared::api::{
    AgentDetail, AgentSummary, CreateEnrollToken, CreateToken, EnrollTokenCreated, EnrollTokenInfo, FleetCounts, TokenCreated, TokenInfo,
    WhoAmI,
};
use shared::job::AgentRun;
use shared::{Labels, Timestamp};

use crate::args::{AgentAction, AgentArgs, AgentsArgs, EnrollTokenCommand, TokenCommand};
use crate::client::Client;
use crate::output::{age, bytes, pct, percent, safe, table};

type Out<'a> = &'a mut dyn Write;

fn json<T: Serialize>(out: Out<'_>, value: &T) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

fn ago(t: Option<Timestamp>, now: Timestamp) -> String {
    t.map_or_else(|| "never".into(), |t| age(t.age(now)))
}

pub async fn agents(client: &Client, args: &AgentsArgs, out: Out<'_>) -> anyhow::Result<()> {
    let mut query: Vec<(&str, String)> = Vec::new();
    if let Some(s) = args.status {
        query.push(("status", s.to_string()));
    }
    if let Some(l) = &args.label {
        query.push(("label", l.to_string()));
    }
    let agents: Vec<AgentSummary> = client.get_query("/agents", &query).await?;
    if args.json {
        return json(out, &agents);
    }
    if agents.is_empty() {
        writeln!(out, "No agents match.")?;
        return Ok(());
    }
    let now = Timestamp::now();
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            let (cpu, mem, disk) = match &a.metrics {
                Some(m) => {
                    let (du, dt) = m.disk_totals();
                    (pct(m.cpu_percent), percent(m.mem_used_bytes, m.mem_total_bytes), percent(du, dt))
                }
                None => ("-".into(), "-".into(), "-".into()),
            };
            vec![
                if a.pending { format!("{} (pending)", a.status) } else { a.status.to_string() },
                a.hostname.clone(),
                a.id.to_string(),
                ago(a.last_heartbeat_at, now),
                cpu,
                mem,
                disk,
                if a.requires_signature() { "required".into() } else { "-".into() },
                if a.labels.is_empty() { "-".into() } else { a.labels.to_string() },
            ]
        })
        .collect();
    write!(out, "{}", table(&["STATUS", "HOSTNAME", "ID", "HEARTBEAT", "CPU", "MEM", "DISK", "SIGNED", "LABELS"], &rows))?;
    Ok(())
}

/// Whether the agent runs only signed jobs, as it reported it, and with which keys.
fn signed_jobs(s: &AgentSummary) -> String {
    if !s.requires_signature() {
        return "not required (the agent trusts no keys)".into();
    }
    let keys: Vec<String> = s.trusted_keys.iter().map(ToString::to_string).collect();
    format!("required: runs only jobs signed by {}", keys.join(", "))
}

pub async fn agent(client: &Client, args: &AgentArgs, out: Out<'_>) -> anyhow::Result<()> {
    if let Some(AgentAction::Revoke { id }) = &args.action {
        client.delete(&format!("/agents/{id}")).await?;
        writeln!(out, "Agent {id} revoked and disconnected.")?;
        return Ok(());
    }
    if let Some(AgentAction::Accept { id }) = &args.action {
        let a: AgentDetail = client.post(&format!("/agents/{id}/accept"), &serde_json::json!({})).await?;
        if args.json {
            return json(out, &a);
        }
        writeln!(out, "Agent {id} ({}) accepted: it gets runs from now on.", safe(&a.summary.hostname))?;
        return Ok(());
    }
    if let Some(AgentAction::Rotate { id }) = &args.action {
        let a: AgentDetail = client.post(&format!("/agents/{id}/rotate-credential"), &serde_json::json!({})).await?;
        if args.json {
            return json(out, &a);
        }
        let when = if a.connection.as_ref().is_some_and(|c| c.connected) { "now" } else { "when it next connects" };
        writeln!(out, "Agent {id} will rotate its credential {when}; the current one stops working once the new one is stored.")?;
        return Ok(());
    }
    let Some(id) = &args.id else { bail!("name an agent: muster agent <ID>") };
    if let Some(AgentAction::Label { changes }) = &args.action {
        let mut edit = shared::api::LabelEdit::default();
        for c in changes {
            match c {
                crate::args::LabelChange::Set(k, v) => edit.set.insert(k, v)?,
                crate::args::LabelChange::Remove(k) => edit.remove.push(k.clone()),
            }
        }
        let a: AgentDetail = client.patch(&format!("/agents/{id}"), &shared::api::PatchAgent { labels: edit }).await?;
        if args.json {
            return json(out, &a);
        }
        let labels = &a.summary.labels;
        writeln!(out, "Agent {id} labels: {}", if labels.is_empty() { "-".to_string() } else { labels.to_string() })?;
        return Ok(());
    }
    let a: AgentDetail = client.get(&format!("/agents/{id}")).await?;
    if args.json {
        return json(out, &a);
    }
    let now = Timestamp::now();
    let s = &a.summary;
    writeln!(out, "Agent      {}", s.id)?;
    writeln!(out, "Hostname   {}", safe(&s.hostname))?;
    writeln!(out, "Status     {} (since {}, {})", s.status, s.status_since, age(s.status_since.age(now)))?;
    writeln!(out, "Labels     {}", if s.labels.is_empty() { "-".to_string() } else { s.labels.to_string() })?;
    if s.pending {
        writeln!(out, "Approval   pending: it gets no runs until an admin runs `muster agent accept {}`", s.id)?;
    }
    writeln!(out, "Signed     {}", signed_jobs(s))?;
    writeln!(out, "Enrolled   {}", a.enrolled_at)?;
    let rotation = match a.rotation_requested_at {
        Some(at) => format!(" (rotation requested {at})"),
        None => String::new(),
    };
    writeln!(out, "Credential issued {}{rotation}", a.credential_issued_at)?;
    if let Some(c) = &a.clone_seen {
        writeln!(out, "Clone?     a credential this agent gave up was presented from {} at {} (refused)", safe(&c.from_addr), c.at)?;
    }
    writeln!(out, "Version    {}", safe(a.agent_version.as_deref().unwrap_or("-")))?;
    writeln!(
        out,
        "Heartbeat  {} (every {})",
        ago(s.last_heartbeat_at, now),
        a.heartbeat_interval_ms.map_or("-".into(), |ms| shared::duration::format(Duration::from_millis(ms)))
    )?;
    if let Some(c) = &a.connection {
        let state = if c.connected { "connected".to_string() } else { format!("disconnected {}", ago(c.disconnected_at, now)) };
        writeln!(out, "Connection {state} from {} to node {} since {}", safe(&c.remote_addr), safe(&c.node), c.connected_at)?;
    }
    if let Some(m) = &s.metrics {
        writeln!(
            out,
            "System     {} {} ({}), up {}",
            safe(&m.os),
            safe(&m.kernel),
            safe(&m.arch),
            shared::duration::format(Duration::from_secs(m.uptime_secs))
        )?;
        writeln!(
            out,
            "CPU        {}  load {} {} {}  {} processes",
            pct(m.cpu_percent),
            load(m.load_avg[0]),
            load(m.load_avg[1]),
            load(m.load_avg[2]),
            m.process_count
        )?;
        writeln!(
            out,
            "Memory     {} of {} ({})",
            bytes(m.mem_used_bytes),
            bytes(m.mem_total_bytes),
            percent(m.mem_used_bytes, m.mem_total_bytes)
        )?;
        for d in &m.disks {
            writeln!(
                out,
                "Disk       {} ({}) {} of {} ({})",
                safe(&d.mount),
                safe(&d.fs_type),
                bytes(d.used_bytes),
                bytes(d.total_bytes),
                percent(d.used_bytes, d.total_bytes)
            )?;
        }
    }
    if !a.transitions.is_empty() {
        writeln!(out, "\nRecent status changes:")?;
        let rows: Vec<Vec<String>> = a
            .transitions
            .iter()
            .map(|t| vec![t.at.to_string(), t.from.map_or("-".into(), |f| f.to_string()), t.to.to_string(), t.reason.clone()])
            .collect();
        write!(out, "{}", table(&["AT", "FROM", "TO", "REASON"], &rows))?;
    }
    let runs: Vec<AgentRun> = client.get(&format!("/agents/{id}/runs?limit=10")).await?;
    if !runs.is_empty() {
        writeln!(out, "\nRecent runs:")?;
        let rows: Vec<Vec<String>> = runs
            .iter()
            .map(|r| {
                let ended = crate::run::ending(r.state, r.exit_code, r.signal);
                vec![r.job_id.to_string(), ended, r.created_at.to_string(), r.command.summary()]
            })
            .collect();
        write!(out, "{}", table(&["JOB", "RESULT", "CREATED", "COMMAND"], &rows))?;
    }
    Ok(())
}

pub async fn fleet(client: &Client, as_json: bool, out: Out<'_>) -> anyhow::Result<()> {
    let c: FleetCounts = client.get("/fleet").await?;
    if as_json {
        return json(out, &c);
    }
    writeln!(out, "{}: {} online, {} stale, {} offline", crate::output::agents(c.total), c.online, c.stale, c.offline)?;
    Ok(())
}

/// `muster key generate` and `muster key show`.
pub fn key_local(conn: &crate::args::Connection, k: &crate::args::KeyCommand, out: Out<'_>) -> anyhow::Result<()> {
    use crate::args::KeyCommand;
    let configured = || conn.signing_key.clone().or_else(crate::keys::default_path).context("no HOME: give --signing-key");
    match k {
        KeyCommand::Generate { out: path, force } => {
            let path = match path {
                Some(p) => p.clone(),
                None => configured()?,
            };
            let public = crate::keys::generate(&path, *force)?;
            writeln!(out, "{public}")?;
            let mut err = std::io::stderr();
            writeln!(err, "Private key written to {} (0600). Give agents the public key above:", path.display())?;
            writeln!(err, "  muster-agent install ... --trust-key {public}")?;
        }
        KeyCommand::Show => {
            let signer = crate::keys::Signer::load(&configured()?)?;
            writeln!(out, "{}", signer.public)?;
        }
        KeyCommand::Revoke { .. } => {}
    }
    Ok(())
}

/// `muster key revoke KEY`: signed here, delivered by the server, checked by each agent.
pub async fn key_revoke(
    client: &Client,
    signer: &crate::keys::Signer,
    key: &shared::signing::PublicKey,
    out: Out<'_>,
) -> anyhow::Result<()> {
    let revocation = signer.revocation(key)?;
    let _: serde_json::Value = client.post("/keys/revocations", &revocation).await?;
    writeln!(out, "Revoked {key} (signed by {}); agents that trust {} refuse it from now on.", signer.public, signer.public)?;
    Ok(())
}

pub async fn whoami(client: &Client, out: Out<'_>) -> anyhow::Result<()> {
    let w: WhoAmI = client.get("/whoami").await?;
    match &w.scope {
        Some(scope) => writeln!(out, "{} ({}), role {}, scope {scope}", w.name, w.token_id, w.role)?,
        None => writeln!(out, "{} ({}), role {}", w.name, w.token_id, w.role)?,
    }
    Ok(())
}

/// The SHA-256 fingerprint of the first certificate in a PEM file: what an agent pins.
fn ca_fingerprint(ca: &std::path::Path) -> anyhow::Result<String> {
    use rustls_pki_types::pem::PemObject;
    use sha2::Digest;
    let cert = rustls_pki_types::CertificateDer::pem_file_iter(ca)?
        .next()
        .ok_or_else(|| anyhow::anyhow!("no certificate in {}", ca.display()))??;
    Ok(format!("sha256:{}", hex::encode(sha2::Sha256::digest(cert.as_ref()))))
}

pub async fn enroll_token(client: &Client, conn: &crate::args::Connection, cmd: &EnrollTokenCommand, out: Out<'_>) -> anyhow::Result<()> {
    match cmd {
        EnrollTokenCommand::Create { ttl, uses, labels, approve, install_command, json: as_json } => {
            let mut l = Labels::new();
            for (k, v) in labels {
                l.insert(k, v)?;
            }
            let created: EnrollTokenCreated = client
                .post(
                    "/enroll-tokens",
                    &CreateEnrollToken { ttl_secs: ttl.map(|d| d.as_secs().max(1)), uses: *uses, labels: l, approve: *approve },
                )
                .await?;
            if *as_json {
                return json(out, &created);
            }
            writeln!(out, "{}", created.token)?;
            let i = &created.info;
            writeln!(
                out,
                "\nEnrollment token {}: {} use(s), expires {}{}.",
                i.id,
                i.uses_total,
                i.expires_at,
                if i.labels.is_empty() { String::new() } else { format!(", labels {}", i.labels) }
            )?;
            if i.approve {
                writeln!(out, "Agents enrolled with it wait for `muster agent accept ID` before they get runs.")?;
            }
            let server = conn.server.clone().unwrap_or_else(|| "https://<server>:8443".into());
            if *install_command {
                let trust = match &conn.ca {
                    Some(ca) => format!("--ca-fingerprint {}", ca_fingerprint(ca)?),
                    None => "--ca <the server's CA file>".into(),
                };
                writeln!(out, "It is shown only this once. On each terminal, as root:\n")?;
                writeln!(out, "    muster-agent install --server {server} {trust} --enroll-token {}", created.token)?;
            } else {
                writeln!(out, "It is shown only this once. `--install-command` prints a ready install line; or:")?;
                writeln!(out, "\n    muster-agent install --server {server} --ca <CA file> --enroll-token <TOKEN>")?;
            }
            Ok(())
        }
        EnrollTokenCommand::List { json: as_json } => {
            let tokens: Vec<EnrollTokenInfo> = client.get("/enroll-tokens").await?;
            if *as_json {
                return json(out, &tokens);
            }
            let now = Timestamp::now();
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    let state = if t.revoked {
                        "revoked"
                    } else if t.expires_at <= now {
                        "expired"
                    } else if t.uses_left == 0 {
                        "used up"
                    } else if t.approve {
                        "active (approve)"
                    } else {
                        "active"
                    };
                    vec![
                        t.id.clone(),
                        state.into(),
                        format!("{}/{}", t.uses_left, t.uses_total),
                        t.expires_at.to_string(),
                        t.labels.to_string(),
                        t.created_by.clone(),
                    ]
                })
                .collect();
            write!(out, "{}", table(&["ID", "STATE", "USES LEFT", "EXPIRES", "LABELS", "CREATED BY"], &rows))?;
            Ok(())
        }
        EnrollTokenCommand::Revoke { id } => {
            client.delete(&format!("/enroll-tokens/{id}")).await?;
            writeln!(out, "Enrollment token {id} revoked.")?;
            Ok(())
        }
    }
}

pub async fn token(client: &Client, cmd: &TokenCommand, out: Out<'_>) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create { name, role, ttl, scope, json: as_json } => {
            let req = CreateToken { name: name.clone(), role: *role, ttl_secs: ttl.map(|d| d.as_secs().max(1)), scope: scope.clone() };
            let created: TokenCreated = client.post("/tokens", &req).await?;
            if *as_json {
                return json(out, &created);
            }
            writeln!(out, "{}", created.token)?;
            writeln!(out, "\nToken {} ({}), role {}. It is shown only this once.", created.info.id, created.info.name, created.info.role)?;
            Ok(())
        }
        TokenCommand::List { json: as_json } => {
            let tokens: Vec<TokenInfo> = client.get("/tokens").await?;
            if *as_json {
                return json(out, &tokens);
            }
            let now = Timestamp::now();
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    let state = if t.revoked {
                        "revoked"
                    } else if t.expires_at.is_some_and(|e| e <= now) {
                        "expired"
                    } else {
                        "active"
                    };
                    let scope = t.scope.as_ref().map_or("-".to_string(), ToString::to_string);
                    vec![
                        t.id.clone(),
                        t.name.clone(),
                        t.role.to_string(),
                        scope,
                        state.into(),
                        ago(t.last_used_at, now),
                        t.created_by.clone(),
                    ]
                })
                .collect();
            write!(out, "{}", table(&["ID", "NAME", "ROLE", "SCOPE", "STATE", "LAST USED", "CREATED BY"], &rows))?;
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            client.delete(&format!("/tokens/{id}")).await?;
            writeln!(out, "Token {id} revoked.")?;
            Ok(())
        }
    }
}

/// A load average for people: two decimals, or `?` for a figure no machine reports.
fn load(v: f64) -> String {
    if v.is_finite() && (0.0..1e6).contains(&v) { format!("{v:.2}") } else { "?".into() }
}
