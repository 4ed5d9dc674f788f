//! The audit chain (a genesis, then each entry linked to the one before, also under concurrent
//! appends), its filtered pages, and retention: of the chain (a prefix, with an `audit.pruned`
//! entry) and of finished jobs with their runs and output.

use std::sync::Arc;

use shared::audit::{Break, GENESIS, GENESIS_PREV, PRUNED, Start, Verifier};
use shared::job::{JobId, RunId, RunState, Stream};
use shared::protocol::Outcome;

use super::{chunk, fleet, job_row, ts};
use crate::store::sqlite::SERVER_ACTOR;
use crate::store::{AuditEntry, AuditQuery, Store};

pub(crate) fn entry(at: i64, action: &str) -> AuditEntry {
    AuditEntry {
        at: ts(at),
        actor: "alice (0123456789abcdef)".into(),
        address: Some("127.0.0.1:4000".into()),
        action: action.into(),
        target: Some("fedcba9876543210".into()),
        detail: serde_json::json!({ "at": at, "text": "a\nb" }),
    }
}

/// Every entry, newest first, through the paged read the API uses.
pub(crate) async fn all(store: &dyn Store) -> Vec<shared::api::AuditEntry> {
    let mut out = Vec::new();
    let mut before = None;
    loop {
        let page = store.audit_entries(&AuditQuery { before, limit: 3, ..AuditQuery::default() }).await.unwrap();
        let Some(last) = page.last() else { return out };
        before = Some(last.id);
        out.extend(page);
    }
}

/// Checks the whole chain as `muster audit verify` does.
pub(crate) async fn verify(store: &dyn Store) -> Result<shared::audit::Summary, Break> {
    let mut v = Verifier::new(None);
    for e in all(store).await {
        v.push(&e)?;
    }
    v.finish()
}

pub(crate) async fn the_chain_begins_with_a_genesis_and_each_entry_links_to_the_one_before(store: Arc<dyn Store>) {
    assert_eq!(verify(&*store).await, Err(Break::Empty));
    let mut first = entry(10, "token.create");
    first.address = None;
    first.target = None;
    first.detail = serde_json::json!({ "name": "ünïcode \"quoted\"", "n": [1, 2.5, null, true], "nested": { "b": 1, "a": 2 } });
    let written = store.audit(&first).await.unwrap();
    assert_eq!(written.len(), 2, "the genesis, then the entry");
    let (genesis, e) = (&written[0], &written[1]);
    assert_eq!((genesis.id, genesis.action.as_str(), genesis.actor.as_str()), (1, GENESIS, SERVER_ACTOR));
    assert_eq!((genesis.at, genesis.prev_hash.as_deref()), (ts(10), Some(GENESIS_PREV)));
    assert_eq!(genesis.detail, serde_json::json!({ "unchained_entries": 0, "last_unchained_id": null }));
    assert_eq!((e.id, e.at, e.actor.as_str(), e.action.as_str()), (2, ts(10), first.actor.as_str(), "token.create"));
    assert_eq!((&e.address, &e.target, &e.detail), (&None, &None, &first.detail));
    assert_eq!(e.prev_hash, genesis.hash);
    let mut head = e.hash.clone();
    for n in 0..5 {
        let next = store.audit(&entry(20 + n, "token.revoke")).await.unwrap();
        assert_eq!(next.len(), 1);
        assert_eq!((next[0].id, &next[0].prev_hash), (3 + n as u64, &head), "linked to the entry before");
        head = next[0].hash.clone();
    }
    let s = verify(&*store).await.unwrap();
    assert_eq!((s.entries, s.head_id, s.oldest_id, s.start, s.unchained), (7, 7, 1, Start::Genesis, 0));
    assert_eq!(Some(s.head_hash), head);
    // What the store returned is what it holds.
    let held = all(&*store).await;
    assert_eq!(held.iter().find(|x| x.id == 1), Some(genesis));
    assert_eq!(held.iter().find(|x| x.id == 2), Some(e));
}

pub(crate) async fn filters_and_pages_read_newest_first(store: Arc<dyn Store>) {
    for n in 0..6 {
        store.audit(&entry(100 + n, if n % 2 == 0 { "token.create" } else { "job.create" })).await.unwrap();
    }
    let q = |f: fn(&mut AuditQuery)| {
        let mut q = AuditQuery { limit: 100, ..AuditQuery::default() };
        f(&mut q);
        q
    };
    let ids = |v: Vec<shared::api::AuditEntry>| v.into_iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(ids(store.audit_entries(&q(|q| q.action = Some("job.create".into()))).await.unwrap()), [7, 5, 3]);
    assert_eq!(ids(store.audit_entries(&q(|q| q.action = Some("token".into()))).await.unwrap()), [6, 4, 2]);
    assert!(store.audit_entries(&q(|q| q.action = Some("toke".into()))).await.unwrap().is_empty());
    assert_eq!(ids(store.audit_entries(&q(|q| q.action = Some("audit".into()))).await.unwrap()), [1], "the genesis is audit.genesis");
    assert_eq!(store.audit_entries(&q(|q| q.actor = Some("0123456789abcdef".into()))).await.unwrap().len(), 6);
    assert_eq!(store.audit_entries(&q(|q| q.actor = Some("alice (0123456789abcdef)".into()))).await.unwrap().len(), 6);
    assert!(store.audit_entries(&q(|q| q.actor = Some("alice".into()))).await.unwrap().is_empty());
    assert!(store.audit_entries(&q(|q| q.actor = Some("23456789abcdef".into()))).await.unwrap().is_empty());
    assert_eq!(store.audit_entries(&q(|q| q.target = Some("fedcba9876543210".into()))).await.unwrap().len(), 6);
    assert!(store.audit_entries(&q(|q| q.target = Some("fedcba987654321".into()))).await.unwrap().is_empty());
    let window = q(|q| {
        q.since = Some(ts(102));
        q.until = Some(ts(104));
    });
    assert_eq!(ids(store.audit_entries(&window).await.unwrap()), [5, 4], "since included, until not");
    assert_eq!(
        ids(store
            .audit_entries(&q(|q| {
                q.before = Some(4);
                q.limit = 2
            }))
            .await
            .unwrap()),
        [3, 2]
    );
    let combined = q(|q| {
        q.action = Some("token".into());
        q.before = Some(6);
        q.limit = 1;
    });
    assert_eq!(ids(store.audit_entries(&combined).await.unwrap()), [4]);
    assert_eq!(ids(store.audit_entries(&q(|q| q.limit = 0)).await.unwrap()), Vec::<u64>::new());
}

pub(crate) async fn pruning_removes_the_oldest_entries_and_the_chain_still_verifies(store: Arc<dyn Store>) {
    let now = ts(100_000);
    assert!(store.prune_audit(ts(4_500), 3, now).await.unwrap().is_empty(), "nothing to prune, nothing written");
    for n in 0..10 {
        store.audit(&entry(n * 1000, "token.create")).await.unwrap();
    }
    // Entries 1 (genesis, at 0) to 6 (at 4000) are older than 4500; three at a time.
    let first = store.prune_audit(ts(4500), 3, now).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].action.as_str(), first[0].actor.as_str(), first[0].at, first[0].id), (PRUNED, SERVER_ACTOR, now, 12));
    assert_eq!(first[0].detail["last_removed_id"], 3);
    assert_eq!(first[0].detail["removed"], 3);
    assert_eq!(verify(&*store).await.unwrap().start, Start::Pruned { last_removed_id: 3 });
    assert_eq!(store.prune_audit(ts(4500), 3, now).await.unwrap().len(), 1);
    assert!(store.prune_audit(ts(4500), 3, now).await.unwrap().is_empty());
    let s = verify(&*store).await.unwrap();
    assert_eq!((s.oldest_id, s.start), (7, Start::Pruned { last_removed_id: 6 }));
    assert_eq!(all(&*store).await.len(), 7, "entries 7 to 11 and the two pruning entries");
    // Everything older, the pruning entries too: the chain goes on from the head.
    store.prune_audit(ts(1_000_000), 100, now).await.unwrap();
    store.audit(&entry(200_000, "token.revoke")).await.unwrap();
    let kept = all(&*store).await;
    assert_eq!(kept.len(), 2, "the pruning entry and the new one");
    assert!(kept.iter().all(|e| e.action != GENESIS), "no second genesis");
    verify(&*store).await.unwrap();
}

pub(crate) async fn twenty_appends_at_once_form_one_linear_chain(store: Arc<dyn Store>) {
    let tasks: Vec<_> = (0..20)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { store.audit(&entry(1_000 + n, &format!("job.create{n}"))).await.unwrap() })
        })
        .collect();
    let mut written = Vec::new();
    for t in tasks {
        written.push(t.await.unwrap());
    }
    assert_eq!(written.iter().filter(|w| w.len() == 2).count(), 1, "one append began the chain");
    assert!(written.iter().all(|w| w.len() <= 2 && w.last().is_some_and(|e| e.action.starts_with("job.create"))));
    let s = verify(&*store).await.unwrap();
    assert_eq!((s.entries, s.head_id, s.oldest_id, s.start), (21, 21, 1, Start::Genesis));
    let held = all(&*store).await;
    assert_eq!(held.iter().map(|e| e.id).collect::<Vec<_>>(), (1..=21).rev().collect::<Vec<_>>(), "no id twice, none skipped");
    for w in written.iter().flatten() {
        assert!(held.contains(w), "each append got back what is stored: {w:?}");
    }
}

pub(crate) async fn retention_removes_old_finished_jobs_with_their_runs_and_output_and_keeps_open_ones(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 1).await;
    let agent = &agents[0].id;
    for (id, finished) in [("00000000000000a1", Some(1_000)), ("00000000000000a2", Some(50_000)), ("00000000000000a3", None)] {
        let run: RunId = format!("r{id}").parse().unwrap();
        store.create_job(&job_row(id, 0), &[(run.clone(), agent.clone())]).await.unwrap();
        store.record(&[chunk(agent, &run, Stream::Stdout, 0, "out")]).await.unwrap();
        if let Some(t) = finished {
            store.end_runs(std::slice::from_ref(&run), RunState::Succeeded, "", ts(t)).await.unwrap();
            assert!(store.finish_job_if_done(id, ts(t)).await.unwrap());
        }
    }
    assert_eq!(store.prune_jobs(ts(10_000), 50).await.unwrap(), 1);
    assert!(store.job("00000000000000a1").await.unwrap().is_none());
    assert!(store.run("r00000000000000a1").await.unwrap().is_none());
    assert!(store.runs("00000000000000a1").await.unwrap().is_empty());
    assert!(store.agent_runs(agent, 10).await.unwrap().iter().all(|r| r.job_id != "00000000000000a1"));
    for kept in ["00000000000000a2", "00000000000000a3"] {
        let heads = store.run_output_heads(kept, 100, 100).await.unwrap();
        assert_eq!(heads[format!("r{kept}").as_str()].stdout, "out", "a kept job keeps its output");
    }
    // Its output went with it: a run given the same id later starts with none.
    store.create_job(&job_row("00000000000000b1", 60_000), &[("r00000000000000a1".parse().unwrap(), agent.clone())]).await.unwrap();
    let heads = store.run_output_heads("00000000000000b1", 100, 100).await.unwrap();
    assert!(heads.values().all(|h| h.stdout.is_empty() && h.stderr.is_empty()), "{heads:?}");
    // However old, an open job stays.
    assert_eq!(store.prune_jobs(ts(i64::MAX), 50).await.unwrap(), 1);
    assert!(store.job("00000000000000a3").await.unwrap().is_some());
    assert!(store.job("00000000000000a2").await.unwrap().is_none());
    assert!(store.job("00000000000000b1").await.unwrap().is_some());
}

pub(crate) async fn retention_takes_at_most_max_jobs_the_longest_finished_first(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 1).await;
    // Created in one order, finished in another: retention goes by when they finished.
    for (n, finished) in [3_000, 1_000, 2_000, 9_000].into_iter().enumerate() {
        let (id, run): (String, RunId) = (format!("00000000000000f{n}"), format!("f{n}").parse().unwrap());
        store.create_job(&job_row(&id, n as i64), &[(run.clone(), agents[0].id.clone())]).await.unwrap();
        store.record(&[super::finished(&agents[0].id, &run, Outcome::Succeeded, 0, 0, finished)]).await.unwrap();
        assert!(store.finish_job_if_done(&id, ts(finished)).await.unwrap());
    }
    assert_eq!(store.prune_jobs(ts(5_000), 2).await.unwrap(), 2);
    let left: Vec<JobId> = store.list_jobs(10).await.unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(left, ["00000000000000f3", "00000000000000f0"], "those finished at 1,000 and 2,000 went first");
    assert_eq!(store.prune_jobs(ts(5_000), 2).await.unwrap(), 1);
    assert_eq!(store.prune_jobs(ts(5_000), 2).await.unwrap(), 0);
    assert_eq!(store.prune_jobs(ts(9_000), 2).await.unwrap(), 0, "finished at 9,000 is not before 9,000");
    assert_eq!(store.list_jobs(10).await.unwrap().len(), 1);
}
