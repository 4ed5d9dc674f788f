//! `muster run`, `muster jobs`, `muster job`: send commands and read their results.
//!
//! Live output comes from the job's event stream: each line is labelled with the agent's
//! hostname and printed only once complete, so lines of different agents never interleave.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use reqwest::Method;
use shared::Timestamp;
use shared::job::{CommandSpec, CreateJob, DryRun, JobDetail, JobEvent, JobSummary, Program, RunId, RunInfo, RunState, Stream, Target};

use crate::args::{JobAction, JobArgs, RunArgs};
use crate::client::{Client, check};
use crate::output::{safe, safe_line, table};

type Out<'a> = &'a mut dyn Write;

/// What `muster run` and `muster job` exit with: 0 only if every run succeeded.
pub struct JobOutcome {
    pub all_succeeded: bool,
}

fn request(args: &RunArgs) -> CreateJob {
    let target = if args.all {
        Target::All
    } else if let Some(sel) = &args.label {
        Target::Selector(sel.clone())
    } else {
        Target::Agents(args.agents.clone())
    };
    let program = if args.shell { Program::Shell(args.command.join(" ")) } else { Program::Argv(args.command.clone()) };
    CreateJob {
        target,
        command: CommandSpec {
            program,
            cwd: None,
            env: args.env.iter().chain(&args.secret_env).cloned().collect::<BTreeMap<_, _>>(),
            secret_env: args.secret_env.iter().map(|(k, _)| k.clone()).collect(),
        },
        timeout_secs: args.timeout.map(|d| d.as_secs().max(1)),
        ttl_secs: args.ttl.map(|d| d.as_secs()),
        concurrency: args.concurrency,
        max_errors: args.max_errors,
        output_limit: None,
        dry_run: args.dry_run,
        id: None,
        signature: None,
    }
}

/// Turns a request into a signed one: the target becomes the agent ids the signature binds
/// (a selector is also signed, for each agent to check against its own labels).
async fn sign(client: &Client, signer: &crate::keys::Signer, req: &mut CreateJob) -> anyhow::Result<()> {
    let selector = match &req.target {
        Target::Selector(s) => Some(s.clone()),
        _ => None,
    };
    let ids = match &req.target {
        Target::Agents(ids) => ids.clone(),
        _ => {
            let mut dry = req.clone();
            dry.dry_run = true;
            let matched: DryRun = client.post("/jobs", &dry).await?;
            matched.agents.into_iter().map(|a| a.id).collect()
        }
    };
    if ids.is_empty() {
        anyhow::bail!("the target ({}) matches no agents: nothing to sign", req.target);
    }
    let id = crate::keys::new_job_id()?;
    let ttl = Duration::from_secs(req.ttl_secs.unwrap_or(shared::job::DEFAULT_TTL_SECS));
    let timeout = Duration::from_secs(req.timeout_secs.unwrap_or(shared::job::DEFAULT_TIMEOUT_SECS));
    let signature = signer.sign_job(&id, &req.command, &ids, crate::keys::expiry(ttl, timeout), selector.as_ref())?;
    let mut err = std::io::stderr();
    writeln!(err, "Signed for {} with {}.", crate::output::agents(ids.len() as u64), signer.public)?;
    req.target = Target::Agents(ids);
    req.id = Some(id);
    req.signature = Some(signature);
    Ok(())
}

pub async fn run(client: &Client, args: &RunArgs, signer: Option<&crate::keys::Signer>, out: Out<'_>) -> anyhow::Result<JobOutcome> {
    let mut req = request(args);
    if let Some(signer) = signer
        && !args.dry_run
    {
        sign(client, signer, &mut req).await?;
    }
    if args.dry_run {
        let dry: DryRun = client.post("/jobs", &req).await?;
        if args.json {
            serde_json::to_writer_pretty(&mut *out, &dry)?;
            writeln!(out)?;
        } else {
            writeln!(
                out,
                "{} {}, {} online now.",
                crate::output::agents(dry.matched),
                if dry.matched == 1 { "matches" } else { "match" },
                dry.online
            )?;
            if dry.require_signature > 0 {
                let how = match signer {
                    Some(s) => format!("this job would be signed with {}", s.public),
                    None => "this job would not be signed (no signing key, or --no-sign), so it would fail there".into(),
                };
                writeln!(out, "{} of {} accept only signed jobs; {how}.", dry.require_signature, crate::output::agents(dry.matched))?;
            }
            let rows: Vec<Vec<String>> = dry
                .agents
                .iter()
                .map(|a| {
                    vec![
                        a.hostname.clone(),
                        a.id.to_string(),
                        if a.online { "online".into() } else { "offline".into() },
                        if a.trusted_keys.is_empty() { "-".into() } else { "required".into() },
                    ]
                })
                .collect();
            if !rows.is_empty() {
                write!(out, "{}", table(&["HOSTNAME", "ID", "NOW", "SIGNED"], &rows))?;
            }
            if dry.needs_approval {
                writeln!(out, "The job would wait for a second admin's approval (more agents than the server's approval_above).")?;
            }
        }
        return Ok(JobOutcome { all_succeeded: true });
    }
    let job: JobSummary = client.post("/jobs", &req).await?;
    if args.detach {
        if args.json {
            serde_json::to_writer_pretty(&mut *out, &job)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{}", job.id)?;
        }
        return Ok(JobOutcome { all_succeeded: true });
    }
    let live = !args.json;
    if live {
        let mut err = std::io::stderr();
        writeln!(err, "Job {}: {} on {} ({}).", job.id, safe(&job.command.summary()), crate::output::agents(job.total), job.target)?;
        if job.approval.as_ref().is_some_and(|a| a.approved_by.is_none()) {
            writeln!(
                err,
                "It matches more agents than the server runs on one admin's word: nothing runs until another admin runs `muster job approve {}` (within its ttl of {}). Ctrl-C leaves it waiting.",
                job.id,
                shared::duration::format(Duration::from_secs(job.ttl_secs))
            )?;
        }
    }
    let finished = follow(client, &job.id, live, out).await?;
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &finished)?;
        writeln!(out)?;
    } else {
        summary(&finished, out)?;
    }
    Ok(JobOutcome { all_succeeded: all_succeeded(&finished) })
}

fn all_succeeded(job: &JobDetail) -> bool {
    job.runs.iter().all(|r| r.state == RunState::Succeeded)
}

/// Follows a job's event stream until it finishes, printing output as it comes when `live`;
/// returns the finished job. Reconnects (bounded) if the stream drops.
async fn follow(client: &Client, id: &str, live: bool, out: Out<'_>) -> anyhow::Result<JobDetail> {
    let mut view = View::new(live);
    let mut failures = 0;
    let mut backoff = shared::backoff::Backoff::new(crate::watch::RECONNECT_INITIAL, crate::watch::RECONNECT_MAX);
    loop {
        match stream_once(client, id, &mut view, out).await {
            Ok(true) => break,
            Ok(false) => {
                failures = 0;
                backoff.reset();
            }
            Err(e) => {
                failures += 1;
                if failures > 30 {
                    return Err(e.context("lost the job's event stream; the job goes on: see `muster job`"));
                }
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
    view.clear_progress();
    // The final state, from the database: what the summary and the exit status rest on.
    client.get(&format!("/jobs/{id}")).await
}

/// Streams of runs whose output the snapshot carried only the head of: (run, stream, from).
fn missing_output(job: &JobDetail) -> Vec<(RunId, Stream, u64)> {
    let mut missing = Vec::new();
    for r in &job.runs {
        for (stream, text, len) in [(Stream::Stdout, &r.stdout, r.stdout_len), (Stream::Stderr, &r.stderr, r.stderr_len)] {
            if (text.len() as u64) < len {
                missing.push((r.id.clone(), stream, text.len() as u64));
            }
        }
    }
    missing
}

/// Reads one stream of a run from `from` to what the server holds, page by page.
async fn fill(client: &Client, view: &mut View, run_id: &str, stream: Stream, mut from: u64, out: Out<'_>) -> anyhow::Result<()> {
    // Bounded: each page moves `from` forward, and a stream holds at most 16 MiB.
    for _ in 0..1024 {
        let query = [("stream", stream.as_str().to_owned()), ("offset", from.to_string()), ("limit", "1048576".to_owned())];
        let page: shared::job::OutputPage = client.get_query(&format!("/runs/{run_id}/output"), &query).await?;
        view.output(run_id, stream, page.offset, &page.data, out)?;
        if page.data.is_empty() || page.next_offset >= page.len {
            break;
        }
        from = page.next_offset;
    }
    if view.runs.get(run_id).is_some_and(|r| r.state.is_final()) {
        view.flush(run_id, out)?;
    }
    Ok(())
}

/// One connection to the event stream. True once the job has finished.
async fn stream_once(client: &Client, id: &str, view: &mut View, out: Out<'_>) -> anyhow::Result<bool> {
    let resp = client.execute(client.request(Method::GET, &format!("/jobs/{id}/events"))).await?;
    let resp = check(resp).await?;
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.context("reading the event stream")?);
        for frame in crate::sse::take_frames(&mut buf) {
            let event: JobEvent = serde_json::from_str(&frame.data).context("an event this CLI does not understand")?;
            let event = if matches!(event, JobEvent::Resync) {
                JobEvent::Snapshot(Box::new(client.get::<JobDetail>(&format!("/jobs/{id}")).await?))
            } else {
                event
            };
            let missing = match &event {
                JobEvent::Snapshot(job) if view.live => missing_output(job),
                _ => Vec::new(),
            };
            let finished = view.apply(event, out)?;
            // A snapshot carries the head of each run's output; the rest comes a page at a time.
            for (run_id, stream, from) in missing {
                fill(client, view, &run_id, stream, from, out).await?;
            }
            if finished {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

struct RunView {
    hostname: String,
    state: RunState,
    /// Bytes of each stream received so far, and the partial last line.
    have: [u64; 2],
    partial: [String; 2],
}

/// The live picture of a job on the terminal.
struct View {
    live: bool,
    progress: bool,
    runs: HashMap<RunId, RunView>,
}

impl View {
    fn new(live: bool) -> Self {
        View { live, progress: live && std::io::stderr().is_terminal(), runs: HashMap::new() }
    }

    /// Applies an event; true when the job has finished.
    fn apply(&mut self, event: JobEvent, out: Out<'_>) -> anyhow::Result<bool> {
        match event {
            JobEvent::Snapshot(job) => {
                for r in job.runs {
                    let entry = self.runs.entry(r.id.clone()).or_insert_with(|| RunView {
                        hostname: r.hostname.clone(),
                        state: r.state,
                        have: [0, 0],
                        partial: [String::new(), String::new()],
                    });
                    entry.state = r.state;
                    // A run whose output continues past the snapshot's head is flushed once
                    // the rest is read (`fill`).
                    let whole = r.stdout.len() as u64 >= r.stdout_len && r.stderr.len() as u64 >= r.stderr_len;
                    let (id, final_) = (r.id.clone(), r.state.is_final() && whole);
                    self.output(&id, Stream::Stdout, 0, &r.stdout, out)?;
                    self.output(&id, Stream::Stderr, 0, &r.stderr, out)?;
                    if final_ {
                        self.flush(&id, out)?;
                    }
                }
                if job.job.finished_at.is_some() {
                    return Ok(true);
                }
            }
            JobEvent::Run { run_id, state, .. } => {
                if let Some(r) = self.runs.get_mut(&run_id) {
                    r.state = state;
                }
                if state.is_final() {
                    self.flush(&run_id, out)?;
                }
            }
            JobEvent::Output { run_id, stream, offset, data, .. } => self.output(&run_id, stream, offset, &data, out)?,
            JobEvent::Finished { .. } => return Ok(true),
            JobEvent::Resync => {}
        }
        self.draw_progress();
        Ok(false)
    }

    fn output(&mut self, run_id: &str, stream: Stream, offset: u64, data: &str, out: Out<'_>) -> anyhow::Result<()> {
        let i = stream as usize;
        let Some(r) = self.runs.get_mut(run_id) else { return Ok(()) };
        let end = offset + data.len() as u64;
        if end <= r.have[i] || offset > r.have[i] {
            return Ok(());
        }
        let fresh = data.get((r.have[i] - offset) as usize..).unwrap_or_default();
        r.have[i] = end;
        r.partial[i].push_str(fresh);
        if !self.live {
            return Ok(());
        }
        let mut lines = Vec::new();
        while let Some(nl) = r.partial[i].find('\n') {
            let line: String = r.partial[i].drain(..=nl).collect();
            lines.push(line);
        }
        if lines.is_empty() {
            return Ok(());
        }
        let host = r.hostname.clone();
        self.clear_progress();
        for line in lines {
            print_line(&host, stream, line.trim_end_matches('\n'), out)?;
        }
        Ok(())
    }

    /// A final run's last line, even without a newline.
    fn flush(&mut self, run_id: &str, out: Out<'_>) -> anyhow::Result<()> {
        let Some(r) = self.runs.get_mut(run_id) else { return Ok(()) };
        let host = r.hostname.clone();
        let rest: Vec<(Stream, String)> = [Stream::Stdout, Stream::Stderr]
            .into_iter()
            .filter_map(|s| {
                let p = std::mem::take(&mut r.partial[s as usize]);
                (!p.is_empty()).then_some((s, p))
            })
            .collect();
        if self.live && !rest.is_empty() {
            self.clear_progress();
            for (s, line) in rest {
                print_line(&host, s, &line, out)?;
            }
        }
        Ok(())
    }

    fn draw_progress(&self) {
        if !self.progress {
            return;
        }
        let total = self.runs.len();
        let done = self.runs.values().filter(|r| r.state == RunState::Succeeded).count();
        let failed = self.runs.values().filter(|r| r.state.is_failure()).count();
        let stopped = self.runs.values().filter(|r| r.state.is_final() && r.state != RunState::Succeeded && !r.state.is_failure()).count();
        let running = self.runs.values().filter(|r| matches!(r.state, RunState::Dispatched | RunState::Running)).count();
        let pending = total - done - failed - stopped - running;
        let stopped = if stopped > 0 { format!(", {stopped} cancelled or skipped") } else { String::new() };
        let _ = write!(
            std::io::stderr(),
            "\r\x1b[2K[{}/{total}] {done} ok, {failed} failed{stopped}, {running} running, {pending} pending",
            total - pending - running
        );
    }

    fn clear_progress(&self) {
        if self.progress {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        }
    }
}

fn print_line(host: &str, stream: Stream, line: &str, out: Out<'_>) -> anyhow::Result<()> {
    match stream {
        Stream::Stdout => writeln!(out, "{}: {}", safe(host), safe_line(line))?,
        Stream::Stderr => {
            out.flush()?;
            writeln!(std::io::stderr(), "{}: {}", safe(host), safe_line(line))?;
        }
    }
    Ok(())
}

/// How a run ended, in a few words: `succeeded`, `failed (exit 2)`, `timed_out`.
pub fn ending(state: RunState, exit_code: Option<i32>, signal: Option<i32>) -> String {
    match (state, exit_code, signal) {
        (RunState::Failed, Some(code), _) => format!("failed (exit {code})"),
        (RunState::Failed, None, Some(sig)) => format!("failed (signal {sig})"),
        (s, _, _) => s.to_string(),
    }
}

/// Groups runs whose ending and output are identical: "412 agents succeeded: 6.1.0-18".
pub fn summary(job: &JobDetail, out: Out<'_>) -> anyhow::Result<()> {
    let mut groups: BTreeMap<(String, String), Vec<&RunInfo>> = BTreeMap::new();
    for r in &job.runs {
        let text = if r.stdout.trim().is_empty() { r.stderr.trim().to_owned() } else { r.stdout.trim().to_owned() };
        let text = match (&r.error, text.is_empty()) {
            (Some(e), true) => e.clone(),
            _ => text,
        };
        groups.entry((ending(r.state, r.exit_code, r.signal), text)).or_default().push(r);
    }
    let counts: Vec<String> = job.job.counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    writeln!(out, "\n{} run{}: {}", job.job.total, if job.job.total == 1 { "" } else { "s" }, counts.join(", "))?;
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
    for ((how, text), runs) in groups {
        let who = crate::output::agents(runs.len() as u64);
        let hosts = if runs.len() <= 3 {
            format!(" ({})", runs.iter().map(|r| safe(&r.hostname)).collect::<Vec<_>>().join(", "))
        } else {
            String::new()
        };
        let truncated = runs.iter().any(|r| r.stdout_truncated || r.stderr_truncated);
        let text = text.lines().map(safe_line).collect::<Vec<_>>().join("\n    ");
        let text = if text.contains('\n') { format!("\n    {text}") } else { text };
        let more = runs.iter().any(|r| (r.stdout.len() as u64) < r.stdout_len || (r.stderr.len() as u64) < r.stderr_len);
        let note = match (truncated, more) {
            (true, _) => " [output truncated]",
            (false, true) => " [output continues: muster job ID prints all of it]",
            _ => "",
        };
        writeln!(out, "  {who} {how}{hosts}: {text}{note}")?;
    }
    Ok(())
}

pub async fn jobs(client: &Client, limit: u32, as_json: bool, out: Out<'_>) -> anyhow::Result<()> {
    let jobs: Vec<JobSummary> = client.get_query("/jobs", &[("limit", limit)]).await?;
    if as_json {
        serde_json::to_writer_pretty(&mut *out, &jobs)?;
        writeln!(out)?;
        return Ok(());
    }
    let now = Timestamp::now();
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let state = if j.cancelled_at.is_some() && j.finished_at.is_some() {
                "cancelled"
            } else if j.finished_at.is_some() {
                "finished"
            } else {
                "running"
            };
            let ok = j.counts.get(&RunState::Succeeded).copied().unwrap_or(0);
            vec![
                j.id.to_string(),
                crate::output::age(j.created_at.age(now)),
                state.into(),
                format!("{ok}/{}", j.total),
                j.target.to_string(),
                j.command.summary(),
            ]
        })
        .collect();
    write!(out, "{}", table(&["ID", "CREATED", "STATE", "OK", "TARGET", "COMMAND"], &rows))?;
    Ok(())
}

pub async fn job(client: &Client, args: &JobArgs, out: Out<'_>) -> anyhow::Result<JobOutcome> {
    if let Some(JobAction::Cancel { id }) = &args.action {
        let job: JobDetail = client.post(&format!("/jobs/{id}/cancel"), &serde_json::json!({})).await?;
        let counts: Vec<String> = job.job.counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
        writeln!(out, "Job {id} cancelled: {}.", counts.join(", "))?;
        return Ok(JobOutcome { all_succeeded: true });
    }
    if let Some(JobAction::Approve { id }) = &args.action {
        let job: JobSummary = client.post(&format!("/jobs/{id}/approve"), &serde_json::json!({})).await?;
        if args.json {
            serde_json::to_writer_pretty(&mut *out, &job)?;
            writeln!(out)?;
        } else {
            writeln!(out, "Job {id} approved: it runs on {} now.", crate::output::agents(job.total))?;
        }
        return Ok(JobOutcome { all_succeeded: true });
    }
    let Some(id) = &args.id else { bail!("name a job: muster job <ID>") };
    let job: JobDetail = client.get(&format!("/jobs/{id}")).await?;
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &job)?;
        writeln!(out)?;
        return Ok(JobOutcome { all_succeeded: all_succeeded(&job) });
    }
    let j = &job.job;
    writeln!(out, "Job       {}", j.id)?;
    writeln!(out, "Command   {}", j.command.summary())?;
    writeln!(out, "Target    {}", j.target)?;
    writeln!(out, "Created   {} by {}", j.created_at, j.created_by)?;
    let state = match (j.finished_at, j.cancelled_at) {
        (Some(f), Some(_)) => format!("cancelled, finished {f}"),
        (Some(f), None) => format!("finished {f}"),
        (None, Some(_)) => "cancelling".into(),
        (None, None) if j.approval.as_ref().is_some_and(|a| a.approved_by.is_none()) => {
            format!("waiting for a second admin: muster job approve {}", j.id)
        }
        (None, None) => "running".into(),
    };
    writeln!(out, "State     {state}")?;
    if let Some(by) = j.approval.as_ref().and_then(|a| a.approved_by.as_ref()) {
        writeln!(out, "Approved  by {by}")?;
    }
    let rows: Vec<Vec<String>> = job
        .runs
        .iter()
        .map(|r| {
            let took = match (r.started_at, r.finished_at) {
                (Some(s), Some(f)) => format!("{:.1}s", f.age(s).as_secs_f64()),
                _ => "-".into(),
            };
            vec![
                r.hostname.clone(),
                r.agent_id.to_string(),
                ending(r.state, r.exit_code, r.signal),
                took,
                r.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    writeln!(out)?;
    write!(out, "{}", table(&["HOSTNAME", "AGENT", "STATE", "TOOK", "NOTE"], &rows))?;
    summary(&job, out)?;
    Ok(JobOutcome { all_succeeded: all_succeeded(&job) })
}
