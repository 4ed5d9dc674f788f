//! The operator keys each agent reported trusting in its `hello` (`agents.trusted_keys`, a JSON
//! array of `ed25519:<hex>`): written with the connection, read for agent pages and dry runs.

use std::collections::HashMap;

use shared::AgentId;
use shared::signing::PublicKey;
use sqlx::SqlitePool;

use super::parse_agent_id;
use crate::store::Result;
pub(super) use crate::store::rows::keys_json;
use crate::store::rows::parse_keys;

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
