//! `muster-server check`: validates what the server would start with (config, TLS identity,
//! data directory, database) without starting it or changing anything. The first problem is
//! the answer, in one line.

use crate::config::Config;
use crate::store::sqlite::{InspectError, Inspection, inspect};
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

    let db = match &config.database {
        crate::config::Database::Sqlite(path) => path.clone(),
        crate::config::Database::Postgres(options) => {
            ok.push(postgres(options, &config.database.describe()).await?);
            return Ok(ok);
        }
    };
    if !db.exists() {
        ok.push(format!("database: none yet at {}; it is created at first start", db.display()));
        return Ok(ok);
    }
    match inspect(&db).await {
        Err(InspectError::Open(e)) => Err(format!("database: cannot open {}: {e}", db.display())),
        Err(InspectError::Read(e)) => Err(format!("database: {}: {e}", db.display())),
        Ok(Inspection::Damaged(verdict)) => Err(format!("database: {} is damaged: {verdict}", db.display())),
        Ok(Inspection::Intact { newer: Some(newer), .. }) => Err(format!(
            "database: {} has migration {newer}, which this muster-server does not know: it was written by a newer version",
            db.display()
        )),
        Ok(Inspection::Intact { newer: None, pending }) => {
            ok.push(match pending {
                0 => format!("database: {} is intact and up to date", db.display()),
                n => format!("database: {} is intact; {n} migration(s) will be applied at start", db.display()),
            });
            Ok(ok)
        }
    }
}

async fn postgres(options: &sqlx::postgres::PgConnectOptions, name: &str) -> Result<String, String> {
    use crate::store::postgres::inspect_postgres;
    let i = match inspect_postgres(options).await {
        Err(InspectError::Open(e)) => return Err(format!("database: cannot connect to {name}: {e}")),
        Err(InspectError::Read(e)) => return Err(format!("database: {name}: {e}")),
        Ok(i) => i,
    };
    if i.standby {
        return Err(format!("database: {name} is a standby (in recovery) and takes no writes"));
    }
    if let Some(v) = i.failed.first() {
        return Err(format!("database: {name}: migration {v} began and failed; it needs a look before the server starts"));
    }
    if let Some(v) = i.unknown.first() {
        return Err(format!(
            "database: {name} has migration {v}, which this muster-server does not know: it was written by a newer version"
        ));
    }
    Ok(match i.pending.len() {
        0 => format!("database: {name} (PostgreSQL {}) is reachable and up to date", i.server_version),
        n => format!("database: {name} (PostgreSQL {}) is reachable; {n} migration(s) will be applied at start", i.server_version),
    })
}
