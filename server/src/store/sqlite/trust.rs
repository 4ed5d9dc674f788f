//! The operator keys each agent reported trusting in its `hello` (`agents.trusted_keys`, a JSON
//! array of `ed25519:<hex>`): written with the connection, read for agent pages and dry runs.

use std::collections::HashMap;

use shared::AgentId;
use shared::signing::PublicKey;
use sqlx::SqlitePool;

use super::parse_agent_id;
use crate::store::{Result, StoreError};

pub(super) fn keys_json(keys: &[PublicKey]) -> String {
    serde_json::to_string(keys).unwrap_or_else(|_| "[]".into())
}

pub(super) fn parse_keys(json: &str) -> Result<Vec<PublicKey>> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("trusted_keys: {e}")))
}

/// The reported keys of those of `ids` that reported any (unrevoked agents only).
pub(super) async fn agent_trusted_keys(pool: &SqlitePool, ids: &[AgentId]) -> Result<HashMap<AgentId, Vec<PublicKey>>> {
    let list: Vec<&str> = ids.iter().map(AgentId::as_str).collect();
    let json = serde_json::to_string(&list).unwrap_or_else(|_| "[]".into());
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT id, trusted_keys FROM agents WHERE revoked_at IS NULL AND trusted_keys != '[]' \
         AND id IN (SELECT value FROM json_each(?))",
    )
    .bind(json)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|(id, keys)| Ok((parse_agent_id(&id)?, parse_keys(&keys)?))).collect()
}

#[cfg(test)]
mod tests {
    use super::super::tests::{connected, enrolled};
    use crate::store::{Record, Store};
    use shared::signing::PublicKey;

    #[tokio::test]
    async fn the_keys_an_agent_reports_are_kept_until_it_reports_others() {
        let (_dir, store, a) = enrolled().await;
        let row = store.agent(&a.id).await.unwrap().unwrap();
        assert!(row.trusted_keys.is_empty(), "an agent that never connected requires nothing");

        let keys = vec![PublicKey::from_bytes([7; 32]), PublicKey::from_bytes([8; 32])];
        let mut hello = connected(&a.id, 5_000);
        if let Record::Connected { trusted_keys, .. } = &mut hello {
            *trusted_keys = keys.clone();
        }
        store.record(&[hello]).await.unwrap();
        assert_eq!(store.agent(&a.id).await.unwrap().unwrap().trusted_keys, keys);
        let found = store.agent_trusted_keys(std::slice::from_ref(&a.id)).await.unwrap();
        assert_eq!(found.get(&a.id), Some(&keys));

        // Its owner took trusted_keys out of agent.toml: the next hello says so.
        store.record(&[connected(&a.id, 6_000)]).await.unwrap();
        assert!(store.agent(&a.id).await.unwrap().unwrap().trusted_keys.is_empty());
        assert!(store.agent_trusted_keys(std::slice::from_ref(&a.id)).await.unwrap().is_empty());
    }
}
