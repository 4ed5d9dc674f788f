//! Labels edited by operators, and the labels the dispatcher checks a scoped job's runs against.

use std::collections::HashMap;

use shared::{AgentId, Labels};
use sqlx::PgPool;

use super::id_array;
use crate::store::Result;
use crate::store::rows::{labels_json, parse_agent_id, parse_labels};

pub(super) async fn set_agent_labels(
    pool: &PgPool,
    id: &AgentId,
    expected: &Labels,
    token_labels: &Labels,
    labels: &Labels,
) -> Result<bool> {
    // Concurrency: compare and set in one update. Of two edits from the same labels, the
    // second waits for the first's commit, finds `token_labels` changed, and changes nothing.
    let done = sqlx::query("UPDATE agents SET token_labels = $1, labels = $2 WHERE id = $3 AND revoked_at IS NULL AND token_labels = $4")
        .bind(labels_json(token_labels))
        .bind(labels_json(labels))
        .bind(id.as_str())
        .bind(labels_json(expected))
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn agent_labels(pool: &PgPool, ids: &[AgentId]) -> Result<HashMap<AgentId, Labels>> {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT id, labels FROM agents WHERE revoked_at IS NULL AND id = ANY($1)")
        .bind(id_array(ids))
        .fetch_all(pool)
        .await?;
    rows.into_iter().map(|(id, labels)| Ok((parse_agent_id(&id)?, parse_labels(&labels)?))).collect()
}
