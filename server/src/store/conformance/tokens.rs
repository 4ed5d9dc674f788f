//! Operator tokens, enrollment tokens, and enrolling an agent with one (one use or nothing).

use std::sync::Arc;

use shared::api::{AgentStatus, Role};
use shared::{Labels, Selector};

use super::{TOKEN, agent, enroll_token, ts};
use crate::store::{ApiTokenRow, Store, StoreError};

fn api_token(id: &str, created_at: i64) -> ApiTokenRow {
    ApiTokenRow {
        id: id.into(),
        name: format!("token {id}"),
        role: Role::Operator,
        secret_hash: id.as_bytes().to_vec(),
        created_by: "admin (00000000000000ad)".into(),
        created_at: ts(created_at),
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
        scope: None,
    }
}

pub(crate) async fn operator_tokens_are_stored_listed_in_creation_order_touched_and_revoked_once(store: Arc<dyn Store>) {
    let mut scoped = api_token("00000000000000t1", 2_000);
    scoped.role = Role::Admin;
    scoped.expires_at = Some(ts(90_000));
    scoped.scope = Some(Selector::parse("site=lab").unwrap());
    let plain = api_token("00000000000000t2", 1_000);
    store.insert_api_token(&scoped).await.unwrap();
    store.insert_api_token(&plain).await.unwrap();

    let read = store.api_token(&scoped.id).await.unwrap().unwrap();
    assert_eq!(format!("{read:?}"), format!("{scoped:?}"), "every field as written");
    assert!(store.api_token("00000000000000t9").await.unwrap().is_none());
    let listed: Vec<String> = store.list_api_tokens().await.unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(listed, [plain.id.clone(), scoped.id.clone()], "oldest first");

    store.touch_api_token(&plain.id, ts(5_000)).await.unwrap();
    store.touch_api_token(&plain.id, ts(6_000)).await.unwrap();
    assert_eq!(store.api_token(&plain.id).await.unwrap().unwrap().last_used_at, Some(ts(6_000)));
    store.touch_api_token("00000000000000t9", ts(6_000)).await.unwrap();

    assert!(store.revoke_api_token(&plain.id, ts(7_000)).await.unwrap());
    assert!(!store.revoke_api_token(&plain.id, ts(8_000)).await.unwrap(), "revoked once");
    assert!(!store.revoke_api_token("00000000000000t9", ts(8_000)).await.unwrap());
    let revoked = store.api_token(&plain.id).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(ts(7_000)), "the first revocation's time stays");
    assert_eq!(store.api_token(&scoped.id).await.unwrap().unwrap().revoked_at, None);

    let mut again = api_token(&plain.id, 9_000);
    again.name = "another".into();
    assert!(matches!(store.insert_api_token(&again).await, Err(StoreError::Duplicate)));
    assert_eq!(store.api_token(&plain.id).await.unwrap().unwrap().name, plain.name);
}

pub(crate) async fn enrollment_tokens_are_stored_listed_and_revoked_once(store: Arc<dyn Store>) {
    let mut first = enroll_token(3, 10_000);
    first.labels = Labels::from_pairs(["site=lab", "role=db"]).unwrap();
    first.approve = true;
    first.created_at = ts(500);
    let mut second = enroll_token(1, 20_000);
    second.id = "00000000000000bb".into();
    store.insert_enroll_token(&first).await.unwrap();
    store.insert_enroll_token(&second).await.unwrap();

    let read = store.enroll_token(TOKEN).await.unwrap().unwrap();
    assert_eq!(format!("{read:?}"), format!("{first:?}"), "every field as written");
    assert!(store.enroll_token("00000000000000cc").await.unwrap().is_none());
    let listed: Vec<String> = store.list_enroll_tokens().await.unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(listed, [second.id.clone(), first.id.clone()], "oldest first");

    assert!(store.revoke_enroll_token(TOKEN, ts(2_000)).await.unwrap());
    assert!(!store.revoke_enroll_token(TOKEN, ts(3_000)).await.unwrap(), "revoked once");
    assert!(!store.revoke_enroll_token("00000000000000cc", ts(3_000)).await.unwrap());
    assert_eq!(store.enroll_token(TOKEN).await.unwrap().unwrap().revoked_at, Some(ts(2_000)));
    // A revoked token enrolls nobody and keeps its uses.
    assert!(!store.enroll_agent(TOKEN, &agent(1)).await.unwrap());
    assert!(store.agent(&agent(1).id).await.unwrap().is_none());
    assert_eq!(store.enroll_token(TOKEN).await.unwrap().unwrap().uses_left, 3);

    assert!(matches!(store.insert_enroll_token(&enroll_token(9, 1)).await, Err(StoreError::Duplicate)));
    assert_eq!(store.enroll_token(TOKEN).await.unwrap().unwrap().uses_total, 3);
}

pub(crate) async fn enrollment_takes_one_use_per_agent_and_stops_at_zero(store: Arc<dyn Store>) {
    store.insert_enroll_token(&enroll_token(2, 10_000)).await.unwrap();
    assert!(store.enroll_agent(TOKEN, &agent(1)).await.unwrap());
    assert_eq!(store.enroll_token(TOKEN).await.unwrap().unwrap().uses_left, 1);
    assert!(store.enroll_agent(TOKEN, &agent(2)).await.unwrap());
    assert!(!store.enroll_agent(TOKEN, &agent(3)).await.unwrap());
    assert!(store.agent_credential(&agent(3).id).await.unwrap().is_none());
    let token = store.enroll_token(TOKEN).await.unwrap().unwrap();
    assert_eq!((token.uses_left, token.uses_total), (0, 2));
    assert!(!store.enroll_agent("00000000000000cc", &agent(4)).await.unwrap(), "no such token");
}

pub(crate) async fn an_expired_enrollment_token_enrolls_nobody(store: Arc<dyn Store>) {
    store.insert_enroll_token(&enroll_token(5, 500)).await.unwrap();
    assert!(!store.enroll_agent(TOKEN, &agent(1)).await.unwrap());
    let at = |n: u8, ms: i64| {
        let mut a = agent(n);
        a.at = ts(ms);
        a
    };
    assert!(!store.enroll_agent(TOKEN, &at(2, 500)).await.unwrap(), "expired at its expiry");
    assert!(store.enroll_agent(TOKEN, &at(3, 499)).await.unwrap(), "valid until then");
    assert!(store.agent(&agent(1).id).await.unwrap().is_none());
    assert_eq!(store.enroll_token(TOKEN).await.unwrap().unwrap().uses_left, 4);
}

pub(crate) async fn enrolling_creates_an_offline_agent_with_the_tokens_labels_and_its_approval(store: Arc<dyn Store>) {
    store.insert_enroll_token(&enroll_token(5, 10_000)).await.unwrap();
    let a = agent(1);
    let mut pending = agent(2);
    pending.approval_pending = true;
    pending.token_labels = Labels::from_pairs(["site=lab", "role=db"]).unwrap();
    assert!(store.enroll_agent(TOKEN, &a).await.unwrap());
    assert!(store.enroll_agent(TOKEN, &pending).await.unwrap());

    let cred = store.agent_credential(&a.id).await.unwrap().unwrap();
    assert_eq!(cred.id, a.id);
    assert_eq!(cred.secret_hash, a.secret_hash);
    assert_eq!(cred.pending_secret_hash, None);
    assert_eq!(cred.token_labels, a.token_labels);
    assert!(!cred.revoked && !cred.rotation_requested && !cred.approval_pending);
    assert!(store.agent_credential(&pending.id).await.unwrap().unwrap().approval_pending);

    let row = store.agent(&a.id).await.unwrap().unwrap();
    assert_eq!((row.status, row.status_since, row.enrolled_at), (AgentStatus::Offline, a.at, a.at));
    assert_eq!(row.labels, a.token_labels, "until it connects, the token's labels are its labels");
    assert_eq!(row.credential_issued_at, a.at, "its credential was issued at enrollment");
    assert!(!row.connected && !row.approval_pending);
    assert!(row.revoked_at.is_none() && row.last_heartbeat_at.is_none() && row.last_metrics.is_none());
    assert!(row.rotation_requested_at.is_none() && row.clone_seen.is_none() && row.trusted_keys.is_empty());
    let waiting = store.agent(&pending.id).await.unwrap().unwrap();
    assert!(waiting.approval_pending);
    assert_eq!(waiting.labels, pending.token_labels);
}

/// Enrolling an id that exists spends nothing and leaves the agent that has it alone.
pub(crate) async fn an_agent_id_enrolled_twice_takes_no_second_use(store: Arc<dyn Store>) {
    store.insert_enroll_token(&enroll_token(5, 10_000)).await.unwrap();
    let a = agent(1);
    assert!(store.enroll_agent(TOKEN, &a).await.unwrap());
    let mut twin = agent(1);
    twin.secret_hash = vec![9; 32];
    let again = store.enroll_agent(TOKEN, &twin).await;
    assert!(matches!(again, Ok(false) | Err(StoreError::Duplicate)), "{again:?}");
    assert_eq!(store.enroll_token(TOKEN).await.unwrap().unwrap().uses_left, 4, "the failed enrollment took no use");
    assert_eq!(store.agent_credential(&a.id).await.unwrap().unwrap().secret_hash, a.secret_hash);
}

pub(crate) async fn concurrent_enrollments_take_exactly_the_tokens_uses(store: Arc<dyn Store>) {
    store.insert_enroll_token(&enroll_token(5, 10_000)).await.unwrap();
    let tasks: Vec<_> = (1..=20u8)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { (n, store.enroll_agent(TOKEN, &agent(n)).await.unwrap()) })
        })
        .collect();
    let mut enrolled = Vec::new();
    for t in tasks {
        if let (n, true) = t.await.unwrap() {
            enrolled.push(agent(n).id);
        }
    }
    assert_eq!(enrolled.len(), 5, "exactly the token's uses");
    assert_eq!(store.enroll_token(TOKEN).await.unwrap().unwrap().uses_left, 0);
    let mut stored: Vec<_> = store.list_agents(None).await.unwrap().into_iter().map(|r| r.id).collect();
    stored.sort();
    enrolled.sort();
    assert_eq!(stored, enrolled, "an agent exists exactly when its enrollment said so");
}

pub(crate) async fn concurrent_enrollments_of_one_agent_take_one_use(store: Arc<dyn Store>) {
    store.insert_enroll_token(&enroll_token(5, 10_000)).await.unwrap();
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.enroll_agent(TOKEN, &agent(1)).await })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(true) => won += 1,
            Ok(false) | Err(StoreError::Duplicate) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(store.enroll_token(TOKEN).await.unwrap().unwrap().uses_left, 4);
    assert_eq!(store.list_agents(None).await.unwrap().len(), 1);
}
