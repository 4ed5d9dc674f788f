//! The server's and the agent's config file loaders, through their public entry points: the
//! input is written to a file and `Config::resolve` is called with only `config` set, as
//! `muster-server --config FILE` and `muster-agent --config FILE` would.
//!
//! Checks: neither panics on any file content (invalid UTF-8, bad TOML, wrong types, huge or
//! odd values); a config that resolves can be used (the derived values the binaries compute).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// One file per process, rewritten for every input: in `$MUSTER_FUZZ_DIR` (run.sh makes one and
/// removes it), else in /dev/shm, else the temp dir. On a disk the write costs 20 times the
/// parsing (400 executions a second against 11,000 on tmpfs).
fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = match std::env::var_os("MUSTER_FUZZ_DIR") {
            Some(d) => PathBuf::from(d),
            None if std::path::Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
            None => std::env::temp_dir(),
        };
        dir.join(format!("muster-fuzz-config-{}.toml", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = path();
    if std::fs::write(path, data).is_err() {
        panic!("cannot write {}", path.display());
    }

    let settings = server::config::Settings { config: Some(path.clone()), ..Default::default() };
    if let Ok(c) = server::config::Config::resolve(&settings) {
        let _ = (c.idle_timeout(), c.database_path());
        let _ = shared::duration::format(c.heartbeat_retention);
    }

    let settings = agent::config::Settings { config: Some(path.clone()), ..Default::default() };
    if let Ok(c) = agent::config::Config::resolve(&settings) {
        let _ = c.labels.to_string();
        let _ = shared::duration::format(c.heartbeat_interval);
    }
});
