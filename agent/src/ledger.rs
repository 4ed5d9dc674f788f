//! The agent's durable ledger of runs, one directory each under `<state-dir>/runs/<run id>/`:
//!
//! - `spec.json`: the run as received, written and synced before the agent says it has it;
//! - `started`: written and synced just before the process starts;
//! - `stdout`, `stderr`: output as it arrives (valid UTF-8, capped at the run's limit);
//! - `result.json`: how it ended, written atomically.
//!
//! A directory is removed only when the server acknowledges the result; its id then goes to
//! `runs/acked`. So a run id seen again is never executed twice, and a result survives
//! restarts of the agent, of the server, and of the link between them.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use shared::job::{RunId, Stream};
use shared::protocol::{Run, RunFinished};

/// Acknowledged ids remembered, most recent last; older ones are dropped when it grows.
const ACKED_KEEP: usize = 10_000;

pub struct Ledger {
    dir: PathBuf,
    acked: HashSet<RunId>,
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent()
        && let Ok(d) = File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// What the ledger knows of a run found on disk at start-up.
pub enum Found {
    /// Never started: run it now.
    NotStarted(Run),
    /// Started before the agent stopped, with no result: its fate is unknown.
    Interrupted(Run),
    /// Finished, result not yet acknowledged.
    Finished(Run, RunFinished),
}

impl Ledger {
    pub fn open(state_dir: &Path) -> std::io::Result<Ledger> {
        let dir = state_dir.join("runs");
        fs::create_dir_all(&dir)?;
        let acked = fs::read_to_string(dir.join("acked")).unwrap_or_default().lines().filter_map(|l| RunId::parse(l).ok()).collect();
        Ok(Ledger { dir, acked })
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    pub fn output_path(&self, id: &str, stream: Stream) -> PathBuf {
        self.run_dir(id).join(stream.as_str())
    }

    /// True if this run id was ever accepted here.
    pub fn knows(&self, id: &str) -> bool {
        self.acked.contains(id) || self.run_dir(id).exists()
    }

    /// Records a new run durably. A run id is a token (`RunId`: letters, digits, `-`, `_`),
    /// so it is always a directory name of its own.
    pub fn accept(&self, run: &Run) -> std::io::Result<()> {
        let dir = self.run_dir(&run.run_id);
        fs::create_dir_all(&dir)?;
        File::create(dir.join("stdout"))?;
        File::create(dir.join("stderr"))?;
        write_synced(&dir.join("spec.json"), &serde_json::to_vec(run).map_err(std::io::Error::other)?)
    }

    pub fn mark_started(&self, id: &str) -> std::io::Result<()> {
        write_synced(&self.run_dir(id).join("started"), b"")
    }

    pub fn finish(&self, result: &RunFinished) -> std::io::Result<()> {
        write_synced(&self.run_dir(&result.run_id).join("result.json"), &serde_json::to_vec(result).map_err(std::io::Error::other)?)
    }

    /// The server has the result: forget the run, remembering only its id.
    pub fn forget(&mut self, id: &RunId) -> std::io::Result<()> {
        if !self.run_dir(id).exists() {
            return Ok(());
        }
        let mut f = OpenOptions::new().append(true).create(true).open(self.dir.join("acked"))?;
        writeln!(f, "{id}")?;
        self.acked.insert(id.clone());
        fs::remove_dir_all(self.run_dir(id))?;
        if self.acked.len() > ACKED_KEEP * 2 {
            self.compact()?;
        }
        Ok(())
    }

    fn compact(&mut self) -> std::io::Result<()> {
        let text = fs::read_to_string(self.dir.join("acked"))?;
        let lines: Vec<&str> = text.lines().collect();
        let keep = &lines[lines.len().saturating_sub(ACKED_KEEP)..];
        write_synced(&self.dir.join("acked"), (keep.join("\n") + "\n").as_bytes())?;
        self.acked = keep.iter().filter_map(|s| RunId::parse(s).ok()).collect();
        Ok(())
    }

    /// Every run still on disk, for recovery at start-up.
    pub fn load(&self) -> Vec<Found> {
        let mut found = Vec::new();
        let Ok(entries) = fs::read_dir(&self.dir) else { return found };
        for e in entries.filter_map(Result::ok).filter(|e| e.path().is_dir()) {
            let dir = e.path();
            let Some(run) = fs::read(dir.join("spec.json")).ok().and_then(|b| serde_json::from_slice::<Run>(&b).ok()) else {
                // Accepted but never fully written: the server was never told, so drop it.
                let _ = fs::remove_dir_all(&dir);
                continue;
            };
            if let Some(result) = fs::read(dir.join("result.json")).ok().and_then(|b| serde_json::from_slice::<RunFinished>(&b).ok()) {
                found.push(Found::Finished(run, result));
            } else if dir.join("started").exists() {
                found.push(Found::Interrupted(run));
            } else {
                found.push(Found::NotStarted(run));
            }
        }
        found
    }

    /// Up to `max` bytes of a stream's file from `offset`, cut back to a UTF-8 boundary.
    pub fn read_chunk(&self, id: &str, stream: Stream, offset: u64, max: usize) -> std::io::Result<String> {
        let mut f = File::open(self.output_path(id, stream))?;
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; max];
        let mut n = 0;
        while n < max {
            let k = f.read(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        buf.truncate(n);
        match String::from_utf8(buf) {
            Ok(s) => Ok(s),
            Err(e) => {
                let valid = e.utf8_error().valid_up_to();
                let mut bytes = e.into_bytes();
                bytes.truncate(valid);
                Ok(String::from_utf8(bytes).unwrap_or_default())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::job::{CommandSpec, Program};
    use shared::protocol::Outcome;

    fn run(id: &str) -> Run {
        Run {
            signature: None,
            run_id: id.parse().unwrap(),
            job_id: "j".parse().unwrap(),
            command: CommandSpec {
                program: Program::Argv(vec!["true".into()]),
                cwd: None,
                env: Default::default(),
                secret_env: Default::default(),
            },
            timeout_ms: 1000,
            output_limit: 100,
        }
    }

    fn finished(id: &str) -> RunFinished {
        RunFinished {
            run_id: id.parse().unwrap(),
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            signal: None,
            error: None,
            stdout_len: 0,
            stderr_len: 0,
            stdout_truncated: false,
            stderr_truncated: false,
        }
    }

    #[test]
    fn a_run_is_known_from_acceptance_until_long_after_its_ack() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(dir.path()).unwrap();
        assert!(!l.knows("r1"));
        l.accept(&run("r1")).unwrap();
        assert!(l.knows("r1"));
        l.finish(&finished("r1")).unwrap();
        l.forget(&"r1".parse().unwrap()).unwrap();
        assert!(l.knows("r1"), "an acknowledged id is still known");
        let l = Ledger::open(dir.path()).unwrap();
        assert!(l.knows("r1"), "and still known after a restart");
        assert!(l.load().is_empty());
    }

    #[test]
    fn recovery_tells_unstarted_interrupted_and_finished_runs_apart() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        l.accept(&run("a")).unwrap();
        l.accept(&run("b")).unwrap();
        l.mark_started("b").unwrap();
        l.accept(&run("c")).unwrap();
        l.mark_started("c").unwrap();
        l.finish(&finished("c")).unwrap();
        let mut kinds: Vec<(String, &str)> = l
            .load()
            .into_iter()
            .map(|f| match f {
                Found::NotStarted(r) => (r.run_id.to_string(), "not started"),
                Found::Interrupted(r) => (r.run_id.to_string(), "interrupted"),
                Found::Finished(r, _) => (r.run_id.to_string(), "finished"),
            })
            .collect();
        kinds.sort();
        assert_eq!(kinds, vec![("a".into(), "not started"), ("b".into(), "interrupted"), ("c".into(), "finished")]);
    }

    #[test]
    fn hostile_run_ids_never_reach_the_ledger() {
        // A run id is a `RunId`: a `run` naming a path does not even decode.
        let mut text = serde_json::to_value(run("r1")).unwrap();
        for hostile in ["../../etc", "", "a/b", "."] {
            text["run_id"] = hostile.into();
            assert!(serde_json::from_value::<Run>(text.clone()).is_err(), "{hostile:?}");
        }
    }

    #[test]
    fn chunks_end_on_a_character_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        l.accept(&run("u")).unwrap();
        fs::write(l.output_path("u", Stream::Stdout), "aé€").unwrap();
        assert_eq!(l.read_chunk("u", Stream::Stdout, 0, 4).unwrap(), "aé");
        assert_eq!(l.read_chunk("u", Stream::Stdout, 3, 16).unwrap(), "€");
    }
}
