//! Operator and enrollment tokens, and enrolling an agent with one.

use shared::Timestamp;
use sqlx::PgPool;

use crate::store::rows::{ApiTokenDb, EnrollTokenDb, labels_json};
use crate::store::{ApiTokenRow, EnrollTokenRow, NewAgent, Result};

pub(super) async fn insert_api_token(pool: &PgPool, r: &ApiTokenRow) -> Result<()> {
    sqlx::query(
        "INSERT INTO api_tokens (id, name, role, secret_hash, created_by, created_at, expires_at, scope) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&r.id)
    .bind(&r.name)
    .bind(r.role.as_str())
    .bind(&r.secret_hash)
    .bind(&r.created_by)
    .bind(r.created_at.unix_millis())
    .bind(r.expires_at.map(Timestamp::unix_millis))
    .bind(r.scope.as_ref().map(ToString::to_string))
    .execute(pool)
    .await?;
    Ok(())
}

pub(super) async fn api_token(pool: &PgPool, id: &str) -> Result<Option<ApiTokenRow>> {
    let row: Option<ApiTokenDb> = sqlx::query_as("SELECT * FROM api_tokens WHERE id = $1").bind(id).fetch_optional(pool).await?;
    row.map(ApiTokenRow::try_from).transpose()
}

pub(super) async fn list_api_tokens(pool: &PgPool) -> Result<Vec<ApiTokenRow>> {
    let rows: Vec<ApiTokenDb> = sqlx::query_as("SELECT * FROM api_tokens ORDER BY created_at, id").fetch_all(pool).await?;
    rows.into_iter().map(ApiTokenRow::try_from).collect()
}

pub(super) async fn touch_api_token(pool: &PgPool, id: &str, at: Timestamp) -> Result<()> {
    sqlx::query("UPDATE api_tokens SET last_used_at = $1 WHERE id = $2").bind(at.unix_millis()).bind(id).execute(pool).await?;
    Ok(())
}

pub(super) async fn insert_enroll_token(pool: &PgPool, r: &EnrollTokenRow) -> Result<()> {
    sqlx::query(
        "INSERT INTO enroll_tokens (id, secret_hash, created_by, created_at, expires_at, uses_total, uses_left, labels, approve) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&r.id)
    .bind(&r.secret_hash)
    .bind(&r.created_by)
    .bind(r.created_at.unix_millis())
    .bind(r.expires_at.unix_millis())
    .bind(i64::from(r.uses_total))
    .bind(i64::from(r.uses_left))
    .bind(labels_json(&r.labels))
    .bind(r.approve)
    .execute(pool)
    .await?;
    Ok(())
}

pub(super) async fn enroll_token(pool: &PgPool, id: &str) -> Result<Option<EnrollTokenRow>> {
    let row: Option<EnrollTokenDb> = sqlx::query_as("SELECT * FROM enroll_tokens WHERE id = $1").bind(id).fetch_optional(pool).await?;
    row.map(EnrollTokenRow::try_from).transpose()
}

pub(super) async fn list_enroll_tokens(pool: &PgPool) -> Result<Vec<EnrollTokenRow>> {
    let rows: Vec<EnrollTokenDb> = sqlx::query_as("SELECT * FROM enroll_tokens ORDER BY created_at, id").fetch_all(pool).await?;
    rows.into_iter().map(EnrollTokenRow::try_from).collect()
}

pub(super) async fn enroll_agent(pool: &PgPool, token_id: &str, agent: &NewAgent) -> Result<bool> {
    let mut tx = pool.begin().await?;
    // Concurrency: the use is taken by a guarded decrement. Two servers enrolling with the
    // token's last use both run it; the second waits for the first to commit, re-checks
    // `uses_left > 0` on the row as it is then, and takes nothing. The agent's row is inserted
    // in the same transaction, so a failed insert gives the use back.
    let taken = sqlx::query(
        "UPDATE enroll_tokens SET uses_left = uses_left - 1 \
         WHERE id = $1 AND uses_left > 0 AND revoked_at IS NULL AND expires_at > $2",
    )
    .bind(token_id)
    .bind(agent.at.unix_millis())
    .execute(&mut *tx)
    .await?;
    if taken.rows_affected() != 1 {
        return Ok(false);
    }
    let labels = labels_json(&agent.token_labels);
    sqlx::query(
        "INSERT INTO agents (id, secret_hash, enroll_token_id, enrolled_at, hostname, token_labels, labels, status, status_since, \
         approval_pending) VALUES ($1, $2, $3, $4, '', $5, $5, 'offline', $4, $6)",
    )
    .bind(agent.id.as_str())
    .bind(&agent.secret_hash)
    .bind(token_id)
    .bind(agent.at.unix_millis())
    .bind(&labels)
    .bind(agent.approval_pending)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}
