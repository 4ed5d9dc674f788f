//! `muster audit`: the audit log, newest first, and `muster audit verify`, which checks its
//! whole hash chain with the same code the server hashes with (shared::audit).

use std::io::Write;

use anyhow::bail;
use shared::api::{AUDIT_PAGE_MAX, AuditEntry, AuditPage};
use shared::audit::{Start, Verifier, canonical_json};

use crate::args::{AuditAction, AuditArgs};
use crate::client::Client;
use crate::output::table;

type Out<'a> = &'a mut dyn Write;

/// Longest detail shown in a table cell; `--json` has all of it.
const DETAIL_CHARS: usize = 100;

pub async fn audit(client: &Client, args: &AuditArgs, out: Out<'_>) -> anyhow::Result<bool> {
    if let Some(AuditAction::Verify { head }) = &args.action_command {
        return verify(client, head.clone(), out).await;
    }
    let mut filters: Vec<(&str, String)> = Vec::new();
    for (name, v) in
        [("since", &args.since), ("until", &args.until), ("actor", &args.actor), ("action", &args.action), ("target", &args.target)]
    {
        if let Some(v) = v {
            filters.push((name, v.clone()));
        }
    }
    let mut entries: Vec<AuditEntry> = Vec::new();
    let mut before: Option<u64> = None;
    while entries.len() < args.limit as usize {
        let want = (args.limit as usize - entries.len()).min(AUDIT_PAGE_MAX as usize);
        let page = fetch(client, &filters, before, want).await?;
        entries.extend(page.entries);
        match page.next_before {
            Some(b) => before = Some(b),
            None => break,
        }
    }
    if args.json {
        for e in &entries {
            serde_json::to_writer(&mut *out, e)?;
            writeln!(out)?;
        }
        return Ok(true);
    }
    if entries.is_empty() {
        writeln!(out, "No audit entries match.")?;
        return Ok(true);
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let mut detail = canonical_json(&e.detail);
            if detail.chars().count() > DETAIL_CHARS {
                detail = detail.chars().take(DETAIL_CHARS).collect::<String>() + "…";
            }
            vec![
                e.id.to_string(),
                e.at.to_string(),
                e.actor.clone(),
                e.address.clone().unwrap_or_else(|| "-".into()),
                e.action.clone(),
                e.target.clone().unwrap_or_else(|| "-".into()),
                detail,
            ]
        })
        .collect();
    write!(out, "{}", table(&["ID", "AT", "ACTOR", "ADDRESS", "ACTION", "TARGET", "DETAIL"], &rows))?;
    Ok(true)
}

async fn fetch(client: &Client, filters: &[(&str, String)], before: Option<u64>, limit: usize) -> anyhow::Result<AuditPage> {
    let mut query: Vec<(&str, String)> = filters.to_vec();
    if let Some(b) = before {
        query.push(("before", b.to_string()));
    }
    query.push(("limit", limit.to_string()));
    client.get_query("/audit", &query).await
}

/// Pages through the whole log, newest first, checking each entry as it comes.
async fn verify(client: &Client, head: Option<String>, out: Out<'_>) -> anyhow::Result<bool> {
    let mut v = Verifier::new(head);
    let mut before = None;
    loop {
        let page = fetch(client, &[], before, AUDIT_PAGE_MAX as usize).await?;
        for e in &page.entries {
            if let Err(broken) = v.push(e) {
                bail!("the audit log does not verify: {broken}");
            }
        }
        match page.next_before {
            Some(b) => before = Some(b),
            None => break,
        }
    }
    let s = match v.finish() {
        Ok(s) => s,
        Err(broken) => bail!("the audit log does not verify: {broken}"),
    };
    let start = match s.start {
        Start::Genesis => "from its genesis entry".to_owned(),
        Start::Pruned { last_removed_id } => format!("after entries up to {last_removed_id}, removed by retention"),
    };
    writeln!(out, "The audit log verifies: {} entries, {} to {}, {start}.", s.entries, s.oldest_id, s.head_id)?;
    if s.unchained > 0 {
        writeln!(out, "{} older entries from before the chain began are not covered.", s.unchained)?;
    }
    writeln!(out, "head {} {}", s.head_id, s.head_hash)?;
    Ok(true)
}
