//! Agent identity and trust: credential rotation (two phases, a gap between issues, retired
//! credentials), clone sightings, approval of pending agents, operators' label edits
//! (compare-and-set), the keys agents report trusting, signed jobs' agents, key revocations.

use std::sync::Arc;

use shared::job::Target;
use shared::signing::{JobSignature, KeyRevocation, PublicKey, Signature};
use shared::{AgentId, Labels};

use super::{TOKEN, agent, connected, enroll, enrolled, job_row, ts};
use crate::store::sqlite::identity::RETIRED_KEPT;
use crate::store::{Acceptance, Record, Store};

/// Two minutes after enrollment: past any gap the checks ask for.
const LATER: i64 = 1_000 + 120_000;

pub(crate) async fn a_rotation_replaces_the_credential_only_once_confirmed_and_keeps_the_old_one_retired(store: Arc<dyn Store>) {
    let agent = enrolled(&*store).await;
    let later = ts(LATER);
    assert!(store.begin_rotation(&agent.id, b"new", later, 60_000).await.unwrap());
    let row = store.agent_credential(&agent.id).await.unwrap().unwrap();
    assert_eq!(row.secret_hash, agent.secret_hash, "the old credential works until the new one is confirmed");
    assert_eq!(row.pending_secret_hash.as_deref(), Some(&b"new"[..]));
    assert_eq!(store.agent(&agent.id).await.unwrap().unwrap().credential_issued_at, agent.at, "not issued until confirmed");
    // Another issue within the gap is refused, and so is confirming a credential never issued.
    assert!(!store.begin_rotation(&agent.id, b"newer", later, 60_000).await.unwrap());
    assert!(!store.complete_rotation(&agent.id, b"other", later).await.unwrap());
    assert!(store.retired_credentials(&agent.id).await.unwrap().is_empty());
    assert!(store.complete_rotation(&agent.id, b"new", ts(LATER + 5)).await.unwrap());
    let row = store.agent_credential(&agent.id).await.unwrap().unwrap();
    assert_eq!(row.secret_hash, b"new");
    assert_eq!(row.pending_secret_hash, None);
    assert_eq!(store.retired_credentials(&agent.id).await.unwrap(), vec![agent.secret_hash.clone()]);
    assert_eq!(store.agent(&agent.id).await.unwrap().unwrap().credential_issued_at, ts(LATER + 5));
    // Confirming twice changes nothing.
    assert!(!store.complete_rotation(&agent.id, b"new", later).await.unwrap());
    assert_eq!(store.retired_credentials(&agent.id).await.unwrap().len(), 1);
}

pub(crate) async fn a_second_issue_within_the_gap_is_refused_and_a_later_one_replaces_the_pending_credential(store: Arc<dyn Store>) {
    let agent = enrolled(&*store).await;
    let gap = 60_000;
    assert!(store.begin_rotation(&agent.id, b"first", ts(LATER), gap).await.unwrap());
    assert!(!store.begin_rotation(&agent.id, b"second", ts(LATER + 59_999), gap).await.unwrap(), "within the gap");
    assert!(store.begin_rotation(&agent.id, b"second", ts(LATER + 60_000), gap).await.unwrap(), "a gap after the last issue");
    assert_eq!(store.agent_credential(&agent.id).await.unwrap().unwrap().pending_secret_hash.as_deref(), Some(&b"second"[..]));
    assert!(!store.complete_rotation(&agent.id, b"first", ts(LATER + 70_000)).await.unwrap(), "replaced by a later issue");
    assert!(store.complete_rotation(&agent.id, b"second", ts(LATER + 70_000)).await.unwrap());
    // The gap counts from the credential now in use too.
    assert!(!store.begin_rotation(&agent.id, b"third", ts(LATER + 100_000), gap).await.unwrap());
    assert!(store.begin_rotation(&agent.id, b"third", ts(LATER + 130_000), gap).await.unwrap());
}

pub(crate) async fn only_the_newest_retired_credentials_are_kept(store: Arc<dyn Store>) {
    let agent = enrolled(&*store).await;
    let mut at = agent.at.unix_millis();
    for n in 0..(RETIRED_KEPT + 4) {
        at += 120_000;
        let hash = format!("h{n}").into_bytes();
        assert!(store.begin_rotation(&agent.id, &hash, ts(at), 60_000).await.unwrap());
        assert!(store.complete_rotation(&agent.id, &hash, ts(at)).await.unwrap());
    }
    let retired = store.retired_credentials(&agent.id).await.unwrap();
    assert_eq!(retired.len() as i64, RETIRED_KEPT);
    assert!(!retired.contains(&agent.secret_hash), "the oldest are forgotten");
    // Rotation n retired h(n-1): the newest RETIRED_KEPT are h3 to h18.
    let last = RETIRED_KEPT + 4 - 1;
    for n in (last - RETIRED_KEPT)..last {
        assert!(retired.contains(&format!("h{n}").into_bytes()), "h{n} is among the newest");
    }
    assert!(!retired.contains(&format!("h{last}").into_bytes()), "the one in use is not retired");
}

pub(crate) async fn revoked_and_unknown_agents_are_not_rotated(store: Arc<dyn Store>) {
    let agent = enrolled(&*store).await;
    assert!(store.begin_rotation(&agent.id, b"new", ts(LATER), 60_000).await.unwrap());
    assert!(store.revoke_agent(&agent.id, ts(LATER + 1)).await.unwrap());
    assert!(!store.complete_rotation(&agent.id, b"new", ts(LATER + 2)).await.unwrap());
    assert!(!store.begin_rotation(&agent.id, b"newer", ts(LATER * 10), 60_000).await.unwrap());
    assert!(!store.request_rotation(&agent.id, ts(LATER + 2)).await.unwrap());
    assert_eq!(store.agent_credential(&agent.id).await.unwrap().unwrap().secret_hash, agent.secret_hash);
    let unknown = AgentId::from_bytes([0xee; 8]);
    assert!(!store.begin_rotation(&unknown, b"x", ts(LATER), 60_000).await.unwrap());
    assert!(!store.complete_rotation(&unknown, b"x", ts(LATER)).await.unwrap());
    assert!(!store.request_rotation(&unknown, ts(LATER)).await.unwrap());
}

pub(crate) async fn a_requested_rotation_is_flagged_until_a_rotation_completes(store: Arc<dyn Store>) {
    let agent = enrolled(&*store).await;
    assert!(!store.agent_credential(&agent.id).await.unwrap().unwrap().rotation_requested);
    assert!(store.request_rotation(&agent.id, ts(2_000)).await.unwrap());
    assert!(store.request_rotation(&agent.id, ts(3_000)).await.unwrap(), "asking again is fine");
    assert!(store.agent_credential(&agent.id).await.unwrap().unwrap().rotation_requested);
    assert_eq!(store.agent(&agent.id).await.unwrap().unwrap().rotation_requested_at, Some(ts(2_000)), "since it was first asked");
    assert!(store.begin_rotation(&agent.id, b"new", ts(LATER), 60_000).await.unwrap());
    assert!(store.agent_credential(&agent.id).await.unwrap().unwrap().rotation_requested, "until it is done");
    assert!(store.complete_rotation(&agent.id, b"new", ts(LATER)).await.unwrap());
    assert!(!store.agent_credential(&agent.id).await.unwrap().unwrap().rotation_requested);
    assert_eq!(store.agent(&agent.id).await.unwrap().unwrap().rotation_requested_at, None);
}

pub(crate) async fn a_clone_sighting_is_kept_on_the_agent(store: Arc<dyn Store>) {
    let agent = enrolled(&*store).await;
    store.clone_seen(&agent.id, ts(5_000), "198.51.100.7:5555").await.unwrap();
    assert_eq!(store.agent(&agent.id).await.unwrap().unwrap().clone_seen, Some((ts(5_000), "198.51.100.7:5555".into())));
    store.clone_seen(&agent.id, ts(6_000), "198.51.100.8:6666").await.unwrap();
    assert_eq!(store.agent(&agent.id).await.unwrap().unwrap().clone_seen, Some((ts(6_000), "198.51.100.8:6666".into())), "the last one");
    store.clone_seen(&AgentId::from_bytes([0xee; 8]), ts(6_000), "x").await.unwrap();
}

pub(crate) async fn accepting_an_agent_works_once(store: Arc<dyn Store>) {
    let agent = enrolled(&*store).await;
    assert_eq!(store.accept_agent(&agent.id, agent.at, "admin").await.unwrap(), Acceptance::NotPending);
    let unknown = AgentId::parse("00000000000000ff").unwrap();
    assert_eq!(store.accept_agent(&unknown, agent.at, "admin").await.unwrap(), Acceptance::Unknown);

    let mut pending = super::agent(2);
    pending.approval_pending = true;
    assert!(store.enroll_agent(TOKEN, &pending).await.unwrap());
    assert_eq!(store.accept_agent(&pending.id, ts(5_000), "admin (00000000000000ad)").await.unwrap(), Acceptance::Accepted);
    assert!(!store.agent_credential(&pending.id).await.unwrap().unwrap().approval_pending);
    assert!(!store.agent(&pending.id).await.unwrap().unwrap().approval_pending);
    let target = store.agent_targets().await.unwrap().into_iter().find(|t| t.id == pending.id).unwrap();
    assert!(!target.approval_pending, "a target from now on");
    assert_eq!(store.accept_agent(&pending.id, ts(6_000), "admin").await.unwrap(), Acceptance::NotPending);

    let mut revoked = super::agent(3);
    revoked.approval_pending = true;
    assert!(store.enroll_agent(TOKEN, &revoked).await.unwrap());
    assert!(store.revoke_agent(&revoked.id, ts(5_000)).await.unwrap());
    assert_eq!(store.accept_agent(&revoked.id, ts(6_000), "admin").await.unwrap(), Acceptance::Unknown);
}

pub(crate) async fn concurrent_rotations_within_the_gap_let_exactly_one_through(store: Arc<dyn Store>) {
    let agent = enrolled(&*store).await;
    let tasks: Vec<_> = (0..10u8)
        .map(|n| {
            let (store, id) = (store.clone(), agent.id.clone());
            tokio::spawn(async move { (n, store.begin_rotation(&id, &[n; 32], ts(LATER + i64::from(n)), 60_000).await.unwrap()) })
        })
        .collect();
    let mut won = Vec::new();
    for t in tasks {
        if let (n, true) = t.await.unwrap() {
            won.push(n);
        }
    }
    assert_eq!(won.len(), 1, "one issue per gap: {won:?}");
    let pending = store.agent_credential(&agent.id).await.unwrap().unwrap().pending_secret_hash;
    assert_eq!(pending, Some(vec![won[0]; 32]), "the pending credential is the one that was issued");
}

pub(crate) async fn labels_change_only_if_the_trusted_ones_are_still_as_expected(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    let revoked = enroll(&*store, 2).await;
    assert!(store.revoke_agent(&revoked.id, ts(2_000)).await.unwrap());
    let trusted = Labels::from_pairs(["site=lab", "role=db"]).unwrap();
    let effective = Labels::from_pairs(["site=lab", "role=db", "agent.os=debian"]).unwrap();
    assert!(store.set_agent_labels(&a.id, &a.token_labels, &trusted, &effective).await.unwrap());
    assert_eq!(store.agent_credential(&a.id).await.unwrap().unwrap().token_labels, trusted);
    assert_eq!(store.agent(&a.id).await.unwrap().unwrap().labels, effective);
    let target = store.agent_targets().await.unwrap().into_iter().find(|t| t.id == a.id).unwrap();
    assert_eq!(target.labels, effective, "the next job targets the edit");

    // An edit made from what the labels were before is refused: it would lose this one.
    let other = Labels::from_pairs(["site=paris"]).unwrap();
    assert!(!store.set_agent_labels(&a.id, &a.token_labels, &other, &other).await.unwrap());
    assert_eq!(store.agent_credential(&a.id).await.unwrap().unwrap().token_labels, trusted);
    assert!(!store.set_agent_labels(&revoked.id, &revoked.token_labels, &other, &other).await.unwrap(), "revoked");
    let unknown = AgentId::from_bytes([0xee; 8]);
    assert!(!store.set_agent_labels(&unknown, &Labels::new(), &other, &other).await.unwrap());

    let labels = store.agent_labels(&[a.id.clone(), revoked.id.clone(), unknown]).await.unwrap();
    assert_eq!(labels.len(), 1, "revoked and unknown agents are left out");
    assert_eq!(labels[&a.id], effective);
    assert!(store.agent_labels(&[]).await.unwrap().is_empty());
}

pub(crate) async fn concurrent_label_edits_let_exactly_one_win(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    let tasks: Vec<_> = (0..10)
        .map(|n| {
            let (store, a) = (store.clone(), a.clone());
            tokio::spawn(async move {
                let labels = Labels::from_pairs([format!("site=s{n}")]).unwrap();
                (labels.clone(), store.set_agent_labels(&a.id, &a.token_labels, &labels, &labels).await.unwrap())
            })
        })
        .collect();
    let mut won = Vec::new();
    for t in tasks {
        if let (labels, true) = t.await.unwrap() {
            won.push(labels);
        }
    }
    assert_eq!(won.len(), 1, "two edits at once cannot both win");
    assert_eq!(store.agent_credential(&a.id).await.unwrap().unwrap().token_labels, won[0]);
    assert_eq!(store.agent(&a.id).await.unwrap().unwrap().labels, won[0]);
}

pub(crate) async fn the_keys_an_agent_reports_are_kept_until_it_reports_others(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    let row = store.agent(&a.id).await.unwrap().unwrap();
    assert!(row.trusted_keys.is_empty(), "an agent that never connected requires nothing");

    let keys = vec![PublicKey::from_bytes([7; 32]), PublicKey::from_bytes([8; 32])];
    let with_keys = |id: &AgentId, at: i64, keys: &[PublicKey]| {
        let mut hello = connected(id, at);
        if let Record::Connected { trusted_keys, .. } = &mut hello {
            *trusted_keys = keys.to_vec();
        }
        hello
    };
    store.record(&[with_keys(&a.id, 5_000, &keys)]).await.unwrap();
    assert_eq!(store.agent(&a.id).await.unwrap().unwrap().trusted_keys, keys);
    let found = store.agent_trusted_keys(std::slice::from_ref(&a.id)).await.unwrap();
    assert_eq!(found.get(&a.id), Some(&keys));

    // Its owner took trusted_keys out of agent.toml: the next hello says so.
    store.record(&[connected(&a.id, 6_000)]).await.unwrap();
    assert!(store.agent(&a.id).await.unwrap().unwrap().trusted_keys.is_empty());
    assert!(store.agent_trusted_keys(std::slice::from_ref(&a.id)).await.unwrap().is_empty());

    // Only agents that require signatures, and are not revoked, are named.
    let b = enroll(&*store, 2).await;
    let c = enroll(&*store, 3).await;
    store
        .record(&[with_keys(&a.id, 7_000, &keys[..1]), with_keys(&b.id, 7_000, &keys[1..]), with_keys(&c.id, 7_000, &keys)])
        .await
        .unwrap();
    assert!(store.revoke_agent(&c.id, ts(8_000)).await.unwrap());
    let found = store.agent_trusted_keys(&[a.id.clone(), b.id.clone(), c.id.clone(), agent(9).id]).await.unwrap();
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!((&found[&a.id], &found[&b.id]), (&keys[..1].to_vec(), &keys[1..].to_vec()));
}

pub(crate) async fn a_signed_job_keeps_the_agents_it_was_signed_for(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    let b = enroll(&*store, 2).await;
    let signature =
        JobSignature { key: PublicKey::from_bytes([7; 32]), signature: Signature([1; 64]), expires_at: ts(99_000), selector: None };
    let mut signed = job_row("00000000000000s1", 1);
    signed.target = Target::Agents(vec![b.id.clone(), a.id.clone()]);
    signed.signature = Some(signature.clone());
    store.create_job(&signed, &[("s1b".parse().unwrap(), b.id.clone()), ("s1a".parse().unwrap(), a.id.clone())]).await.unwrap();
    assert_eq!(store.signed_agents("00000000000000s1").await.unwrap(), [b.id.clone(), a.id.clone()], "as signed");
    assert_eq!(store.job("00000000000000s1").await.unwrap().unwrap().signature, Some(signature));

    let mut unsigned = job_row("00000000000000u1", 2);
    unsigned.target = Target::Agents(vec![a.id.clone()]);
    store.create_job(&unsigned, &[("u1a".parse().unwrap(), a.id.clone())]).await.unwrap();
    assert!(store.signed_agents("00000000000000u1").await.unwrap().is_empty());
    assert!(store.signed_agents("00000000000000x1").await.unwrap().is_empty());
}

pub(crate) async fn a_key_is_revoked_once_and_revocations_are_listed_in_order(store: Arc<dyn Store>) {
    assert!(store.key_revocations().await.unwrap().is_empty());
    let revocation = |key: u8, by: u8, sig: u8| KeyRevocation {
        key: PublicKey::from_bytes([key; 32]),
        by: PublicKey::from_bytes([by; 32]),
        signature: Signature([sig; 64]),
    };
    let (late, early) = (revocation(1, 2, 3), revocation(4, 5, 6));
    assert!(store.insert_key_revocation(&late, ts(20), "admin").await.unwrap());
    assert!(store.insert_key_revocation(&early, ts(10), "admin").await.unwrap());
    assert!(!store.insert_key_revocation(&revocation(1, 9, 9), ts(30), "someone").await.unwrap(), "that key was revoked already");
    assert_eq!(store.key_revocations().await.unwrap(), [early, late], "oldest first, the first revocation of each key");
}
