//! The audit log's SQL: appending to the hash chain, reading it page by page, and retention
//! (of the audit log, and of finished jobs with their runs and output).
//!
//! **Invariant:** an entry is appended in one `BEGIN IMMEDIATE` transaction that reads the
//! chain's head (`audit_head`), inserts the entry with the next id and the hash linking it to
//! the head, and moves the head. SQLite takes its write lock at `BEGIN IMMEDIATE`, so appends
//! from several processes sharing the file are serialized and form one chain. (PostgreSQL:
//! `SELECT id, hash FROM audit_head WHERE one = 1 FOR UPDATE` in the same transaction as the
//! insert and the head's update; see docs/audit.md.)

use shared::Timestamp;
use shared::audit::GENESIS_PREV;
use sqlx::{QueryBuilder, Sqlite};

use super::{SqliteStore, push_in_list, to_i64};
use crate::store::rows::{self, AuditDb};
use crate::store::{AuditEntry, AuditQuery, Result, StoreError};

type Tx<'a> = sqlx::Transaction<'a, Sqlite>;

/// Appends `entries` to the chain inside `tx` (which must hold the write lock: `BEGIN
/// IMMEDIATE`), writing the genesis entry first if the chain has not begun. Returns what was
/// written, in order.
async fn append(tx: &mut Tx<'_>, entries: &[AuditEntry]) -> Result<Vec<shared::api::AuditEntry>> {
    let head: Option<(i64, String)> = sqlx::query_as("SELECT id, hash FROM audit_head WHERE one = 1").fetch_optional(&mut **tx).await?;
    let (head_id, mut last_hash) = head.ok_or_else(|| StoreError::Corrupt("the audit chain has no head row".into()))?;
    // Past every row too: one written without the head (an older binary) must not be collided with.
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
            "INSERT INTO audit_log (id, at, actor, address, action, target, detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
    sqlx::query("UPDATE audit_head SET id = ?, hash = ? WHERE one = 1").bind(last_id).bind(&last_hash).execute(&mut **tx).await?;
    Ok(written)
}

impl SqliteStore {
    pub(super) async fn audit_append(&self, entry: &AuditEntry) -> Result<Vec<shared::api::AuditEntry>> {
        let _gate = self.writer().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let written = append(&mut tx, std::slice::from_ref(entry)).await?;
        tx.commit().await?;
        Ok(written)
    }

    pub(super) async fn audit_page(&self, q: &AuditQuery) -> Result<Vec<shared::api::AuditEntry>> {
        let mut b: QueryBuilder<Sqlite> =
            QueryBuilder::new("SELECT id, at, actor, address, action, target, detail, prev_hash, hash FROM audit_log WHERE 1 = 1");
        if let Some(before) = q.before {
            b.push(" AND id < ").push_bind(to_i64(before));
        }
        if let Some(actor) = &q.actor {
            // The whole actor, or the id in its parentheses: `alice (0123...)` is found by either.
            b.push(" AND (actor = ").push_bind(actor.clone());
            b.push(" OR substr(actor, -length(")
                .push_bind(actor.clone())
                .push(") - 2) = '(' || ")
                .push_bind(actor.clone())
                .push(" || ')')");
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
        let rows: Vec<AuditDb> = b.build_query_as().fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// Removes up to `max_rows` of the oldest entries, all older than `before`, and appends an
    /// `audit.pruned` entry naming the last one removed, in one transaction: the oldest kept
    /// entry links to exactly the hash the pruning entry records.
    pub(super) async fn audit_prune(&self, before: Timestamp, max_rows: u32, now: Timestamp) -> Result<Vec<shared::api::AuditEntry>> {
        let _gate = self.writer().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        // Only a prefix of the chain is ever removed: up to the first entry that is to be kept.
        let (first_kept,): (Option<i64>,) =
            sqlx::query_as("SELECT MIN(id) FROM audit_log WHERE at >= ?").bind(before.unix_millis()).fetch_one(&mut *tx).await?;
        let (cut,): (Option<i64>,) = sqlx::query_as("SELECT MAX(id) FROM (SELECT id FROM audit_log WHERE id < ? ORDER BY id LIMIT ?)")
            .bind(first_kept.unwrap_or(i64::MAX))
            .bind(i64::from(max_rows))
            .fetch_one(&mut *tx)
            .await?;
        let Some(cut) = cut else {
            return Ok(Vec::new());
        };
        let (cut_hash,): (Option<String>,) =
            sqlx::query_as("SELECT hash FROM audit_log WHERE id = ?").bind(cut).fetch_one(&mut *tx).await?;
        let removed = sqlx::query("DELETE FROM audit_log WHERE id <= ?").bind(cut).execute(&mut *tx).await?.rows_affected();
        let entry = rows::pruned_entry(now, before, removed, cut, cut_hash);
        let written = append(&mut tx, std::slice::from_ref(&entry)).await?;
        tx.commit().await?;
        Ok(written)
    }

    /// Deletes up to `max_jobs` jobs that finished before `before`, with their runs and output.
    /// Jobs not finished have no `finished_at` and are never chosen.
    pub(super) async fn jobs_prune(&self, before: Timestamp, max_jobs: u32) -> Result<u64> {
        let _gate = self.writer().await;
        let mut tx = self.pool.begin().await?;
        let ids: Vec<(String,)> =
            sqlx::query_as("SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ? ORDER BY finished_at, id LIMIT ?")
                .bind(before.unix_millis())
                .bind(i64::from(max_jobs))
                .fetch_all(&mut *tx)
                .await?;
        if ids.is_empty() {
            return Ok(0);
        }
        let ids: Vec<String> = ids.into_iter().map(|(id,)| id).collect();
        for (head, tail) in [
            ("DELETE FROM run_output WHERE run_id IN (SELECT id FROM runs WHERE job_id IN ", ")"),
            ("DELETE FROM runs WHERE job_id IN ", ""),
            ("DELETE FROM jobs WHERE id IN ", ""),
        ] {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(head);
            push_in_list(&mut q, &ids);
            q.push(tail);
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(ids.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    //! What only SQLite shows: rows from before the chain, and rows changed behind the store's
    //! back. The chain's guarantees are checked for every backend in `conformance::audit`.

    use shared::audit::{Break, GENESIS, Start};

    use super::super::tests::open;
    use crate::store::Store;
    use crate::store::conformance::audit::{all, entry, verify};

    #[tokio::test]
    async fn entries_form_one_chain_that_starts_with_a_genesis_after_older_unchained_rows() {
        let (_dir, store) = open().await;
        // Rows written before the chain existed.
        for _ in 0..2 {
            sqlx::query("INSERT INTO audit_log (at, actor, action, target, detail) VALUES (1, 'old', 'token.create', NULL, '{}')")
                .execute(&store.pool)
                .await
                .unwrap();
        }
        let first = store.audit(&entry(10, "token.create")).await.unwrap();
        assert_eq!(first.iter().map(|e| (e.id, e.action.as_str())).collect::<Vec<_>>(), [(3, GENESIS), (4, "token.create")]);
        assert_eq!(first[0].detail, serde_json::json!({ "unchained_entries": 2, "last_unchained_id": 2 }));
        for n in 0..5 {
            store.audit(&entry(20 + n, "token.revoke")).await.unwrap();
        }
        let s = verify(&store).await.unwrap();
        assert_eq!((s.entries, s.head_id, s.oldest_id, s.start, s.unchained), (7, 9, 3, Start::Genesis, 2));
        // What the store returned is what it holds.
        assert_eq!(all(&store).await.iter().find(|e| e.id == 4), Some(&first[1]));
    }

    #[tokio::test]
    async fn a_changed_or_removed_row_breaks_the_chain() {
        let (_dir, store) = open().await;
        for n in 0..5 {
            store.audit(&entry(n, "token.create")).await.unwrap();
        }
        sqlx::query("UPDATE audit_log SET detail = '{\"at\":2,\"text\":\"changed\"}' WHERE id = 4").execute(&store.pool).await.unwrap();
        assert_eq!(verify(&store).await, Err(Break::Altered { id: 4 }));
        let (_dir, store) = open().await;
        for n in 0..5 {
            store.audit(&entry(n, "token.create")).await.unwrap();
        }
        sqlx::query("DELETE FROM audit_log WHERE id = 3").execute(&store.pool).await.unwrap();
        assert!(matches!(verify(&store).await, Err(Break::Link { newer: 4, older: 2, .. })));
    }
}
