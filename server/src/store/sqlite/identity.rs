//! Agent identity over time: credential rotation, the retired credentials that mark a clone,
//! and approval of agents enrolled with an `approve` token.

use shared::{AgentId, Timestamp};
use sqlx::SqlitePool;

pub use crate::store::RETIRED_KEPT;
use crate::store::{Acceptance, Result};

pub(super) async fn begin_rotation(pool: &SqlitePool, id: &AgentId, pending_hash: &[u8], at: Timestamp, gap_ms: u64) -> Result<bool> {
    let earliest = at.unix_millis().saturating_sub(i64::try_from(gap_ms).unwrap_or(i64::MAX));
    let done = sqlx::query(
        "UPDATE agents SET pending_secret_hash = ?, pending_issued_at = ? \
         WHERE id = ? AND revoked_at IS NULL AND (pending_issued_at IS NULL OR pending_issued_at <= ?) \
         AND (credential_issued_at IS NULL OR credential_issued_at <= ?)",
    )
    .bind(pending_hash)
    .bind(at.unix_millis())
    .bind(id.as_str())
    .bind(earliest)
    .bind(earliest)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn complete_rotation(pool: &SqlitePool, id: &AgentId, pending_hash: &[u8], at: Timestamp) -> Result<bool> {
    let mut tx = pool.begin().await?;
    let old: Option<(Vec<u8>,)> =
        sqlx::query_as("SELECT secret_hash FROM agents WHERE id = ? AND revoked_at IS NULL AND pending_secret_hash = ?")
            .bind(id.as_str())
            .bind(pending_hash)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((old,)) = old else { return Ok(false) };
    sqlx::query(
        "UPDATE agents SET secret_hash = pending_secret_hash, pending_secret_hash = NULL, pending_issued_at = NULL, \
         credential_issued_at = ?, rotation_requested_at = NULL WHERE id = ?",
    )
    .bind(at.unix_millis())
    .bind(id.as_str())
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT OR IGNORE INTO agent_retired_credentials (agent_id, secret_hash, retired_at) VALUES (?, ?, ?)")
        .bind(id.as_str())
        .bind(&old)
        .bind(at.unix_millis())
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "DELETE FROM agent_retired_credentials WHERE agent_id = ? AND secret_hash NOT IN \
         (SELECT secret_hash FROM agent_retired_credentials WHERE agent_id = ? ORDER BY retired_at DESC, secret_hash DESC LIMIT ?)",
    )
    .bind(id.as_str())
    .bind(id.as_str())
    .bind(RETIRED_KEPT)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

pub(super) async fn retired_credentials(pool: &SqlitePool, id: &AgentId) -> Result<Vec<Vec<u8>>> {
    let rows: Vec<(Vec<u8>,)> = sqlx::query_as("SELECT secret_hash FROM agent_retired_credentials WHERE agent_id = ? ORDER BY secret_hash")
        .bind(id.as_str())
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(|(h,)| h).collect())
}

pub(super) async fn clone_seen(pool: &SqlitePool, id: &AgentId, at: Timestamp, from: &str) -> Result<()> {
    sqlx::query("UPDATE agents SET clone_seen_at = ?, clone_seen_from = ? WHERE id = ?")
        .bind(at.unix_millis())
        .bind(from)
        .bind(id.as_str())
        .execute(pool)
        .await?;
    Ok(())
}

pub(super) async fn request_rotation(pool: &SqlitePool, id: &AgentId, at: Timestamp) -> Result<bool> {
    let done =
        sqlx::query("UPDATE agents SET rotation_requested_at = COALESCE(rotation_requested_at, ?) WHERE id = ? AND revoked_at IS NULL")
            .bind(at.unix_millis())
            .bind(id.as_str())
            .execute(pool)
            .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn accept_agent(pool: &SqlitePool, id: &AgentId, at: Timestamp, by: &str) -> Result<Acceptance> {
    let done = sqlx::query(
        "UPDATE agents SET approval_pending = 0, accepted_at = ?, accepted_by = ? \
         WHERE id = ? AND revoked_at IS NULL AND approval_pending = 1",
    )
    .bind(at.unix_millis())
    .bind(by)
    .bind(id.as_str())
    .execute(pool)
    .await?;
    if done.rows_affected() == 1 {
        return Ok(Acceptance::Accepted);
    }
    let exists: Option<(i64,)> =
        sqlx::query_as("SELECT 1 FROM agents WHERE id = ? AND revoked_at IS NULL").bind(id.as_str()).fetch_optional(pool).await?;
    Ok(if exists.is_some() { Acceptance::NotPending } else { Acceptance::Unknown })
}
