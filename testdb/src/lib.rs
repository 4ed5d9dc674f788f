//! A private PostgreSQL cluster for a test, with nothing depending on a system service.
//!
//! [`Cluster::start`] copies a template data directory (made by `initdb` once per test process),
//! starts `postgres` on it on a free port of 127.0.0.1 and nowhere else, and stops it when the
//! `Cluster` is dropped, a panicking test included. Everything of a cluster lives in one
//! temporary directory: `data/`, the Unix socket and `postgres.log`.
//!
//! The binaries are found on `PATH`, else in the newest `/usr/lib/postgresql/*/bin` (Debian's
//! `postgresql` package). PostgreSQL refuses to run as root, so as root every PostgreSQL program
//! runs as the `postgres` system user, which then owns the cluster's directory.
//!
//! The calls that start, stop or query the server block the calling thread (at most
//! `pg_ctl`'s 30 s wait); an async test calls them directly, or from `spawn_blocking` to keep
//! its runtime's other tasks going meanwhile.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// How long `pg_ctl` waits for the server to start or to stop.
const PG_CTL_WAIT_SECS: &str = "30";
/// How long dropping a cluster waits for its processes to exit, before and after killing them.
const REAP_WAIT: Duration = Duration::from_secs(10);
/// Ports tried when another process takes the chosen one before the server binds it.
const PORT_ATTEMPTS: usize = 8;
/// What the temporary directories of this crate are called: `muster-testdb-<pid>-...`, so that
/// the next test process can clean up after one that was killed.
const PREFIX: &str = "muster-testdb-";
const PROGRAMS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

/// The user that runs the PostgreSQL programs, when it is not this process's own.
#[derive(Clone, Copy, Debug)]
struct Owner {
    uid: u32,
    gid: u32,
}

/// What every cluster of this process shares.
#[derive(Debug)]
struct Setup {
    bin: PathBuf,
    owner: Option<Owner>,
    /// A data directory fresh from `initdb`, copied for each cluster. A static is never
    /// dropped, so it stays behind at exit; the next test process removes it.
    template: PathBuf,
}

/// A running (or stopped) private PostgreSQL server. Dropping it stops the server at once
/// (`-m immediate`), waits until none of its processes is left, and removes its directory.
#[derive(Debug)]
pub struct Cluster {
    setup: &'static Setup,
    data: PathBuf,
    port: u16,
    running: Mutex<bool>,
    databases: AtomicU64,
    /// Removed once `drop` has stopped the server.
    dir: tempfile::TempDir,
}

enum Launch {
    Started,
    PortTaken,
}

impl Cluster {
    /// Starts a new cluster on a free port of 127.0.0.1. Panics, with the server's log, if it
    /// cannot; the first call of a process also runs `initdb` (about a second).
    pub fn start() -> Cluster {
        Cluster::start_with(free_port)
    }

    /// Starts on the ports `next_port` hands out, trying the next while one is taken.
    fn start_with(mut next_port: impl FnMut() -> u16) -> Cluster {
        let setup = setup();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}{}-", std::process::id()))
            .tempdir()
            .unwrap_or_else(|e| panic!("testdb: creating a temporary directory: {e}"));
        give(dir.path(), setup.owner);
        let root = dir.path().canonicalize().unwrap_or_else(|e| panic!("testdb: {}: {e}", dir.path().display()));
        let data = root.join("data");
        // `cp -a` keeps the owner (as root) and the 0700 mode PostgreSQL insists on.
        let copied = Command::new("cp").arg("-a").arg(&setup.template).arg(&data).stdin(Stdio::null()).output();
        succeeded("cp -a of the template data directory", copied);
        let mut cluster = Cluster { setup, data, port: 0, running: Mutex::new(false), databases: AtomicU64::new(0), dir };
        for _ in 0..PORT_ATTEMPTS {
            cluster.port = next_port();
            if let Launch::Started = cluster.launch() {
                *cluster.running() = true;
                return cluster;
            }
        }
        panic!("testdb: {PORT_ATTEMPTS} ports in a row were taken before the server could bind them\n{}", cluster.log());
    }

    /// `postgres://postgres@127.0.0.1:PORT/db`: no password (the cluster trusts loopback).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory: every process of the server has it as its working directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Creates a database (a name of ASCII letters, digits and `_`) and returns its url.
    pub fn create_database(&self, name: &str) -> String {
        assert!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "testdb: a database name of ASCII letters, digits and _, not {name:?}"
        );
        let admin = self.url("postgres");
        let sql = format!("CREATE DATABASE \"{name}\"");
        block_on(async move {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| panic!("testdb: connecting to {admin}: {e}"));
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.as_str())).execute(&mut conn).await.unwrap_or_else(|e| panic!("testdb: {sql}: {e}"));
            let _ = conn.close().await;
        });
        self.url(name)
    }

    /// A new database with a name not used before in this cluster; its url.
    pub fn fresh_database(&self) -> String {
        let n = self.databases.fetch_add(1, Ordering::Relaxed) + 1;
        self.create_database(&format!("db{n}"))
    }

    /// Stops the server (`pg_ctl stop -m fast`) and waits until none of its processes is left:
    /// connections are closed, the data stays.
    pub fn stop(&self) {
        let mut running = self.running();
        assert!(*running, "testdb: stop() on a cluster that is not running");
        let out = self.pg_ctl().args(["stop", "-w", "-t", PG_CTL_WAIT_SECS, "-m", "fast", "-D"]).arg(&self.data).output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            panic!("testdb: pg_ctl stop: {}\n{}", describe(&out), self.log());
        }
        // pg_ctl returns once the pid file is gone, a moment before the last process exits.
        if !gone(&self.data, REAP_WAIT) {
            panic!("testdb: processes {:?} of the stopped server are still running", self.processes());
        }
        *running = false;
    }

    /// Starts a stopped cluster again, on the same port and data, so urls handed out before
    /// work again. Panics if the port was taken meanwhile.
    pub fn start_again(&self) {
        let mut running = self.running();
        assert!(!*running, "testdb: start_again() on a cluster that is running");
        match self.launch() {
            Launch::Started => *running = true,
            Launch::PortTaken => panic!("testdb: port {} was taken while the cluster was stopped\n{}", self.port, self.log()),
        }
    }

    /// [`Cluster::stop`], then [`Cluster::start_again`].
    pub fn restart(&self) {
        self.stop();
        self.start_again();
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read(self.log_path()).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The postmaster's process id while the server runs.
    pub fn pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The server's processes now: the postmaster and its children.
    pub fn processes(&self) -> Vec<u32> {
        postgres_processes(&self.data)
    }

    fn running(&self) -> std::sync::MutexGuard<'_, bool> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn pg_ctl(&self) -> Command {
        pg_command(self.setup.bin.as_path(), self.setup.owner, "pg_ctl", self.dir.path())
    }

    fn launch(&self) -> Launch {
        let log = self.log_path();
        let seen = std::fs::metadata(&log).map_or(0, |m| m.len());
        let socket_dir = self.dir.path().display().to_string();
        // pg_ctl hands these to `/bin/sh -c`: the directory is quoted.
        assert!(!socket_dir.contains('\''), "testdb: a temporary directory without a quote in its path, not {socket_dir}");
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k '{socket_dir}' -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=200",
            self.port
        );
        let out = self
            .pg_ctl()
            .args(["start", "-w", "-t", PG_CTL_WAIT_SECS, "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(options)
            .output();
        if matches!(&out, Ok(o) if o.status.success()) {
            return Launch::Started;
        }
        let all = self.log();
        let fresh = all.get(usize::try_from(seen).unwrap_or(0)..).unwrap_or(&all);
        if fresh.contains("Address already in use") {
            return Launch::PortTaken;
        }
        panic!("testdb: pg_ctl start: {}\n--- postgres.log ---\n{fresh}", describe(&out));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Never panics: this also runs while a failed test unwinds. Stopping a server that is
        // not running fails harmlessly; whatever is left of it is killed.
        let _ = self
            .pg_ctl()
            .args(["stop", "-w", "-t", PG_CTL_WAIT_SECS, "-m", "immediate", "-D"])
            .arg(&self.data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        reap(&self.data);
    }
}

/// The processes whose working directory is `data_dir`: a PostgreSQL server's postmaster and
/// every child of it (they all change to the data directory), also once it was deleted.
pub fn postgres_processes(data_dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cwd = std::fs::read_link(e.path().join("cwd")).ok()?;
            let cwd = cwd.to_str()?;
            (Path::new(cwd.strip_suffix(" (deleted)").unwrap_or(cwd)) == data_dir).then_some(pid)
        })
        .collect()
}

/// A port of 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("testdb: finding a free port: {e}"))
}

fn setup() -> &'static Setup {
    // `get_or_init` runs one initializer at a time: concurrent first tests wait for one initdb.
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let bin = binaries();
        let owner = server_user();
        sweep(&bin, owner);
        let root = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}{}-template-", std::process::id()))
            .tempdir()
            .unwrap_or_else(|e| panic!("testdb: creating a temporary directory: {e}"))
            .keep();
        give(&root, owner);
        let template = root.join("data");
        let out = pg_command(&bin, owner, "initdb", &root)
            .args(["--auth=trust", "--username=postgres", "--no-sync", "--encoding=UTF8", "--locale=C", "-D"])
            .arg(&template)
            .output();
        succeeded("initdb", out);
        Setup { bin, owner, template }
    })
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`: on PATH, else the newest
/// `/usr/lib/postgresql/<version>/bin`.
fn binaries() -> PathBuf {
    let has_all = |dir: &Path| PROGRAMS.iter().all(|p| is_executable(&dir.join(p)));
    if let Some(path) = std::env::var_os("PATH")
        && let Some(dir) = std::env::split_paths(&path).find(|d| has_all(d))
    {
        return dir;
    }
    let mut found: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.split('.').map(|p| p.parse().ok()).collect::<Option<Vec<u32>>>()?;
            let bin = e.path().join("bin");
            has_all(&bin).then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "testdb: PostgreSQL's initdb, pg_ctl and postgres are neither on PATH nor in /usr/lib/postgresql/*/bin; \
             install Debian's `postgresql` package (apt-get install postgresql)"
        ),
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// As root, the `postgres` system user (PostgreSQL refuses to run as root); else nobody else.
fn server_user() -> Option<Owner> {
    if !rustix::process::geteuid().is_root() {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let owner = passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        if f.next() != Some("postgres") {
            return None;
        }
        let (uid, gid) = (f.nth(1)?.parse().ok()?, f.next()?.parse().ok()?);
        Some(Owner { uid, gid })
    });
    Some(owner.unwrap_or_else(|| {
        panic!(
            "testdb: this test runs as root, which PostgreSQL refuses, and /etc/passwd has no `postgres` user to run it as; \
             Debian's `postgresql` package creates one"
        )
    }))
}

/// Makes `dir` the server user's (not recursively).
fn give(dir: &Path, owner: Option<Owner>) {
    if let Some(o) = owner {
        let (uid, gid) = (rustix::fs::Uid::from_raw(o.uid), rustix::fs::Gid::from_raw(o.gid));
        rustix::fs::chown(dir, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("testdb: chown {}: {e}", dir.display()));
    }
}

/// A PostgreSQL program, run as the server's user in `cwd`, in the C locale (so its messages
/// are the English ones `launch` looks for), without the caller's `PG*` settings.
fn pg_command(bin: &Path, owner: Option<Owner>, program: &str, cwd: &Path) -> Command {
    let mut c = Command::new(bin.join(program));
    c.current_dir(cwd).stdin(Stdio::null()).env("LC_ALL", "C").env("LANG", "C");
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| k.starts_with("PG")) {
            c.env_remove(key);
        }
    }
    if let Some(o) = owner {
        use std::os::unix::process::CommandExt;
        c.uid(o.uid).gid(o.gid);
    }
    c
}

fn succeeded(what: &str, out: std::io::Result<Output>) {
    if !matches!(&out, Ok(o) if o.status.success()) {
        panic!("testdb: {what}: {}", describe(&out));
    }
}

fn describe(out: &std::io::Result<Output>) -> String {
    match out {
        Ok(o) => format!("{}\n{}{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
        Err(e) => e.to_string(),
    }
}

/// Waits for the processes of `data_dir` to exit, kills any still there after [`REAP_WAIT`],
/// and waits for those too.
fn reap(data_dir: &Path) {
    if gone(data_dir, REAP_WAIT) {
        return;
    }
    for pid in postgres_processes(data_dir) {
        if let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
    gone(data_dir, REAP_WAIT);
}

fn gone(data_dir: &Path, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if postgres_processes(data_dir).is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops the servers and removes the directories that test processes no longer running left
/// behind (killed before their clusters were dropped, or their template).
fn sweep(bin: &Path, owner: Option<Owner>) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)).and_then(|rest| rest.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        let data = e.path().join("data");
        if data.join("postmaster.pid").exists() {
            let _ = pg_command(bin, owner, "pg_ctl", &e.path())
                .args(["stop", "-w", "-t", PG_CTL_WAIT_SECS, "-m", "immediate", "-D"])
                .arg(&data)
                .output();
        }
        if let Ok(data) = data.canonicalize() {
            reap(&data);
        }
        let _ = std::fs::remove_dir_all(e.path());
    }
}

/// Runs `f` to completion on a runtime of its own, on a thread of its own, so a caller inside
/// an async test can use it too.
fn block_on<F>(f: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("testdb: a runtime for sqlx: {e}"));
            rt.block_on(f)
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

#[cfg(test)]
mod tests;
