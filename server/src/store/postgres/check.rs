//! What `muster-server check` reads from a PostgreSQL database: the server's version, whether
//! it takes writes, and which migrations it has. Read-only: the session is opened with
//! `default_transaction_read_only`, and only SELECTs are sent.

use std::collections::BTreeSet;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use super::WAIT;
use crate::store::InspectError;

/// A PostgreSQL database as `muster-server check` finds it.
#[derive(Debug, PartialEq, Eq)]
pub struct PgInspection {
    /// `server_version` as the server reports it, e.g. `15.18 (Debian 15.18-0+deb12u1)`.
    pub server_version: String,
    /// A standby (in recovery) takes no writes: a server cannot run on it.
    pub standby: bool,
    /// This build's migrations that are applied, in order.
    pub applied: Vec<i64>,
    /// This build's migrations not applied yet: the next start applies them.
    pub pending: Vec<i64>,
    /// Migrations applied that this build does not know: a newer version wrote the database.
    pub unknown: Vec<i64>,
    /// Migrations that began and failed: a start refuses the database until someone looks.
    pub failed: Vec<i64>,
}

pub async fn inspect_postgres(options: &PgConnectOptions) -> Result<PgInspection, InspectError> {
    let options = options.clone().application_name("muster-server check").options([("default_transaction_read_only", "on")]);
    let mut conn = tokio::time::timeout(WAIT, options.connect())
        .await
        .map_err(|_| InspectError::Open(format!("no answer within {} s", WAIT.as_secs())))?
        .map_err(|e| InspectError::Open(e.to_string()))?;
    let read = |e: sqlx::Error| InspectError::Read(e.to_string());
    let (server_version, standby): (String, bool) =
        sqlx::query_as("SELECT current_setting('server_version'), pg_is_in_recovery()").fetch_one(&mut conn).await.map_err(read)?;
    let (has_table,): (bool,) =
        sqlx::query_as("SELECT to_regclass('_sqlx_migrations') IS NOT NULL").fetch_one(&mut conn).await.map_err(read)?;
    let rows: Vec<(i64, bool)> = if has_table {
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version").fetch_all(&mut conn).await.map_err(read)?
    } else {
        Vec::new()
    };
    let _ = conn.close().await;
    let known: BTreeSet<i64> = sqlx::migrate!("../migrations/postgres").iter().map(|m| m.version).collect();
    let done: BTreeSet<i64> = rows.iter().filter(|(_, ok)| *ok).map(|(v, _)| *v).collect();
    Ok(PgInspection {
        server_version,
        standby,
        applied: known.intersection(&done).copied().collect(),
        pending: rows_missing(&known, &rows),
        unknown: done.difference(&known).copied().collect(),
        failed: rows.iter().filter(|(_, ok)| !*ok).map(|(v, _)| *v).collect(),
    })
}

/// Known migrations with no row at all (a failed one has a row, and is not pending).
fn rows_missing(known: &BTreeSet<i64>, rows: &[(i64, bool)]) -> Vec<i64> {
    known.iter().filter(|v| !rows.iter().any(|(r, _)| r == *v)).copied().collect()
}
