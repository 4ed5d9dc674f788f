//! What only the SQLite store can show: how output and retention leave the rows of its file.
//! Everything the `Store` trait promises is checked for every backend by the conformance suite
//! (`crate::store::conformance`), whose fixtures these tests use too.

use std::sync::Arc;

use super::*;
use crate::store::conformance;

/// A store in a temporary directory, as the server keeps it.
pub(super) async fn open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
    (dir, store)
}

#[tokio::test]
async fn output_is_stored_once_in_few_rows_whatever_the_offsets() {
    let (_dir, store) = open().await;
    conformance::output::output_is_stored_once_within_the_limit_whatever_the_offsets(Arc::new(store.clone())).await;
    let stored: i64 = sqlx::query_scalar("SELECT SUM(length(data)) FROM run_output").fetch_one(&store.pool).await.unwrap();
    assert_eq!(stored, 8 * 1024, "each byte once, none past the limit");
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM run_output").fetch_one(&store.pool).await.unwrap();
    assert_eq!(rows, 1, "appends extend the last small row instead of adding rows");
}

#[tokio::test]
async fn retention_deletes_the_output_rows_of_the_jobs_it_removes() {
    let (_dir, store) = open().await;
    conformance::audit::retention_removes_old_finished_jobs_with_their_runs_and_output_and_keeps_open_ones(Arc::new(store.clone())).await;
    // Of the three jobs with output, only the open one is left, with its one row.
    let (rows,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM run_output").fetch_one(&store.pool).await.unwrap();
    assert_eq!(rows, 1);
    let (run,): (String,) = sqlx::query_as("SELECT run_id FROM run_output").fetch_one(&store.pool).await.unwrap();
    assert_eq!(run, "r00000000000000a3");
}
