//! `muster-server check`: validates what the server would start with (config, TLS identity,
//! data directory, database) without starting it or changing anything. The first problem is
//! the answer, in one line.

use std::collections::HashSet;

use sqlx::ConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;

use crate::config::Config;
use crate::tls;

pub async fn run(config: &Config) -> Result<Vec<String>, String> {
    let mut ok = vec![format!("config: listening on {}, data in {}", config.listen, config.data_dir.display())];

    let tls = tls::check(&config.tls, &config.data_dir, tls::now_secs()).map_err(|e| format!("TLS: {e}"))?;
    ok.push(format!("TLS: {tls}"));

    if config.data_dir.exists() {
        let probe = config.data_dir.join(".check-write");
        std::fs::write(&probe, b"").map_err(|e| format!("data directory: {} is not writable: {e}", config.data_dir.display()))?;
        let _ = std::fs::remove_file(&probe);
    }

    let db = config.database_path();
    if !db.exists() {
        ok.push(format!("database: none yet at {}; it is created at first start", db.display()));
        return Ok(ok);
    }
    let mut conn = SqliteConnectOptions::new()
        .filename(&db)
        .read_only(true)
        .connect()
        .await
        .map_err(|e| format!("database: cannot open {}: {e}", db.display()))?;
    let (verdict,): (String,) =
        sqlx::query_as("PRAGMA quick_check").fetch_one(&mut conn).await.map_err(|e| format!("database: {}: {e}", db.display()))?;
    if verdict != "ok" {
        return Err(format!("database: {} is damaged: {verdict}", db.display()));
    }
    let applied: Vec<(i64,)> =
        sqlx::query_as("SELECT version FROM _sqlx_migrations WHERE success = 1").fetch_all(&mut conn).await.unwrap_or_default();
    let known: HashSet<i64> = sqlx::migrate!("../migrations").iter().map(|m| m.version).collect();
    let applied: HashSet<i64> = applied.into_iter().map(|(v,)| v).collect();
    if let Some(newer) = applied.iter().find(|v| !known.contains(v)) {
        return Err(format!(
            "database: {} has migration {newer}, which this muster-server does not know: it was written by a newer version",
            db.display()
        ));
    }
    let pending = known.difference(&applied).count();
    ok.push(match pending {
        0 => format!("database: {} is intact and up to date", db.display()),
        n => format!("database: {} is intact; {n} migration(s) will be applied at start", db.display()),
    });
    Ok(ok)
}
