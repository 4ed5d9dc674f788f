//! The operator keys each agent reported trusting in its `hello` (`agents.trusted_keys`, a JSON
//! array of `ed25519:<hex>`): written with the connection, read for agent pages and dry runs.

use std::collections::HashMap;

use shared::AgentId;
use shared::signing::PublicKey;
use sqlx::PgPool;

use super::id_array;
use crate::store::Result;
use crate::store::rows::{parse_agent_id, parse_keys};

/// The reported keys of those of `ids` that reported any (unrevoked agents only).
pub(super) async fn agent_trusted_keys(pool: &PgPool, ids: &[AgentId]) -> Result<HashMap<AgentId, Vec<PublicKey>>> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT id, trusted_keys FROM agents WHERE revoked_at IS NULL AND trusted_keys != '[]' AND id = ANY($1)")
            .bind(id_array(ids))
            .fetch_all(pool)
            .await?;
    rows.into_iter().map(|(id, keys)| Ok((parse_agent_id(&id)?, parse_keys(&keys)?))).collect()
}
