//! What `muster-server check` reads from a database file, opened read-only: its integrity
//! (`PRAGMA quick_check`) and which migrations it has.

use std::collections::HashSet;
use std::path::Path;

use sqlx::ConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;

use crate::store::InspectError;

/// A database file as `muster-server check` finds it.
#[derive(Debug, PartialEq, Eq)]
pub enum Inspection {
    /// `PRAGMA quick_check` found damage: its first line.
    Damaged(String),
    /// Intact. `newer`: a migration applied that this build does not know (the file was
    /// written by a newer version); `pending`: how many of this build's are not applied yet.
    Intact { newer: Option<i64>, pending: usize },
}

pub async fn inspect(path: &Path) -> Result<Inspection, InspectError> {
    let mut conn =
        SqliteConnectOptions::new().filename(path).read_only(true).connect().await.map_err(|e| InspectError::Open(e.to_string()))?;
    let (verdict,): (String,) =
        sqlx::query_as("PRAGMA quick_check").fetch_one(&mut conn).await.map_err(|e| InspectError::Read(e.to_string()))?;
    if verdict != "ok" {
        return Ok(Inspection::Damaged(verdict));
    }
    let applied: Vec<(i64,)> =
        sqlx::query_as("SELECT version FROM _sqlx_migrations WHERE success = 1").fetch_all(&mut conn).await.unwrap_or_default();
    let known: HashSet<i64> = sqlx::migrate!("../migrations/sqlite").iter().map(|m| m.version).collect();
    let applied: HashSet<i64> = applied.into_iter().map(|(v,)| v).collect();
    let newer = applied.iter().find(|v| !known.contains(v)).copied();
    Ok(Inspection::Intact { newer, pending: known.difference(&applied).count() })
}
