//! Agent identity over time: credential rotation, the retired credentials that mark a clone,
//! and approval of agents enrolled with an `approve` token.

use shared::{AgentId, Timestamp};
use sqlx::PgPool;

use crate::store::{Acceptance, RETIRED_KEPT, Result};

pub(super) async fn begin_rotation(pool: &PgPool, id: &AgentId, pending_hash: &[u8], at: Timestamp, gap_ms: u64) -> Result<bool> {
    let earliest = at.unix_millis().saturating_sub(i64::try_from(gap_ms).unwrap_or(i64::MAX));
    // Concurrency: the gap is a guard of this one update. Two servers issuing at once: the
    // second waits for the first's commit, re-checks `pending_issued_at <= earliest` on the row
    // the first wrote, and issues nothing, so the gap holds across servers.
    let done = sqlx::query(
        "UPDATE agents SET pending_secret_hash = $1, pending_issued_at = $2 \
         WHERE id = $3 AND revoked_at IS NULL AND (pending_issued_at IS NULL OR pending_issued_at <= $4) \
         AND (credential_issued_at IS NULL OR credential_issued_at <= $4)",
    )
    .bind(pending_hash)
    .bind(at.unix_millis())
    .bind(id.as_str())
    .bind(earliest)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn complete_rotation(pool: &PgPool, id: &AgentId, pending_hash: &[u8], at: Timestamp) -> Result<bool> {
    let mut tx = pool.begin().await?;
    // Concurrency: the agent's row is locked as the pending credential is checked, so it
    // cannot change before it is made current: a second completion waits and then finds no
    // pending credential, and a new issue cannot replace the one being completed.
    let old: Option<(Vec<u8>,)> =
        sqlx::query_as("SELECT secret_hash FROM agents WHERE id = $1 AND revoked_at IS NULL AND pending_secret_hash = $2 FOR UPDATE")
            .bind(id.as_str())
            .bind(pending_hash)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((old,)) = old else { return Ok(false) };
    sqlx::query(
        "UPDATE agents SET secret_hash = pending_secret_hash, pending_secret_hash = NULL, pending_issued_at = NULL, \
         credential_issued_at = $1, rotation_requested_at = NULL WHERE id = $2",
    )
    .bind(at.unix_millis())
    .bind(id.as_str())
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO agent_retired_credentials (agent_id, secret_hash, retired_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
        .bind(id.as_str())
        .bind(&old)
        .bind(at.unix_millis())
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "DELETE FROM agent_retired_credentials WHERE agent_id = $1 AND secret_hash NOT IN \
         (SELECT secret_hash FROM agent_retired_credentials WHERE agent_id = $1 ORDER BY retired_at DESC, secret_hash DESC LIMIT $2)",
    )
    .bind(id.as_str())
    .bind(RETIRED_KEPT)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

pub(super) async fn retired_credentials(pool: &PgPool, id: &AgentId) -> Result<Vec<Vec<u8>>> {
    // BYTEA orders by bytes, as SQLite's BLOB does.
    let rows: Vec<(Vec<u8>,)> =
        sqlx::query_as("SELECT secret_hash FROM agent_retired_credentials WHERE agent_id = $1 ORDER BY secret_hash")
            .bind(id.as_str())
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().map(|(h,)| h).collect())
}

pub(super) async fn clone_seen(pool: &PgPool, id: &AgentId, at: Timestamp, from: &str) -> Result<()> {
    sqlx::query("UPDATE agents SET clone_seen_at = $1, clone_seen_from = $2 WHERE id = $3")
        .bind(at.unix_millis())
        .bind(from)
        .bind(id.as_str())
        .execute(pool)
        .await?;
    Ok(())
}

pub(super) async fn request_rotation(pool: &PgPool, id: &AgentId, at: Timestamp) -> Result<bool> {
    let done =
        sqlx::query("UPDATE agents SET rotation_requested_at = COALESCE(rotation_requested_at, $1) WHERE id = $2 AND revoked_at IS NULL")
            .bind(at.unix_millis())
            .bind(id.as_str())
            .execute(pool)
            .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn accept_agent(pool: &PgPool, id: &AgentId, at: Timestamp, by: &str) -> Result<Acceptance> {
    // Concurrency: guarded by `approval_pending`; of two admins accepting at once one does,
    // and the other is told the agent was not pending.
    let done = sqlx::query(
        "UPDATE agents SET approval_pending = FALSE, accepted_at = $1, accepted_by = $2 \
         WHERE id = $3 AND revoked_at IS NULL AND approval_pending",
    )
    .bind(at.unix_millis())
    .bind(by)
    .bind(id.as_str())
    .execute(pool)
    .await?;
    if done.rows_affected() == 1 {
        return Ok(Acceptance::Accepted);
    }
    let exists: Option<(bool,)> =
        sqlx::query_as("SELECT TRUE FROM agents WHERE id = $1 AND revoked_at IS NULL").bind(id.as_str()).fetch_optional(pool).await?;
    Ok(if exists.is_some() { Acceptance::NotPending } else { Acceptance::Unknown })
}
