//! Run output: chunks stitched by byte offset (repeats, overlaps, gaps, conflicts), cut at the
//! job's limit on a character boundary, and read back as heads and as pages.

use std::sync::Arc;

use shared::job::{RunState, Stream};
use shared::protocol::Outcome;

use super::{chunk, enrolled, finished, fleet, job_row, runs_for, ts};
use crate::store::{Effect, Record, Store};

const JOB: &str = "00000000000000j1";

/// The `(stream, offset, data)` of each `Output` effect.
fn outputs(effects: &[Effect]) -> Vec<(Stream, u64, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Output { stream, offset, data, .. } => Some((*stream, *offset, data.clone())),
            _ => None,
        })
        .collect()
}

async fn text(store: &dyn Store, run: &str, stream: Stream) -> String {
    store.run_output(run, stream, 0, 1 << 30).await.unwrap().unwrap().1
}

/// The attack of 4 KiB chunks at every offset, against an 8 KiB limit. A backend's own test
/// may run it and then look at how its rows hold the 8 KiB (SQLite's does).
pub(crate) async fn output_is_stored_once_within_the_limit_whatever_the_offsets(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    let mut job = job_row(JOB, 1);
    job.output_limit = 8 * 1024;
    store.create_job(&job, &[("r1".parse().unwrap(), a.id.clone())]).await.unwrap();
    let out = |offset: u64, data: &str| chunk(&a.id, "r1", Stream::Stdout, offset, data);
    // (0,"ab") then (0,"abcd"): the new tail is stitched on; a differing overlap is refused.
    store.record(&[out(0, "ab")]).await.unwrap();
    let effects = store.record(&[out(0, "abcd"), out(1, "XY")]).await.unwrap();
    assert!(effects.iter().any(|e| matches!(e, Effect::Output { offset: 2, data, .. } if data == "cd")), "{effects:?}");
    assert_eq!(outputs(&effects).len(), 1, "the conflicting chunk adds nothing: {effects:?}");
    let run = store.run("r1").await.unwrap().unwrap();
    assert_eq!(run.stdout_len, 4);
    // The attack: 4 KiB chunks at offsets 4, 5, 6, ... in batches.
    let big = "abcd".repeat(4 * 1024);
    for start in (4..(10 * 1024)).step_by(512) {
        let batch: Vec<Record> = (start..start + 512).map(|o| out(o, &big[o as usize..][..4 * 1024])).collect();
        store.record(&batch).await.unwrap();
    }
    let (run, text) = store.run_output("r1", Stream::Stdout, 0, 1 << 20).await.unwrap().unwrap();
    assert_eq!(run.stdout_len, 8 * 1024);
    assert!(run.stdout_truncated);
    assert_eq!(text, big[..8 * 1024]);
    // Pages of the output end where the next begins.
    let (_, page) = store.run_output("r1", Stream::Stdout, 1000, 10).await.unwrap().unwrap();
    assert_eq!(page, big[1000..1010]);
}

pub(crate) async fn output_chunks_are_stitched_by_offset_through_repeats_overlaps_and_gaps(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    store.create_job(&job_row(JOB, 1), &[("r1".parse().unwrap(), a.id.clone())]).await.unwrap();
    let out = |offset: u64, data: &str| chunk(&a.id, "r1", Stream::Stdout, offset, data);
    let err = |offset: u64, data: &str| chunk(&a.id, "r1", Stream::Stderr, offset, data);

    let effects = store.record(&[out(0, "hello "), out(0, "hello "), out(3, "lo wor"), err(0, "warn")]).await.unwrap();
    assert_eq!(
        outputs(&effects),
        [(Stream::Stdout, 0, "hello ".into()), (Stream::Stdout, 6, "wor".into()), (Stream::Stderr, 0, "warn".into())],
        "a repeat adds nothing, an overlap adds only its new tail"
    );
    let Some(Effect::Output { job_id, run_id, agent_id, .. }) = effects.first() else { panic!("{effects:?}") };
    assert_eq!((job_id.as_str(), run_id.as_str(), agent_id), (JOB, "r1", &a.id));

    // Two chunks past the end: one request to send again, from what each stream holds.
    let effects = store.record(&[out(20, "x"), out(30, "y"), out(9, "ld")]).await.unwrap();
    let resends: Vec<&Effect> = effects.iter().filter(|e| matches!(e, Effect::Resend { .. })).collect();
    assert_eq!(resends, [&Effect::Resend { agent_id: a.id.clone(), run_id: "r1".parse().unwrap(), stdout_from: 9, stderr_from: 4 }]);
    assert_eq!(outputs(&effects), [(Stream::Stdout, 9, "ld".into())], "a chunk at the end is taken after a gap");

    // A chunk that differs from what is stored where they overlap is refused whole.
    assert!(store.record(&[out(6, "WORLD!")]).await.unwrap().is_empty());
    // Chunks of one batch overlap each other, and are stitched all the same.
    let effects = store.record(&[out(11, "!!"), out(12, "!?"), err(2, "rning")]).await.unwrap();
    assert_eq!(outputs(&effects), [(Stream::Stdout, 11, "!!".into()), (Stream::Stdout, 13, "?".into()), (Stream::Stderr, 4, "ing".into())]);

    assert_eq!(text(&*store, "r1", Stream::Stdout).await, "hello world!!?");
    assert_eq!(text(&*store, "r1", Stream::Stderr).await, "warning");
    let run = store.run("r1").await.unwrap().unwrap();
    assert_eq!((run.stdout_len, run.stderr_len, run.stdout_truncated, run.stderr_truncated), (14, 7, false, false));
}

pub(crate) async fn output_is_cut_at_the_limit_on_a_character_boundary(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    let mut job = job_row(JOB, 1);
    job.output_limit = 5;
    store.create_job(&job, &[("r1".parse().unwrap(), a.id.clone())]).await.unwrap();
    let out = |offset: u64, data: &str| chunk(&a.id, "r1", Stream::Stdout, offset, data);
    // "abcdé" is 6 bytes; the fifth would split the é.
    let effects = store.record(&[out(0, "abcdé")]).await.unwrap();
    assert_eq!(outputs(&effects), [(Stream::Stdout, 0, "abcd".into())]);
    let run = store.run("r1").await.unwrap().unwrap();
    assert_eq!((run.stdout_len, run.stdout_truncated), (4, true));
    // A truncated stream takes nothing more.
    assert!(store.record(&[out(4, "é"), out(4, "e")]).await.unwrap().is_empty());
    assert_eq!(text(&*store, "r1", Stream::Stdout).await, "abcd");
    // Exactly at the limit is not truncated, until more arrives.
    store
        .create_job(
            &{
                let mut j = job_row("00000000000000j2", 2);
                j.output_limit = 3;
                j
            },
            &[("r2".parse().unwrap(), a.id.clone())],
        )
        .await
        .unwrap();
    store.record(&[chunk(&a.id, "r2", Stream::Stderr, 0, "abc")]).await.unwrap();
    assert!(!store.run("r2").await.unwrap().unwrap().stderr_truncated);
    assert!(store.record(&[chunk(&a.id, "r2", Stream::Stderr, 3, "d")]).await.unwrap().is_empty());
    let r2 = store.run("r2").await.unwrap().unwrap();
    assert_eq!((r2.stderr_len, r2.stderr_truncated), (3, true));
}

pub(crate) async fn output_is_refused_for_unknown_runs_other_agents_and_settled_results(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 2).await;
    let [a, b] = [&agents[0].id, &agents[1].id];
    store.create_job(&job_row(JOB, 1), &runs_for("r", &agents)).await.unwrap();
    store.create_job(&job_row("00000000000000j2", 2), &[("lost".parse().unwrap(), a.clone())]).await.unwrap();
    assert!(store.record(&[chunk(a, "nope", Stream::Stdout, 0, "x"), chunk(a, "r1", Stream::Stdout, 0, "x")]).await.unwrap().is_empty());
    assert_eq!(store.run("r1").await.unwrap().unwrap().stdout_len, 0, "another agent's run");

    // A succeeded run's output is settled; a lost one may still hear from its agent.
    store.record(&[finished(b, "r1", Outcome::Succeeded, 0, 0, 10)]).await.unwrap();
    store.mark_dispatched(&["lost".parse().unwrap()], ts(10)).await.unwrap();
    store.end_runs(&["lost".parse().unwrap()], RunState::Lost, "no report", ts(20)).await.unwrap();
    let effects = store.record(&[chunk(b, "r1", Stream::Stdout, 0, "late"), chunk(a, "lost", Stream::Stdout, 0, "late")]).await.unwrap();
    assert_eq!(outputs(&effects), [(Stream::Stdout, 0, "late".into())]);
    assert_eq!(store.run("r1").await.unwrap().unwrap().stdout_len, 0);
    let effects = store.record(&[finished(a, "lost", Outcome::Succeeded, 4, 0, 30)]).await.unwrap();
    assert!(effects.contains(&Effect::Ack { agent_id: a.clone(), run_id: "lost".parse().unwrap() }));
    assert_eq!(text(&*store, "lost", Stream::Stdout).await, "late");
    assert_eq!(store.run("lost").await.unwrap().unwrap().state, RunState::Succeeded);
}

pub(crate) async fn output_heads_give_each_stream_its_head_within_the_total(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 3).await;
    store.create_job(&job_row(JOB, 1), &runs_for("r", &agents)).await.unwrap();
    store.create_job(&job_row("00000000000000j2", 2), &[("other".parse().unwrap(), agents[0].id.clone())]).await.unwrap();
    let full = [("r0", "0123456789", "éééé"), ("r1", "abcdefghij", "")];
    let mut batch = Vec::new();
    for (i, (run, out, err)) in full.iter().enumerate() {
        batch.push(chunk(&agents[i].id, run, Stream::Stdout, 0, &out[..5]));
        batch.push(chunk(&agents[i].id, run, Stream::Stdout, 5, &out[5..]));
        if !err.is_empty() {
            batch.push(chunk(&agents[i].id, run, Stream::Stderr, 0, err));
        }
    }
    batch.push(chunk(&agents[0].id, "other", Stream::Stdout, 0, "not this job's"));
    store.record(&batch).await.unwrap();

    let heads = store.run_output_heads(JOB, 4, 1 << 20).await.unwrap();
    assert_eq!((heads["r0"].stdout.as_str(), heads["r0"].stderr.as_str()), ("0123", "éé"), "4 bytes, or fewer to end on a character");
    assert_eq!((heads["r1"].stdout.as_str(), heads["r1"].stderr.as_str()), ("abcd", ""));
    assert!(heads.get("r2").is_none_or(|h| h.stdout.is_empty() && h.stderr.is_empty()), "a run with no output has none");
    assert!(!heads.contains_key("other"));

    let whole = store.run_output_heads(JOB, 1 << 20, 1 << 20).await.unwrap();
    for (run, out, err) in full {
        assert_eq!((whole[run].stdout.as_str(), whole[run].stderr.as_str()), (out, err));
    }
    // Past the total, runs get less or nothing; what they get is the start of their output.
    for total in [0, 7, 12, 27] {
        let heads = store.run_output_heads(JOB, 1 << 20, total).await.unwrap();
        let spent: usize = heads.values().map(|h| h.stdout.len() + h.stderr.len()).sum();
        assert!(spent as u64 <= total, "{spent} bytes for a total of {total}");
        for (run, out, err) in full {
            if let Some(h) = heads.get(run) {
                assert!(out.starts_with(&h.stdout) && err.starts_with(&h.stderr), "{run}: {h:?}");
            }
        }
    }
    assert!(store.run_output_heads("00000000000000j9", 100, 100).await.unwrap().is_empty());
}

pub(crate) async fn output_pages_end_on_a_character_boundary_and_the_next_begins_there(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    store.create_job(&job_row(JOB, 1), &[("r1".parse().unwrap(), a.id.clone())]).await.unwrap();
    let whole = "aé€😀bc€d";
    let mut batch = Vec::new();
    let (mut at, mut rest) = (0, whole);
    while !rest.is_empty() {
        let mut n = 3.min(rest.len());
        while !rest.is_char_boundary(n) {
            n += 1;
        }
        batch.push(chunk(&a.id, "r1", Stream::Stderr, at, &rest[..n]));
        (at, rest) = (at + n as u64, &rest[n..]);
    }
    store.record(&batch).await.unwrap();

    // A page never ends inside a character: the next starts where it stopped.
    for limit in [4, 5, 7, 64] {
        let (mut offset, mut pages) = (0u64, String::new());
        loop {
            let (run, page) = store.run_output("r1", Stream::Stderr, offset, limit).await.unwrap().unwrap();
            assert_eq!(run.stderr_len, whole.len() as u64);
            assert!(page.len() as u64 <= limit);
            if page.is_empty() {
                break;
            }
            offset += page.len() as u64;
            pages.push_str(&page);
        }
        assert_eq!(pages, whole, "pages of {limit} bytes");
    }
    let (run, page) = store.run_output("r1", Stream::Stderr, 1, 5).await.unwrap().unwrap();
    assert_eq!(page, "é€", "from offset 1: é is 2 bytes, € 3");
    assert_eq!(run.id, "r1");
    assert_eq!(store.run_output("r1", Stream::Stderr, 1_000, 10).await.unwrap().unwrap().1, "", "past the end");
    assert_eq!(store.run_output("r1", Stream::Stdout, 0, 10).await.unwrap().unwrap().1, "", "the other stream");
    assert!(store.run_output("nope", Stream::Stdout, 0, 10).await.unwrap().is_none());
}
