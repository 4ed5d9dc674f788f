//! `muster-server migrate-db --to postgres://...`: copies an SQLite installation into an empty
//! PostgreSQL database, history included (heartbeats, transitions, jobs, runs, output, the
//! audit chain), so moving to a cluster loses nothing.
//!
//! - The SQLite file is first brought up to date by its own migrations (as a start would), then
//!   read inside one transaction: a consistent snapshot even if something else writes it. Stop
//!   the server first all the same, or what it writes afterwards stays behind.
//! - The PostgreSQL database is migrated to this build's schema and must hold no rows yet: the
//!   copy never merges two histories.
//! - Every table of the PostgreSQL schema is copied, parents before children (by its foreign
//!   keys), column by column as PostgreSQL types them; all of it in one transaction, so a
//!   failure leaves the target as it was. Then identity sequences continue after the copied
//!   ids, and the row counts of both sides are compared.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, bail};
use futures_util::TryStreamExt;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Postgres, QueryBuilder, Row};

use crate::config::{Config, Database};
use crate::store::{PostgresStore, SqliteStore};

/// Tables whose one row the migrations write (the audit chain's head): the copy replaces it,
/// and it does not make a database count as holding data.
const SEEDED: [&str; 1] = ["audit_head"];

/// Rows per INSERT: far below PostgreSQL's 65,535 parameters for the widest table.
const ROWS_PER_INSERT: usize = 500;

/// One table as copied: its name and rows.
pub type Copied = Vec<(String, u64)>;

pub async fn run(config: &Config, to: &str, password_file: Option<&std::path::Path>) -> anyhow::Result<Copied> {
    let password = match password_file {
        Some(path) => Some(
            std::fs::File::open(path)
                .map_err(Into::into)
                .and_then(shared::secret::read)
                .with_context(|| format!("database password file {}", path.display()))?,
        ),
        None => None,
    };
    let Database::Postgres(target) = Database::postgres(to, password)? else { bail!("--to must name a PostgreSQL database") };
    let source = config.database_path();
    if !source.exists() {
        bail!("there is no SQLite database at {} to copy", source.display());
    }
    // Brings an older file up to date, exactly as a start of this version would.
    SqliteStore::open(&source).await.with_context(|| format!("opening {}", source.display()))?.close().await;
    PostgresStore::open_with(&target).await.context("preparing the PostgreSQL database")?.close().await;

    let mut sqlite = SqliteConnectOptions::new().filename(&source).read_only(true).connect().await?;
    let pool = PgPoolOptions::new().max_connections(1).connect_with((*target).clone()).await.context("connecting to PostgreSQL")?;
    let tables = tables(&pool).await?;
    let mut pg = pool.begin().await?;
    let mut snapshot = sqlite.begin().await?;
    for (table, _) in tables.iter().filter(|(t, _)| !SEEDED.contains(&t.as_str())) {
        let (n,): (i64,) = sqlx::query_as(AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}"))).fetch_one(&mut *pg).await?;
        if n > 0 {
            bail!("the PostgreSQL database already holds data ({n} rows in {table}); migrate-db copies into an empty database only");
        }
    }
    // The rows the migrations seed are replaced by the source's own.
    for table in SEEDED {
        sqlx::query(AssertSqlSafe(format!("DELETE FROM {table}"))).execute(&mut *pg).await?;
    }
    let mut copied = Vec::new();
    for (table, columns) in &tables {
        let list = columns.iter().map(|(c, _)| format!("\"{c}\"")).collect::<Vec<_>>().join(", ");
        // Streamed in chunks: a year of heartbeats need not fit in memory.
        let select = format!("SELECT {list} FROM {table}");
        let mut rows = sqlx::query(AssertSqlSafe(select)).fetch(&mut *snapshot);
        let mut chunk = Vec::with_capacity(ROWS_PER_INSERT);
        let mut n = 0u64;
        loop {
            let row = rows.try_next().await.with_context(|| format!("reading {table} from SQLite"))?;
            let end = row.is_none();
            chunk.extend(row);
            if chunk.len() == ROWS_PER_INSERT || (end && !chunk.is_empty()) {
                insert(&mut pg, table, &list, columns, &chunk).await?;
                n += chunk.len() as u64;
                chunk.clear();
            }
            if end {
                break;
            }
        }
        drop(rows);
        copied.push((table.clone(), n));
    }
    // Identity columns go on after the copied ids.
    let serial: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, pg_get_serial_sequence(quote_ident(table_name), column_name) \
         FROM information_schema.columns WHERE table_schema = current_schema() \
         AND pg_get_serial_sequence(quote_ident(table_name), column_name) IS NOT NULL",
    )
    .fetch_all(&mut *pg)
    .await?;
    for (table, column, sequence) in serial {
        sqlx::query(AssertSqlSafe(format!("SELECT setval('{sequence}', COALESCE((SELECT MAX(\"{column}\") FROM {table}), 0) + 1, false)")))
            .execute(&mut *pg)
            .await?;
    }
    for (table, n) in &copied {
        let (m,): (i64,) = sqlx::query_as(AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}"))).fetch_one(&mut *pg).await?;
        if u64::try_from(m).unwrap_or(0) != *n {
            bail!("{table}: {n} rows read from SQLite but {m} in PostgreSQL; nothing was committed");
        }
    }
    pg.commit().await.context("committing the copy")?;
    snapshot.rollback().await?;
    Ok(copied)
}

async fn insert(
    pg: &mut sqlx::Transaction<'_, Postgres>,
    table: &str,
    list: &str,
    columns: &[(String, String)],
    rows: &[sqlx::sqlite::SqliteRow],
) -> anyhow::Result<()> {
    let mut q: QueryBuilder<Postgres> = QueryBuilder::new(format!("INSERT INTO {table} ({list}) OVERRIDING SYSTEM VALUE "));
    let mut bad: Option<anyhow::Error> = None;
    q.push_values(rows, |mut b, row| {
        for (i, (name, kind)) in columns.iter().enumerate() {
            if let Err(e) = push(&mut b, row, i, kind) {
                bad.get_or_insert(anyhow::anyhow!("{table}.{name}: {e}"));
            }
        }
    });
    if let Some(e) = bad {
        return Err(e);
    }
    q.build().execute(&mut **pg).await.with_context(|| format!("writing {table} to PostgreSQL"))?;
    Ok(())
}

/// Binds column `i` of an SQLite row as the PostgreSQL column's type wants it.
fn push(
    b: &mut sqlx::query_builder::Separated<'_, Postgres, &'static str>,
    row: &sqlx::sqlite::SqliteRow,
    i: usize,
    kind: &str,
) -> Result<(), sqlx::Error> {
    match kind {
        "bigint" | "integer" | "smallint" => {
            b.push_bind(row.try_get::<Option<i64>, _>(i)?);
        }
        "boolean" => {
            b.push_bind(row.try_get::<Option<i64>, _>(i)?.map(|v| v != 0));
        }
        "double precision" | "real" | "numeric" => {
            b.push_bind(row.try_get::<Option<f64>, _>(i)?);
        }
        "bytea" => {
            b.push_bind(row.try_get::<Option<Vec<u8>>, _>(i)?);
        }
        _ => {
            b.push_bind(row.try_get::<Option<String>, _>(i)?);
        }
    }
    Ok(())
}

/// The schema's tables with their columns and types, parents before the tables that refer to
/// them.
async fn tables(pool: &sqlx::PgPool) -> anyhow::Result<Vec<(String, Vec<(String, String)>)>> {
    let cols: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name <> '_sqlx_migrations' ORDER BY table_name, ordinal_position",
    )
    .fetch_all(pool)
    .await?;
    let mut by_table: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (t, c, k) in cols {
        by_table.entry(t).or_default().push((c, k));
    }
    let refs: Vec<(String, String)> = sqlx::query_as(
        "SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint \
         WHERE contype = 'f' AND connamespace = current_schema()::regnamespace",
    )
    .fetch_all(pool)
    .await?;
    let mut ordered = Vec::new();
    let mut done: BTreeSet<String> = BTreeSet::new();
    while done.len() < by_table.len() {
        let ready: Vec<String> = by_table
            .keys()
            .filter(|t| !done.contains(*t))
            .filter(|t| refs.iter().all(|(child, parent)| child != *t || parent == *t || done.contains(parent)))
            .cloned()
            .collect();
        if ready.is_empty() {
            bail!("the PostgreSQL schema's foreign keys form a cycle; cannot order the copy");
        }
        for t in ready {
            done.insert(t.clone());
            ordered.push((t.clone(), by_table[&t].clone()));
        }
    }
    Ok(ordered)
}
