//! Runs commands for the server: each in its own process group, at most `max_runs` at once,
//! with its output written to the ledger as it arrives. The session streams output from disk
//! by offset, so a slow or broken link never blocks a process and never loses output.
//!
//! On timeout or cancel the whole process group gets SIGTERM, then SIGKILL after
//! [`KILL_GRACE`].

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shared::AgentId;
use shared::job::{RunId, Stream};
use shared::protocol::{Outcome, Run, RunFinished};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::ledger::{Found, Ledger};
use crate::policy::Policy;
use crate::trust::Trust;

pub const KILL_GRACE: Duration = Duration::from_secs(5);
/// After the main process exits, how long its output pipes may stay open (held by a
/// background child) before the agent stops reading them.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Queued,
    Running,
    Finished,
}

/// What the session needs to know about one run, shared with the task running it.
#[derive(Debug)]
pub struct RunStatus {
    pub phase: Phase,
    pub out_len: u64,
    pub err_len: u64,
    /// How far output has been sent to the server (kept across reconnects).
    pub sent_out: u64,
    pub sent_err: u64,
    pub result: Option<RunFinished>,
    cancel: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

struct Inner {
    ledger: Mutex<Ledger>,
    runs: Mutex<BTreeMap<RunId, Arc<Mutex<RunStatus>>>>,
    slots: Arc<Semaphore>,
    notify: Notify,
    agent_id: Mutex<Option<AgentId>>,
    policy: Arc<Policy>,
    trust: Arc<Trust>,
}

fn finished(run_id: &RunId, outcome: Outcome, error: Option<String>) -> RunFinished {
    RunFinished {
        run_id: run_id.clone(),
        outcome,
        exit_code: None,
        signal: None,
        error,
        stdout_len: 0,
        stderr_len: 0,
        stdout_truncated: false,
        stderr_truncated: false,
    }
}

impl Executor {
    /// Opens the ledger and picks up where the last agent process left off: unacknowledged
    /// results are kept for the server, never-started runs start, and interrupted ones are
    /// reported lost.
    pub fn open(state_dir: &Path, max_runs: usize, policy: Arc<Policy>, trust: Arc<Trust>) -> std::io::Result<Executor> {
        let ledger = Ledger::open(state_dir)?;
        let found = ledger.load();
        let exec = Executor {
            inner: Arc::new(Inner {
                ledger: Mutex::new(ledger),
                runs: Mutex::new(BTreeMap::new()),
                slots: Arc::new(Semaphore::new(max_runs.max(1))),
                notify: Notify::new(),
                agent_id: Mutex::new(None),
                policy,
                trust,
            }),
        };
        for f in found {
            match f {
                Found::Finished(_, result) => exec.insert_finished(result),
                Found::Interrupted(run) => {
                    let mut result = finished(&run.run_id, Outcome::Lost, Some("the agent restarted while the command was running".into()));
                    // Keep what output there is.
                    let ledger = lock(&exec.inner.ledger);
                    for (stream, len) in [(Stream::Stdout, &mut result.stdout_len), (Stream::Stderr, &mut result.stderr_len)] {
                        *len = std::fs::metadata(ledger.output_path(&run.run_id, stream)).map(|m| m.len()).unwrap_or(0);
                    }
                    if let Err(e) = ledger.finish(&result) {
                        tracing::warn!(run = %run.run_id, error = %e, "cannot record an interrupted run");
                    }
                    drop(ledger);
                    tracing::warn!(run = %run.run_id, "a run was interrupted by an agent restart; reporting it lost");
                    exec.insert_finished(result);
                }
                Found::NotStarted(run) => exec.start(run),
            }
        }
        Ok(exec)
    }

    fn insert_finished(&self, result: RunFinished) {
        let status = RunStatus {
            phase: Phase::Finished,
            out_len: result.stdout_len,
            err_len: result.stderr_len,
            sent_out: 0,
            sent_err: 0,
            result: Some(result.clone()),
            cancel: CancellationToken::new(),
        };
        lock(&self.inner.runs).insert(result.run_id, Arc::new(Mutex::new(status)));
    }

    pub fn trust(&self) -> &Trust {
        &self.inner.trust
    }

    pub fn set_agent_id(&self, id: AgentId) {
        *lock(&self.inner.agent_id) = Some(id);
    }

    /// Run ids the server has not acknowledged, for `hello`.
    pub fn open_run_ids(&self) -> Vec<RunId> {
        lock(&self.inner.runs).keys().cloned().collect()
    }

    pub fn runs(&self) -> Vec<(RunId, Arc<Mutex<RunStatus>>)> {
        lock(&self.inner.runs).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub async fn changed(&self) {
        self.inner.notify.notified().await;
    }

    pub fn poke(&self) {
        self.inner.notify.notify_one();
    }

    pub fn read_chunk(&self, run_id: &str, stream: Stream, offset: u64, max: usize) -> std::io::Result<String> {
        lock(&self.inner.ledger).read_chunk(run_id, stream, offset, max)
    }

    /// A `run` from the server. Returns false if the run was already known (a repeat
    /// delivery): it is not executed again.
    pub fn receive(&self, run: Run) -> bool {
        if lock(&self.inner.ledger).knows(&run.run_id) {
            tracing::info!(run = %run.run_id, "run delivered again; not executing it twice");
            return false;
        }
        // Signed jobs are checked here, once, before the run is in the ledger: a run that was
        // admitted and then interrupted by a restart is not judged a replay of itself.
        let agent_id = lock(&self.inner.agent_id).clone();
        let refused = self.inner.trust.admit(&run, agent_id.as_ref(), shared::Timestamp::now()).err();
        if let Err(e) = lock(&self.inner.ledger).accept(&run) {
            tracing::error!(run = %run.run_id, error = %e, "cannot record the run in the ledger");
            self.insert_finished(finished(&run.run_id, Outcome::Failed, Some(format!("the agent could not record the run: {e}"))));
            self.poke();
            return true;
        }
        if let Some(why) = refused {
            tracing::warn!(run = %run.run_id, job = %run.job_id, reason = %why, "run refused: signature");
            let result = finished(&run.run_id, Outcome::Failed, Some(why));
            if let Err(e) = lock(&self.inner.ledger).finish(&result) {
                tracing::error!(run = %run.run_id, error = %e, "cannot store the result on disk; it is kept in memory");
            }
            self.insert_finished(result);
            self.poke();
            return true;
        }
        self.start(run);
        true
    }

    fn start(&self, run: Run) {
        let cancel = CancellationToken::new();
        let status = Arc::new(Mutex::new(RunStatus {
            phase: Phase::Queued,
            out_len: 0,
            err_len: 0,
            sent_out: 0,
            sent_err: 0,
            result: None,
            cancel: cancel.clone(),
        }));
        lock(&self.inner.runs).insert(run.run_id.clone(), status.clone());
        let exec = self.clone();
        tokio::spawn(async move {
            let result = exec.execute(&run, &status, cancel).await;
            if let Err(e) = lock(&exec.inner.ledger).finish(&result) {
                tracing::error!(run = %run.run_id, error = %e, "cannot store the result on disk; it is kept in memory");
            }
            tracing::info!(run = %run.run_id, outcome = ?result.outcome, exit_code = ?result.exit_code, "run finished");
            let mut st = lock(&status);
            st.phase = Phase::Finished;
            st.result = Some(result);
            drop(st);
            exec.poke();
        });
        self.poke();
    }

    pub fn cancel(&self, run_id: &str) {
        if let Some(st) = lock(&self.inner.runs).get(run_id) {
            lock(st).cancel.cancel();
        }
    }

    /// The server stored the result: forget the run.
    pub fn ack(&self, run_id: &RunId) {
        let removed = lock(&self.inner.runs).remove(run_id);
        if removed.is_some()
            && let Err(e) = lock(&self.inner.ledger).forget(run_id)
        {
            tracing::warn!(run = %run_id, error = %e, "cannot remove an acknowledged run from disk");
        }
    }

    /// The server is missing output from these offsets on.
    pub fn resend_from(&self, run_id: &str, out_from: u64, err_from: u64) {
        if let Some(st) = lock(&self.inner.runs).get(run_id) {
            let mut st = lock(st);
            st.sent_out = out_from.min(st.out_len);
            st.sent_err = err_from.min(st.err_len);
        }
        self.poke();
    }

    async fn execute(&self, run: &Run, status: &Arc<Mutex<RunStatus>>, cancel: CancellationToken) -> RunFinished {
        // The agent's own rules first: a refused run never starts a process.
        let launch = match self.inner.policy.launch(&run.command, std::env::var("PATH").ok().as_deref()) {
            Ok(l) => l,
            Err(refusal) => {
                tracing::warn!(run = %run.run_id, rule = refusal.rule, "run refused by this agent's policy");
                return finished(&run.run_id, Outcome::Failed, Some(refusal.to_string()));
            }
        };
        let scrubbed = self.inner.policy.scrubbed(&run.command);
        if !scrubbed.is_empty() {
            tracing::info!(run = %run.run_id, variables = ?scrubbed, "job variables dropped by this agent's policy (env = \"scrub\")");
        }
        let permit = tokio::select! {
            p = self.inner.slots.clone().acquire_owned() => p,
            _ = cancel.cancelled() => return finished(&run.run_id, Outcome::Cancelled, Some("cancelled before it started".into())),
        };
        let _permit = match permit {
            Ok(p) => p,
            Err(_) => return finished(&run.run_id, Outcome::Failed, Some("the agent is shutting down".into())),
        };
        if let Err(e) = lock(&self.inner.ledger).mark_started(&run.run_id) {
            return finished(&run.run_id, Outcome::Failed, Some(format!("the agent could not record the start: {e}")));
        }
        let mut cmd = tokio::process::Command::new(&launch.program);
        cmd.arg0(&launch.arg0).args(&launch.args);
        if let Some(cwd) = &launch.cwd {
            cmd.current_dir(cwd);
        }
        if launch.clean {
            cmd.env_clear();
        }
        if let Some((uid, gid)) = launch.ids {
            // std drops the supplementary groups (setgroups(0)) before setuid when root.
            cmd.uid(uid).gid(gid);
        }
        cmd.envs(&launch.env).env("MUSTER_RUN_ID", run.run_id.as_str()).env("MUSTER_JOB_ID", run.job_id.as_str());
        if let Some(id) = lock(&self.inner.agent_id).as_ref() {
            cmd.env("MUSTER_AGENT_ID", id.as_str());
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).kill_on_drop(false);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return finished(&run.run_id, Outcome::Failed, Some(format!("could not start: {e}"))),
        };
        let pgid = child.id().and_then(|id| rustix::process::Pid::from_raw(id as i32));
        lock(status).phase = Phase::Running;
        self.poke();

        let capture_to_ledger = |pipe: Box<dyn AsyncRead + Unpin + Send>, stream| {
            let path = lock(&self.inner.ledger).output_path(&run.run_id, stream);
            tokio::spawn(capture(pipe, path, run.output_limit, status.clone(), stream, self.clone()))
        };
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(capture_to_ledger(Box::new(out), Stream::Stdout));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(capture_to_ledger(Box::new(err), Stream::Stderr));
        }

        let timeout = Duration::from_millis(run.timeout_ms);
        let (stopped, why) = tokio::select! {
            s = child.wait() => (None, s),
            _ = tokio::time::sleep(timeout) => (Some(Outcome::TimedOut), stop(&mut child, pgid).await),
            _ = cancel.cancelled() => (Some(Outcome::Cancelled), stop(&mut child, pgid).await),
        };
        let mut truncated = [false, false];
        for (i, r) in readers.into_iter().enumerate() {
            let abort = r.abort_handle();
            match tokio::time::timeout(DRAIN_GRACE, r).await {
                Ok(Ok(t)) => truncated[i] = t,
                _ => abort.abort(),
            }
        }
        let (out_len, err_len) = {
            let st = lock(status);
            (st.out_len, st.err_len)
        };
        let mut result = finished(&run.run_id, Outcome::Failed, None);
        result.stdout_len = out_len;
        result.stderr_len = err_len;
        result.stdout_truncated = truncated[0];
        result.stderr_truncated = truncated[1];
        match why {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                result.exit_code = status.code();
                result.signal = status.signal();
                result.outcome = match stopped {
                    Some(o) => o,
                    None if status.success() => Outcome::Succeeded,
                    None => Outcome::Failed,
                };
                if stopped == Some(Outcome::TimedOut) {
                    result.error = Some(format!("timed out after {}", shared::duration::format(timeout)));
                }
            }
            Err(e) => result.error = Some(format!("could not wait for the process: {e}")),
        }
        result
    }
}

/// SIGTERM to the whole process group, SIGKILL after the grace.
async fn stop(child: &mut tokio::process::Child, pgid: Option<rustix::process::Pid>) -> std::io::Result<std::process::ExitStatus> {
    let signal_group = |sig| {
        if let Some(pgid) = pgid {
            let _ = rustix::process::kill_process_group(pgid, sig);
        }
    };
    signal_group(rustix::process::Signal::TERM);
    match tokio::time::timeout(KILL_GRACE, child.wait()).await {
        Ok(status) => {
            // The leader is gone; make sure nothing it started outlives it.
            signal_group(rustix::process::Signal::KILL);
            status
        }
        Err(_) => {
            signal_group(rustix::process::Signal::KILL);
            child.wait().await
        }
    }
}

/// Reads a pipe to its end, appending valid UTF-8 to `path` up to `limit` bytes, then draining
/// the rest so the process never blocks on a full pipe. Returns whether output was cut.
async fn capture(
    mut pipe: impl AsyncRead + Unpin,
    path: std::path::PathBuf,
    limit: u64,
    status: Arc<Mutex<RunStatus>>,
    stream: Stream,
    exec: Executor,
) -> bool {
    use std::io::Write;
    let mut file = match std::fs::OpenOptions::new().append(true).open(&path) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot open the output file");
            None
        }
    };
    let mut buf = vec![0u8; 16 * 1024];
    let mut carry: Vec<u8> = Vec::new();
    let (mut written, mut truncated) = (0u64, false);
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        let eof = n == 0;
        if truncated {
            if eof {
                break;
            }
            continue;
        }
        carry.extend_from_slice(&buf[..n]);
        let text = utf8_prefix(&mut carry, eof);
        let room = limit.saturating_sub(written) as usize;
        let mut piece = text.as_str();
        if piece.len() > room {
            let mut cut = room;
            while !piece.is_char_boundary(cut) {
                cut -= 1;
            }
            piece = &piece[..cut];
            truncated = true;
        }
        if !piece.is_empty() {
            if let Some(f) = file.as_mut()
                && f.write_all(piece.as_bytes()).is_err()
            {
                tracing::error!(path = %path.display(), "cannot write output; the rest is dropped");
                truncated = true;
            }
            written += piece.len() as u64;
            let mut st = lock(&status);
            match stream {
                Stream::Stdout => st.out_len = written,
                Stream::Stderr => st.err_len = written,
            }
            drop(st);
            exec.poke();
        }
        if eof {
            break;
        }
    }
    truncated
}

/// Takes the longest valid UTF-8 prefix out of `bytes`, replacing invalid sequences with
/// U+FFFD; an incomplete sequence at the end stays for the next read, unless at `eof`.
fn utf8_prefix(bytes: &mut Vec<u8>, eof: bool) -> String {
    let mut out = String::new();
    let mut rest: &[u8] = bytes;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                match e.error_len() {
                    Some(bad) => {
                        out.push('\u{FFFD}');
                        rest = &after[bad..];
                    }
                    None if eof => {
                        out.push('\u{FFFD}');
                        rest = &[];
                        break;
                    }
                    None => {
                        rest = after;
                        break;
                    }
                }
            }
        }
    }
    *bytes = rest.to_vec();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_reads_is_kept_whole_and_garbage_is_replaced() {
        let euro = "€".as_bytes();
        let mut carry = vec![b'a', euro[0], euro[1]];
        assert_eq!(utf8_prefix(&mut carry, false), "a");
        carry.extend_from_slice(&euro[2..]);
        carry.extend_from_slice(&[0xff, b'b']);
        assert_eq!(utf8_prefix(&mut carry, false), "€\u{FFFD}b");
        assert!(carry.is_empty());
        let mut tail = vec![b'x', euro[0]];
        assert_eq!(utf8_prefix(&mut tail, true), "x\u{FFFD}");
    }
}
