//! Labels edited by operators, and the labels the dispatcher checks a scoped job's runs against.

use std::collections::HashMap;

use shared::{AgentId, Labels};
use sqlx::SqlitePool;

use super::{labels_json, parse_agent_id, parse_labels};
use crate::store::Result;

pub(super) async fn set_agent_labels(
    pool: &SqlitePool,
    id: &AgentId,
    expected: &Labels,
    token_labels: &Labels,
    labels: &Labels,
) -> Result<bool> {
    let done = sqlx::query("UPDATE agents SET token_labels = ?, labels = ? WHERE id = ? AND revoked_at IS NULL AND token_labels = ?")
        .bind(labels_json(token_labels))
        .bind(labels_json(labels))
        .bind(id.as_str())
        .bind(labels_json(expected))
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn agent_labels(pool: &SqlitePool, ids: &[AgentId]) -> Result<HashMap<AgentId, Labels>> {
    let list: Vec<&str> = ids.iter().map(AgentId::as_str).collect();
    let json = serde_json::to_string(&list).unwrap_or_else(|_| "[]".into());
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT id, labels FROM agents WHERE revoked_at IS NULL AND id IN (SELECT value FROM json_each(?))")
            .bind(json)
            .fetch_all(pool)
            .await?;
    rows.into_iter().map(|(id, labels)| Ok((parse_agent_id(&id)?, parse_labels(&labels)?))).collect()
}
