//! Agent rows: listing, targets, transitions (newest first), heartbeat history (oldest first),
//! fleet counts, revocation, marking a node's agents offline, and pruning heartbeats.

use std::sync::Arc;

use shared::api::{AgentStatus, FleetCounts};
use shared::{AgentId, Labels};

use super::{connected, enroll, enrolled, fleet, heartbeat, job_row, transition, ts};
use crate::store::{Record, Store};

/// A `hello` from `a` with this hostname and these effective labels.
fn hello(a: &AgentId, at: i64, hostname: &str, labels: &Labels) -> Record {
    let mut r = connected(a, at);
    if let Record::Connected { hostname: h, labels: l, .. } = &mut r {
        *h = hostname.into();
        *l = labels.clone();
    }
    r
}

pub(crate) async fn agents_are_listed_by_hostname_then_id_and_filtered_by_status(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 4).await;
    let [a, b, c, d] = [&agents[0].id, &agents[1].id, &agents[2].id, &agents[3].id];
    let none = Labels::new();
    store
        .record(&[
            hello(a, 2_000, "web-2", &none),
            hello(b, 2_000, "web-1", &none),
            hello(c, 2_000, "db-1", &none),
            hello(d, 2_000, "web-1", &none),
            transition(a, 2_000, Some(AgentStatus::Offline), AgentStatus::Online, "connected"),
            transition(b, 2_000, Some(AgentStatus::Offline), AgentStatus::Online, "connected"),
            transition(b, 3_000, Some(AgentStatus::Online), AgentStatus::Stale, "silent"),
        ])
        .await
        .unwrap();
    assert!(store.revoke_agent(c, ts(4_000)).await.unwrap());
    let listed = |status: Option<AgentStatus>| {
        let store = store.clone();
        async move {
            let rows = store.list_agents(status).await.unwrap();
            rows.into_iter().map(|r| (r.hostname, r.id)).collect::<Vec<_>>()
        }
    };
    let host = |h: &str, id: &AgentId| (h.to_owned(), id.clone());
    // Revoked agents are listed too (with their revocation); two `web-1` in id order.
    assert_eq!(listed(None).await, [host("db-1", c), host("web-1", b), host("web-1", d), host("web-2", a)]);
    assert_eq!(listed(Some(AgentStatus::Online)).await, [host("web-2", a)]);
    assert_eq!(listed(Some(AgentStatus::Stale)).await, [host("web-1", b)]);
    assert_eq!(listed(Some(AgentStatus::Offline)).await, [host("db-1", c), host("web-1", d)]);
    let rows = store.list_agents(None).await.unwrap();
    assert_eq!(rows[0].revoked_at, Some(ts(4_000)));
    assert_eq!((rows[1].status, rows[1].status_since), (AgentStatus::Stale, ts(3_000)));
}

pub(crate) async fn targets_leave_out_revoked_agents_and_say_which_wait_for_approval(store: Arc<dyn Store>) {
    store.insert_enroll_token(&super::enroll_token(5, 10_000)).await.unwrap();
    let a = enroll(&*store, 1).await;
    let mut p = super::agent(2);
    p.approval_pending = true;
    assert!(store.enroll_agent(super::TOKEN, &p).await.unwrap());
    let r = enroll(&*store, 3).await;
    let labels = Labels::from_pairs(["site=lab", "agent.role=db"]).unwrap();
    store.record(&[hello(&a.id, 2_000, "alpha", &labels)]).await.unwrap();
    assert!(store.revoke_agent(&r.id, ts(3_000)).await.unwrap());

    let mut targets = store.agent_targets().await.unwrap();
    targets.sort_by(|x, y| x.id.cmp(&y.id));
    let seen: Vec<_> = targets.iter().map(|t| (t.id.clone(), t.hostname.as_str(), t.labels.clone(), t.approval_pending)).collect();
    assert_eq!(seen, [(a.id.clone(), "alpha", labels, false), (p.id.clone(), "", p.token_labels.clone(), true)]);
}

pub(crate) async fn transitions_are_read_newest_first_within_the_limit(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    let b = enroll(&*store, 2).await;
    use AgentStatus::{Offline, Online, Stale};
    store
        .record(&[
            transition(&a.id, 2_000, Some(Offline), Online, "connected"),
            transition(&a.id, 3_000, Some(Online), Stale, "silent"),
            transition(&b.id, 3_500, Some(Offline), Online, "connected"),
        ])
        .await
        .unwrap();
    store
        .record(&[
            transition(&a.id, 4_000, Some(Stale), Online, "heartbeat"),
            transition(&a.id, 5_000, Some(Online), Offline, "disconnected"),
            transition(&a.id, 6_000, None, Online, "connected"),
        ])
        .await
        .unwrap();
    let seen = |t: Vec<shared::api::Transition>| t.into_iter().map(|t| (t.at.unix_millis(), t.from, t.to, t.reason)).collect::<Vec<_>>();
    assert_eq!(
        seen(store.transitions(&a.id, 3).await.unwrap()),
        [
            (6_000, None, Online, "connected".to_owned()),
            (5_000, Some(Online), Offline, "disconnected".to_owned()),
            (4_000, Some(Stale), Online, "heartbeat".to_owned()),
        ]
    );
    assert_eq!(store.transitions(&a.id, 100).await.unwrap().len(), 5);
    assert_eq!(seen(store.transitions(&b.id, 100).await.unwrap()), [(3_500, Some(Offline), Online, "connected".to_owned())]);
    // The status is always the `to` of the latest transition.
    let row = store.agent(&a.id).await.unwrap().unwrap();
    assert_eq!((row.status, row.status_since), (Online, ts(6_000)));
}

pub(crate) async fn a_batch_of_heartbeats_keeps_history_and_the_newest_metrics(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    let batch: Vec<Record> = (0..1200).map(|i| heartbeat(&a.id, i, 2_000 + i as i64, "h1", i as f64 / 100.0)).collect();
    store.record(&batch).await.unwrap();
    let row = store.agent(&a.id).await.unwrap().unwrap();
    assert_eq!(row.last_heartbeat_at, Some(ts(3_199)));
    assert_eq!(row.hostname, "h1");
    assert_eq!(row.last_metrics.unwrap().cpu_percent, 11.99);
    let hist = store.heartbeats(&a.id, ts(3_000), None, 1000).await.unwrap();
    assert_eq!(hist.len(), 200, "from `since` on, itself included");
    assert_eq!((hist[0].at, hist[199].at), (ts(3_000), ts(3_199)));
    assert!(hist.windows(2).all(|w| w[0].at < w[1].at && w[0].seq < w[1].seq), "oldest first");
    let first: Vec<i64> = store.heartbeats(&a.id, ts(3_000), None, 3).await.unwrap().iter().map(|h| h.at.unix_millis()).collect();
    assert_eq!(first, [3_000, 3_001, 3_002], "the limit keeps the oldest");
    // In buckets of 100 ms: 3,000..3,099 and 3,100..3,199, each with its highest figures.
    let step = Some(std::time::Duration::from_millis(100));
    let buckets = store.heartbeats(&a.id, ts(3_000), step, 1000).await.unwrap();
    let seen: Vec<(i64, u64, f64)> = buckets.iter().map(|b| (b.at.unix_millis(), b.seq, b.cpu_percent)).collect();
    assert_eq!(seen, [(3_000, 1099, 10.99), (3_100, 1199, 11.99)]);
    let one = store.heartbeats(&a.id, ts(2_050), step, 1).await.unwrap();
    assert_eq!((one.len(), one[0].at, one[0].seq), (1, ts(2_000), 99), "a bucket starts on a multiple of the step");
    assert!(store.heartbeats(&a.id, ts(3_200), None, 1000).await.unwrap().is_empty());
    assert_eq!(store.prune_heartbeats(ts(3_000), 10_000).await.unwrap(), 1000);
}

pub(crate) async fn the_newest_heartbeat_sets_the_latest_metrics_whatever_the_order_in_the_batch(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    let b = enroll(&*store, 2).await;
    store
        .record(&[
            heartbeat(&a.id, 7, 7_000, "a-new", 70.0),
            heartbeat(&b.id, 1, 1_500, "b", 15.0),
            heartbeat(&a.id, 6, 6_000, "a-old", 60.0),
        ])
        .await
        .unwrap();
    let row = store.agent(&a.id).await.unwrap().unwrap();
    assert_eq!((row.last_heartbeat_at, row.hostname.as_str()), (Some(ts(7_000)), "a-new"));
    assert_eq!(row.last_metrics.unwrap().cpu_percent, 70.0);
    assert_eq!(store.agent(&b.id).await.unwrap().unwrap().last_metrics.unwrap().cpu_percent, 15.0);
    let hist = store.heartbeats(&a.id, ts(0), None, 10).await.unwrap();
    assert_eq!(hist.iter().map(|h| h.seq).collect::<Vec<_>>(), [6, 7], "history is kept by time, both samples");
    let sample = &hist[1];
    assert_eq!((sample.cpu_percent, sample.load1, sample.mem_used_bytes, sample.process_count), (70.0, 0.0, 0, 0));
}

pub(crate) async fn pruning_heartbeats_takes_at_most_max_rows_and_only_older_ones(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    let b = enroll(&*store, 2).await;
    let mut batch: Vec<Record> = (0..10).map(|i| heartbeat(&a.id, i, 100 + i as i64, "h", 1.0)).collect();
    batch.push(heartbeat(&b.id, 0, 100, "h", 1.0));
    store.record(&batch).await.unwrap();
    // Six are older than 105 (a's 100..104 and b's 100): three at a time.
    assert_eq!(store.prune_heartbeats(ts(105), 3).await.unwrap(), 3);
    assert_eq!(store.prune_heartbeats(ts(105), 3).await.unwrap(), 3);
    assert_eq!(store.prune_heartbeats(ts(105), 3).await.unwrap(), 0);
    let kept: Vec<i64> = store.heartbeats(&a.id, ts(0), None, 100).await.unwrap().iter().map(|h| h.at.unix_millis()).collect();
    assert_eq!(kept, [105, 106, 107, 108, 109]);
    assert!(store.heartbeats(&b.id, ts(0), None, 100).await.unwrap().is_empty());
    assert_eq!(store.agent(&a.id).await.unwrap().unwrap().last_heartbeat_at, Some(ts(109)), "the latest stays on the agent");
}

pub(crate) async fn transitions_set_status_and_restart_marks_the_nodes_agents_offline(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    let at = ts(5_000);
    store
        .record(&[connected(&a.id, 5_000), transition(&a.id, 5_000, Some(AgentStatus::Offline), AgentStatus::Online, "connected")])
        .await
        .unwrap();
    assert_eq!(store.fleet_counts().await.unwrap(), FleetCounts { total: 1, online: 1, stale: 0, offline: 0 });
    assert_eq!(store.mark_node_offline("other", at, "restart").await.unwrap(), 0);
    assert_eq!(store.mark_node_offline("n1", ts(6_000), "restart").await.unwrap(), 1);
    let row = store.agent(&a.id).await.unwrap().unwrap();
    assert_eq!((row.status, row.status_since), (AgentStatus::Offline, ts(6_000)));
    assert!(!row.connected);
    assert_eq!(row.disconnected_at, Some(ts(6_000)));
    let t = store.transitions(&a.id, 10).await.unwrap();
    assert_eq!(t.len(), 2);
    assert_eq!(
        (t[0].from, t[0].to, t[0].reason.as_str(), t[0].at),
        (Some(AgentStatus::Online), AgentStatus::Offline, "restart", ts(6_000))
    );
    assert_eq!(store.mark_node_offline("n1", ts(7_000), "restart").await.unwrap(), 0, "nothing left to change");
}

pub(crate) async fn marking_a_node_offline_changes_only_its_agents_that_were_not_offline_already(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 4).await;
    let [stale, quiet, elsewhere, gone] = [&agents[0].id, &agents[1].id, &agents[2].id, &agents[3].id];
    let mut other = connected(elsewhere, 2_000);
    if let Record::Connected { node, .. } = &mut other {
        *node = "n2".into();
    }
    use AgentStatus::{Offline, Online, Stale};
    store
        .record(&[
            connected(stale, 2_000),
            transition(stale, 2_000, Some(Offline), Online, "connected"),
            transition(stale, 3_000, Some(Online), Stale, "silent"),
            // Connected, and not yet online: counted, with no transition (it was offline).
            connected(quiet, 2_000),
            other,
            transition(elsewhere, 2_000, Some(Offline), Online, "connected"),
            connected(gone, 2_000),
            Record::Disconnected { agent_id: gone.clone(), at: ts(2_500) },
        ])
        .await
        .unwrap();
    assert_eq!(store.mark_node_offline("n1", ts(4_000), "server restarted").await.unwrap(), 2);
    let row = |id: &AgentId| {
        let store = store.clone();
        let id = id.clone();
        async move { store.agent(&id).await.unwrap().unwrap() }
    };
    let s = row(stale).await;
    assert_eq!((s.status, s.status_since, s.connected, s.disconnected_at), (Offline, ts(4_000), false, Some(ts(4_000))));
    assert_eq!(store.transitions(stale, 1).await.unwrap()[0].from, Some(Stale));
    let q = row(quiet).await;
    assert_eq!((q.status, q.status_since, q.connected), (Offline, ts(1_000), false), "it never left offline");
    assert!(store.transitions(quiet, 10).await.unwrap().is_empty());
    let e = row(elsewhere).await;
    assert_eq!((e.status, e.connected), (Online, true), "another node's agent");
    let g = row(gone).await;
    assert_eq!(g.disconnected_at, Some(ts(2_500)), "its own disconnection stays");
}

pub(crate) async fn fleet_counts_leave_out_revoked_agents(store: Arc<dyn Store>) {
    assert_eq!(store.fleet_counts().await.unwrap(), FleetCounts::default());
    let agents = fleet(&*store, 4).await;
    use AgentStatus::{Offline, Online, Stale};
    store
        .record(&[
            transition(&agents[0].id, 2_000, Some(Offline), Online, "connected"),
            transition(&agents[1].id, 2_000, Some(Offline), Online, "connected"),
            transition(&agents[1].id, 3_000, Some(Online), Stale, "silent"),
            transition(&agents[3].id, 2_000, Some(Offline), Online, "connected"),
        ])
        .await
        .unwrap();
    assert!(store.revoke_agent(&agents[3].id, ts(4_000)).await.unwrap());
    assert_eq!(store.fleet_counts().await.unwrap(), FleetCounts { total: 3, online: 1, stale: 1, offline: 1 });
}

pub(crate) async fn revoking_an_agent_works_once_and_keeps_its_row(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    assert!(store.revoke_agent(&a.id, ts(2_000)).await.unwrap());
    assert!(!store.revoke_agent(&a.id, ts(3_000)).await.unwrap());
    assert!(!store.revoke_agent(&AgentId::from_bytes([0xee; 8]), ts(3_000)).await.unwrap());
    assert!(store.agent_credential(&a.id).await.unwrap().unwrap().revoked);
    assert_eq!(store.agent(&a.id).await.unwrap().unwrap().revoked_at, Some(ts(2_000)));
    assert_eq!(store.list_agents(None).await.unwrap().len(), 1);
    assert!(store.agent_targets().await.unwrap().is_empty());
}

pub(crate) async fn an_unknown_agent_has_no_row_credential_runs_or_history(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    store.create_job(&job_row("00000000000000j1", 1), &[("r1".parse().unwrap(), a.id.clone())]).await.unwrap();
    store.record(&[heartbeat(&a.id, 1, 2_000, "h", 1.0)]).await.unwrap();
    let unknown = AgentId::from_bytes([0xee; 8]);
    assert!(store.agent(&unknown).await.unwrap().is_none());
    assert!(store.agent_credential(&unknown).await.unwrap().is_none());
    assert!(store.transitions(&unknown, 10).await.unwrap().is_empty());
    assert!(store.heartbeats(&unknown, ts(0), None, 10).await.unwrap().is_empty());
    assert!(store.agent_runs(&unknown, 10).await.unwrap().is_empty());
    assert!(store.open_runs_for_agent(&unknown).await.unwrap().is_empty());
    assert!(store.agent_labels(std::slice::from_ref(&unknown)).await.unwrap().is_empty());
    assert!(store.agent_trusted_keys(std::slice::from_ref(&unknown)).await.unwrap().is_empty());
    assert!(store.retired_credentials(&unknown).await.unwrap().is_empty());
}
