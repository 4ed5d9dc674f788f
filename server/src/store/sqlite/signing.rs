//! Signed jobs' agent lists and fleet-wide key revocations.

use shared::signing::{KeyRevocation, PublicKey, Signature};
use shared::{AgentId, Timestamp};
use sqlx::SqlitePool;

use crate::store::{Result, StoreError};

pub(super) async fn signed_agents(pool: &SqlitePool, job_id: &str) -> Result<Vec<AgentId>> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT agents FROM job_signed_agents WHERE job_id = ?").bind(job_id).fetch_optional(pool).await?;
    let Some((list,)) = row else { return Ok(Vec::new()) };
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| AgentId::parse(s).map_err(|e| StoreError::Corrupt(format!("job {job_id} signed agents: {e}"))))
        .collect()
}

pub(super) async fn insert_key_revocation(pool: &SqlitePool, r: &KeyRevocation, at: Timestamp, by: &str) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO key_revocations (key, by_key, signature, created_at, created_by) VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
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

pub(super) async fn key_revocations(pool: &SqlitePool) -> Result<Vec<KeyRevocation>> {
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT key, by_key, signature FROM key_revocations ORDER BY created_at, key").fetch_all(pool).await?;
    rows.into_iter()
        .map(|(key, by, sig)| {
            let corrupt = |what: &str| StoreError::Corrupt(format!("key revocation {key}: {what}"));
            let signature: Signature = serde_json::from_value(serde_json::Value::String(sig.clone())).map_err(|_| corrupt("signature"))?;
            Ok(KeyRevocation {
                key: PublicKey::parse(&key).map_err(|_| corrupt("key"))?,
                by: PublicKey::parse(&by).map_err(|_| corrupt("by"))?,
                signature,
            })
        })
        .collect()
}
