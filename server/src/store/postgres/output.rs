//! Output chunks into `run_output` on PostgreSQL: the reads and writes of the shared
//! [`crate::store::batch::output`] plan.

use std::collections::{HashMap, HashSet};

use shared::job::{RunId, Stream};
use sqlx::{Postgres, QueryBuilder};

use super::records::{ROWS_PER_STATEMENT, update_from};
use crate::store::batch::output::{self, Chunk, InfoRow, OutputReads, RunInfo};
use crate::store::rows::{stream_code, to_i64, to_u64};
use crate::store::{Effect, Result, StoreError};

/// Judges and stores a batch's output chunks, in order.
pub(super) async fn insert_outputs(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    chunks: &[Chunk<'_>],
    effects: &mut Vec<Effect>,
) -> Result<()> {
    if chunks.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = chunks.iter().map(|c| c.run_id.as_str()).collect::<HashSet<_>>().into_iter().collect();
    let mut runs = run_infos(tx, &ids).await?;
    let plan = output::plan(&mut Reads(tx), chunks, &mut runs, effects).await?;
    for chunk in plan.pieces.chunks(ROWS_PER_STATEMENT) {
        // A piece that extends a stored row replaces it (same key); no key twice in a plan.
        let mut q: QueryBuilder<Postgres> = QueryBuilder::new("INSERT INTO run_output (run_id, stream, \"offset\", data) ");
        q.push_values(chunk, |mut b, p| {
            b.push_bind(p.run_id.clone())
                .push_bind(i64::from(p.stream == 1))
                .push_bind(to_i64(p.offset))
                .push_bind(p.data.as_bytes().to_vec());
        });
        q.push(" ON CONFLICT (run_id, stream, \"offset\") DO UPDATE SET data = EXCLUDED.data");
        q.build().execute(&mut **tx).await?;
    }
    update_from(
        tx,
        "UPDATE runs SET stdout_held = v.column2, stdout_truncated = (runs.stdout_truncated OR v.column3), \
         stderr_held = v.column4, stderr_truncated = (runs.stderr_truncated OR v.column5)",
        "WHERE runs.id = v.column1",
        &plan.held,
        |b, (id, [out, err])| {
            b.push_bind(id.clone()).push_bind(to_i64(out.len)).push_bind(out.truncated).push_bind(to_i64(err.len)).push_bind(err.truncated);
        },
    )
    .await
}

/// The runs the chunks name, locked in id order to commit: held lengths are read, judged and
/// written back, and another node may be appending to the same run.
async fn run_infos(tx: &mut sqlx::Transaction<'_, Postgres>, ids: &[&str]) -> Result<HashMap<RunId, RunInfo>> {
    let rows: Vec<InfoRow> = sqlx::query_as(
        "SELECT r.id, r.job_id, r.agent_id, j.output_limit, r.stdout_held, r.stdout_truncated, r.stderr_held, r.stderr_truncated, \
         r.state FROM runs r JOIN jobs j ON j.id = r.job_id WHERE r.id = ANY($1) ORDER BY r.id FOR UPDATE OF r",
    )
    .bind(ids)
    .fetch_all(&mut **tx)
    .await?;
    output::run_infos(rows)
}

fn text(data: Vec<u8>) -> Result<String> {
    String::from_utf8(data).map_err(|_| StoreError::Corrupt("run output is not UTF-8".into()))
}

struct Reads<'t, 'c>(&'t mut sqlx::Transaction<'c, Postgres>);

fn code(stream: usize) -> i64 {
    stream_code(if stream == 1 { Stream::Stderr } else { Stream::Stdout })
}

impl OutputReads for Reads<'_, '_> {
    async fn rows(&mut self, run_id: &str, stream: usize, from: u64, to: u64) -> Result<Vec<(u64, String)>> {
        // A bounded range of the primary key, not every row below `to`.
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT \"offset\", data FROM run_output WHERE run_id = $1 AND stream = $2 AND \"offset\" < $3 AND \"offset\" >= \
             COALESCE((SELECT MAX(\"offset\") FROM run_output WHERE run_id = $1 AND stream = $2 AND \"offset\" <= $4), 0) \
             ORDER BY \"offset\"",
        )
        .bind(run_id)
        .bind(code(stream))
        .bind(to_i64(to))
        .bind(to_i64(from))
        .fetch_all(&mut **self.0)
        .await?;
        rows.into_iter().map(|(o, d)| Ok((to_u64(o), text(d)?))).collect()
    }

    async fn last_row(&mut self, run_id: &str, stream: usize) -> Result<Option<(u64, String)>> {
        let row: Option<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT \"offset\", data FROM run_output WHERE run_id = $1 AND stream = $2 ORDER BY \"offset\" DESC LIMIT 1")
                .bind(run_id)
                .bind(code(stream))
                .fetch_optional(&mut **self.0)
                .await?;
        row.map(|(o, d)| Ok((to_u64(o), text(d)?))).transpose()
    }
}
