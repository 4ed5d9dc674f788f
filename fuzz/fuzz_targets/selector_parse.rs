//! Label selectors (`site=paris,role in (pos,kiosk),!canary`) and labels (`key=value`), as the
//! API, the CLI and the agent's config read them.
//!
//! Checks: nothing panics; a parsed selector parses again from its Display and from its JSON to
//! an equal selector, and from its terms written out afresh to the same terms; matching never
//! panics and agrees with each term; parsed labels come back from their Display and their JSON,
//! and the selector their Display makes matches them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::selector::Term;
use shared::{Labels, Selector};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    selector(&text);
    labels(&text);
});

fn selector(text: &str) {
    let Ok(sel) = Selector::parse(text) else { return };
    let shown = sel.to_string();
    assert_eq!(Selector::parse(&shown).as_ref(), Ok(&sel), "Display {shown:?} does not parse back");
    let json = serde_json::to_string(&sel).unwrap_or_else(|e| panic!("{sel:?} does not serialize: {e}"));
    assert_eq!(serde_json::from_str::<Selector>(&json).ok().as_ref(), Some(&sel), "{json}");

    let written = sel.terms().iter().map(write_term).collect::<Vec<_>>().join(",");
    let reparsed = Selector::parse(&written).unwrap_or_else(|e| panic!("terms of {text:?} written as {written:?}: {e}"));
    assert_eq!(reparsed.terms(), sel.terms(), "{written:?}");

    // Labels that satisfy every positive term, none, and one of each key with an odd value.
    let mut satisfying = Labels::new();
    let mut odd = Labels::new();
    for t in sel.terms() {
        let (k, v) = match t {
            Term::Eq(k, v) => (k, v.as_str()),
            Term::In(k, vs) => (k, vs.first().map_or("", String::as_str)),
            Term::Exists(k) | Term::NotEq(k, _) | Term::NotIn(k, _) | Term::Absent(k) => (k, "x-fuzz-odd"),
        };
        let _ = satisfying.insert(k, v);
        let _ = odd.insert(k, "x-fuzz-odd");
    }
    for labels in [&Labels::new(), &satisfying, &odd] {
        let all = sel.matches(labels);
        let each = sel.terms().iter().all(|t| term_matches(t, labels));
        assert_eq!(all, each, "{sel:?} on {labels:?}");
    }
}

fn write_term(t: &Term) -> String {
    match t {
        Term::Eq(k, v) => format!("{k}={v}"),
        Term::NotEq(k, v) => format!("{k}!={v}"),
        Term::In(k, vs) => format!("{k} in ({})", vs.join(",")),
        Term::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
        Term::Exists(k) => k.clone(),
        Term::Absent(k) => format!("!{k}"),
    }
}

/// The documented meaning of one term, written independently of `Selector::matches`.
fn term_matches(t: &Term, labels: &Labels) -> bool {
    let has = |k: &str| labels.iter().find(|(key, _)| *key == k).map(|(_, v)| v);
    match t {
        Term::Eq(k, v) => has(k) == Some(v.as_str()),
        Term::NotEq(k, v) => has(k) != Some(v.as_str()),
        Term::In(k, vs) => has(k).is_some_and(|x| vs.iter().any(|v| v == x)),
        Term::NotIn(k, vs) => !has(k).is_some_and(|x| vs.iter().any(|v| v == x)),
        Term::Exists(k) => has(k).is_some(),
        Term::Absent(k) => has(k).is_none(),
    }
}

fn labels(text: &str) {
    let _ = Labels::parse_pair(text);
    let _ = shared::labels::validate_key(text);
    let _ = shared::labels::validate_value(text);
    let from_pairs = Labels::from_pairs(text.split(',')).ok();
    let from_json = serde_json::from_str::<Labels>(text).ok();
    for labels in [from_pairs, from_json].into_iter().flatten() {
        let shown = labels.to_string();
        let back = if labels.is_empty() { Ok(Labels::new()) } else { Labels::from_pairs(shown.split(',')) };
        assert_eq!(back.as_ref(), Ok(&labels), "Display {shown:?} does not parse back");
        let json = serde_json::to_string(&labels).unwrap_or_else(|e| panic!("{labels:?} does not serialize: {e}"));
        assert_eq!(serde_json::from_str::<Labels>(&json).ok().as_ref(), Some(&labels), "{json}");
        if !labels.is_empty() {
            let sel = Selector::parse(&shown).unwrap_or_else(|e| panic!("labels {shown:?} are no selector: {e}"));
            assert!(sel.matches(&labels), "{sel:?} does not match {labels:?}");
        }
    }
}
