//! Output chunks into `run_output` on SQLite: the reads and writes of the shared
//! [`crate::store::batch::output`] plan.

use std::collections::{HashMap, HashSet};

use shared::job::{RunId, Stream};
use sqlx::{QueryBuilder, Sqlite};

use super::{ROWS_PER_STATEMENT, push_in_list, stream_code, to_i64, to_u64, update_from};
use crate::store::batch::output::{self, Chunk, InfoRow, OutputReads, RunInfo};
use crate::store::{Effect, Result};

/// Judges and stores a batch's output chunks, in order.
pub(super) async fn insert_outputs(tx: &mut sqlx::Transaction<'_, Sqlite>, chunks: &[Chunk<'_>], effects: &mut Vec<Effect>) -> Result<()> {
    if chunks.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = chunks.iter().map(|c| c.run_id.as_str()).collect::<HashSet<_>>().into_iter().collect();
    let mut runs = run_infos(tx, &ids).await?;
    let plan = output::plan(&mut Reads(tx), chunks, &mut runs, effects).await?;
    for chunk in plan.pieces.chunks(ROWS_PER_STATEMENT) {
        // A piece that extends a stored row replaces it (same key).
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new("INSERT OR REPLACE INTO run_output (run_id, stream, offset, data) ");
        q.push_values(chunk, |mut b, p| {
            b.push_bind(p.run_id.clone()).push_bind(i64::from(p.stream == 1)).push_bind(to_i64(p.offset)).push_bind(p.data.clone());
        });
        q.build().execute(&mut **tx).await?;
    }
    update_from(
        tx,
        "UPDATE runs SET stdout_held = v.column2, stdout_truncated = MAX(runs.stdout_truncated, v.column3), \
         stderr_held = v.column4, stderr_truncated = MAX(runs.stderr_truncated, v.column5)",
        "WHERE runs.id = v.column1",
        &plan.held,
        |b, (id, [out, err])| {
            b.push_bind(id.clone()).push_bind(to_i64(out.len)).push_bind(out.truncated).push_bind(to_i64(err.len)).push_bind(err.truncated);
        },
    )
    .await
}

async fn run_infos(tx: &mut sqlx::Transaction<'_, Sqlite>, ids: &[&str]) -> Result<HashMap<RunId, RunInfo>> {
    let mut out = HashMap::new();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT r.id, r.job_id, r.agent_id, j.output_limit, r.stdout_held, r.stdout_truncated, r.stderr_held, r.stderr_truncated, \
             r.state FROM runs r JOIN jobs j ON j.id = r.job_id WHERE r.id IN ",
        );
        push_in_list(&mut q, chunk);
        let rows: Vec<InfoRow> = q.build_query_as().fetch_all(&mut **tx).await?;
        out.extend(output::run_infos(rows)?);
    }
    Ok(out)
}

struct Reads<'t, 'c>(&'t mut sqlx::Transaction<'c, Sqlite>);

fn code(stream: usize) -> i64 {
    stream_code(if stream == 1 { Stream::Stderr } else { Stream::Stdout })
}

impl OutputReads for Reads<'_, '_> {
    async fn rows(&mut self, run_id: &str, stream: usize, from: u64, to: u64) -> Result<Vec<(u64, String)>> {
        // A bounded range of the primary key, not every row below `to`.
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT offset, data FROM run_output WHERE run_id = ?1 AND stream = ?2 AND offset < ?3 AND offset >= \
             COALESCE((SELECT MAX(offset) FROM run_output WHERE run_id = ?1 AND stream = ?2 AND offset <= ?4), 0) ORDER BY offset",
        )
        .bind(run_id)
        .bind(code(stream))
        .bind(to_i64(to))
        .bind(to_i64(from))
        .fetch_all(&mut **self.0)
        .await?;
        Ok(rows.into_iter().map(|(o, d)| (to_u64(o), d)).collect())
    }

    async fn last_row(&mut self, run_id: &str, stream: usize) -> Result<Option<(u64, String)>> {
        let row: Option<(i64, String)> =
            sqlx::query_as("SELECT offset, data FROM run_output WHERE run_id = ? AND stream = ? ORDER BY offset DESC LIMIT 1")
                .bind(run_id)
                .bind(code(stream))
                .fetch_optional(&mut **self.0)
                .await?;
        Ok(row.map(|(o, d)| (to_u64(o), d)))
    }
}
