//! Signed jobs' agent lists and fleet-wide key revocations.

use shared::signing::KeyRevocation;
use shared::{AgentId, Timestamp};
use sqlx::PgPool;

use crate::store::Result;
use crate::store::rows;

pub(super) async fn signed_agents(pool: &PgPool, job_id: &str) -> Result<Vec<AgentId>> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT agents FROM job_signed_agents WHERE job_id = $1").bind(job_id).fetch_optional(pool).await?;
    let Some((list,)) = row else { return Ok(Vec::new()) };
    rows::parse_signed_agents(job_id, &list)
}

pub(super) async fn insert_key_revocation(pool: &PgPool, r: &KeyRevocation, at: Timestamp, by: &str) -> Result<bool> {
    // Concurrency: two servers storing the same revocation at once: ON CONFLICT makes the
    // second insert nothing (and say so) instead of failing.
    let done = sqlx::query(
        "INSERT INTO key_revocations (key, by_key, signature, created_at, created_by) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (key) DO NOTHING",
    )
    .bind(r.key.to_string())
    .bind(r.by.to_string())
    .bind(shared::signing::to_hex(&r.signature.0))
    .bind(at.unix_millis())
    .bind(by)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn key_revocations(pool: &PgPool) -> Result<Vec<KeyRevocation>> {
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT key, by_key, signature FROM key_revocations ORDER BY created_at, key").fetch_all(pool).await?;
    rows.into_iter().map(rows::key_revocation).collect()
}
