//! The audit log's SQL: appending to the hash chain, reading it page by page, and retention
//! (of the audit log, and of finished jobs with their runs and output).
//!
//! **Invariant:** an entry is appended in one transaction that first locks the chain's head
//! (`SELECT id, hash FROM audit_head WHERE one = 1 FOR UPDATE`), inserts the entry with the
//! next id and the hash linking it to the head, and moves the head. Every other appender, on
//! this server or another, waits on that row lock until the commit and then reads the new
//! head, so two appends can never link to the same entry: the chain stays one line
//! (docs/audit.md). Pruning takes the same lock before it reads anything, so it removes a
//! prefix and appends its `audit.pruned` entry as one step of the chain.

use shared::Timestamp;
use shared::audit::GENESIS_PREV;
use sqlx::{PgPool, Postgres, QueryBuilder};

use crate::store::rows::{self, AuditDb, to_i64};
use crate::store::{AuditEntry, AuditQuery, Result, StoreError};

type Tx<'a> = sqlx::Transaction<'a, Postgres>;

/// Locks the chain's head for the rest of `tx` and returns it: `(id, hash)`.
async fn lock_head(tx: &mut Tx<'_>) -> Result<(i64, String)> {
    let head: Option<(i64, String)> =
        sqlx::query_as("SELECT id, hash FROM audit_head WHERE one = 1 FOR UPDATE").fetch_optional(&mut **tx).await?;
    head.ok_or_else(|| StoreError::Corrupt("the audit chain has no head row".into()))
}

/// Appends `entries` to the chain inside `tx`, which holds the head's lock (`head` is what
/// [`lock_head`] read), writing the genesis entry first if the chain has not begun. Returns
/// what was written, in order.
async fn append(tx: &mut Tx<'_>, head: (i64, String), entries: &[AuditEntry]) -> Result<Vec<shared::api::AuditEntry>> {
    let (head_id, mut last_hash) = head;
    // Past every row too, as in SQLite: an id is never taken twice.
    let (max_id,): (Option<i64>,) = sqlx::query_as("SELECT MAX(id) FROM audit_log").fetch_one(&mut **tx).await?;
    let mut last_id = head_id.max(max_id.unwrap_or(0));
    let mut written = Vec::with_capacity(entries.len() + 1);
    let genesis;
    let mut todo: Vec<&AuditEntry> = Vec::with_capacity(entries.len() + 1);
    if last_hash.is_empty() {
        let (unchained,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM audit_log WHERE hash IS NULL").fetch_one(&mut **tx).await?;
        genesis = rows::genesis_entry(entries.first(), unchained, last_id);
        todo.push(&genesis);
        last_hash = GENESIS_PREV.to_owned();
    }
    todo.extend(entries);
    for e in todo {
        let id = last_id + 1;
        let rows::Chained { detail, hash, entry } = rows::chain(id, e, &last_hash);
        sqlx::query(
            "INSERT INTO audit_log (id, at, actor, address, action, target, detail, prev_hash, hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(id)
        .bind(e.at.unix_millis())
        .bind(&e.actor)
        .bind(&e.address)
        .bind(&e.action)
        .bind(&e.target)
        .bind(&detail)
        .bind(&last_hash)
        .bind(&hash)
        .execute(&mut **tx)
        .await?;
        written.push(entry);
        last_id = id;
        last_hash = hash;
    }
    sqlx::query("UPDATE audit_head SET id = $1, hash = $2 WHERE one = 1").bind(last_id).bind(&last_hash).execute(&mut **tx).await?;
    Ok(written)
}

pub(super) async fn append_one(pool: &PgPool, entry: &AuditEntry) -> Result<Vec<shared::api::AuditEntry>> {
    let mut tx = pool.begin().await?;
    let head = lock_head(&mut tx).await?;
    let written = append(&mut tx, head, std::slice::from_ref(entry)).await?;
    tx.commit().await?;
    Ok(written)
}

pub(super) async fn page(pool: &PgPool, q: &AuditQuery) -> Result<Vec<shared::api::AuditEntry>> {
    let mut b: QueryBuilder<Postgres> =
        QueryBuilder::new("SELECT id, at, actor, address, action, target, detail, prev_hash, hash FROM audit_log WHERE TRUE");
    if let Some(before) = q.before {
        b.push(" AND id < ").push_bind(to_i64(before));
    }
    if let Some(actor) = &q.actor {
        // The whole actor, or the id in its parentheses: `alice (0123...)` is found by either.
        // `right` counts characters, as SQLite's `substr(actor, -n)` does.
        b.push(" AND (actor = ").push_bind(actor.clone());
        b.push(" OR right(actor, length(").push_bind(actor.clone()).push(") + 2) = '(' || ").push_bind(actor.clone()).push(" || ')')");
    }
    if let Some(action) = &q.action {
        // An exact action, or a family: `token` finds `token.create` and `token.revoke`.
        b.push(" AND (action = ").push_bind(action.clone());
        b.push(" OR substr(action, 1, length(").push_bind(action.clone()).push(") + 1) = ").push_bind(action.clone()).push(" || '.')");
    }
    if let Some(target) = &q.target {
        b.push(" AND target = ").push_bind(target.clone());
    }
    if let Some(since) = q.since {
        b.push(" AND at >= ").push_bind(since.unix_millis());
    }
    if let Some(until) = q.until {
        b.push(" AND at < ").push_bind(until.unix_millis());
    }
    b.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(q.limit));
    let rows: Vec<AuditDb> = b.build_query_as().fetch_all(pool).await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// Removes up to `max_rows` of the oldest entries, all older than `before`, and appends an
/// `audit.pruned` entry naming the last one removed, in one transaction: the oldest kept
/// entry links to exactly the hash the pruning entry records.
pub(super) async fn prune(pool: &PgPool, before: Timestamp, max_rows: u32, now: Timestamp) -> Result<Vec<shared::api::AuditEntry>> {
    let mut tx = pool.begin().await?;
    // Concurrency: the head is locked before the cut is chosen, so a second pruner (another
    // server's) waits and then chooses from what the first left, and no append slips between
    // the deletion and the pruning entry.
    let head = lock_head(&mut tx).await?;
    // Only a prefix of the chain is ever removed: up to the first entry that is to be kept.
    let (first_kept,): (Option<i64>,) =
        sqlx::query_as("SELECT MIN(id) FROM audit_log WHERE at >= $1").bind(before.unix_millis()).fetch_one(&mut *tx).await?;
    let (cut,): (Option<i64>,) = sqlx::query_as("SELECT MAX(id) FROM (SELECT id FROM audit_log WHERE id < $1 ORDER BY id LIMIT $2) AS p")
        .bind(first_kept.unwrap_or(i64::MAX))
        .bind(i64::from(max_rows))
        .fetch_one(&mut *tx)
        .await?;
    let Some(cut) = cut else {
        return Ok(Vec::new());
    };
    let (cut_hash,): (Option<String>,) = sqlx::query_as("SELECT hash FROM audit_log WHERE id = $1").bind(cut).fetch_one(&mut *tx).await?;
    let removed = sqlx::query("DELETE FROM audit_log WHERE id <= $1").bind(cut).execute(&mut *tx).await?.rows_affected();
    let entry = rows::pruned_entry(now, before, removed, cut, cut_hash);
    let written = append(&mut tx, head, std::slice::from_ref(&entry)).await?;
    tx.commit().await?;
    Ok(written)
}

/// Deletes up to `max_jobs` jobs that finished before `before`, with their runs and output.
/// Jobs not finished have no `finished_at` and are never chosen.
pub(super) async fn prune_jobs(pool: &PgPool, before: Timestamp, max_jobs: u32) -> Result<u64> {
    let mut tx = pool.begin().await?;
    // Concurrency: the chosen jobs stay locked until they are gone, and jobs another pruner
    // holds are skipped, so two servers pruning at once delete different jobs and each counts
    // only its own.
    let ids: Vec<(String,)> = sqlx::query_as(
        "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < $1 ORDER BY finished_at, id LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(before.unix_millis())
    .bind(i64::from(max_jobs))
    .fetch_all(&mut *tx)
    .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let ids: Vec<String> = ids.into_iter().map(|(id,)| id).collect();
    for sql in [
        "DELETE FROM run_output WHERE run_id IN (SELECT id FROM runs WHERE job_id = ANY($1))",
        "DELETE FROM runs WHERE job_id = ANY($1)",
        "DELETE FROM jobs WHERE id = ANY($1)",
    ] {
        sqlx::query(sql).bind(&ids).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(ids.len() as u64)
}
