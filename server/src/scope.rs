//! Scoped operator tokens: the rules, as plain functions. A token's scope is a label selector;
//! it bounds which agents the token sees and targets, which tokens it may create, and which
//! labels it may edit. The API and the dispatcher call these; none of them does I/O.

use shared::Selector;
use shared::api::LabelEdit;
use shared::labels::{self, Labels};

/// Whether a caller with `scope` sees an agent with these (effective) labels.
pub fn sees(scope: Option<&Selector>, labels: &Labels) -> bool {
    scope.is_none_or(|s| s.matches(labels))
}

/// Whether what was made under `job_scope` (a job, a token) lies inside `scope`: everything
/// does for an unscoped caller; for a scoped one, only what was made under a scope the same as
/// its own or narrower. A job made so can only ever have run inside the caller's scope.
pub fn covers(scope: Option<&Selector>, job_scope: Option<&Selector>) -> bool {
    match (scope, job_scope) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(outer), Some(job)) => job.is_within(outer),
    }
}

/// The scope a new token may have, given its creator's: an unscoped creator may give any
/// scope or none; a scoped one must give a scope that has every term of its own (the same,
/// or narrower by more terms).
pub fn new_token_scope(creator: Option<&Selector>, requested: Option<&Selector>) -> Result<(), String> {
    match (creator, requested) {
        (None, _) => Ok(()),
        (Some(own), None) => Err(format!("a token scoped to {own} can only create tokens scoped to {own} or narrower; give a scope")),
        (Some(own), Some(new)) if new.is_within(own) => Ok(()),
        (Some(own), Some(new)) => Err(format!(
            "scope {new} is not within {own}: a scoped token's new tokens must keep every term of its own scope ({own}) and may add more"
        )),
    }
}

/// Why a label edit was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum EditRefusal {
    /// The request is malformed (a bad key, a reported `agent.` key, too many labels).
    Invalid(String),
    /// The caller's scope depends on the key.
    Scope(String),
}

/// Applies an edit to an agent's trusted labels, removals first, then what is set (so a key in
/// both ends up set); returns the new trusted labels and the new effective ones (trusted, with
/// the agent's reported `agent.` labels kept as they are). An empty edit changes nothing.
pub fn edit_labels(
    trusted: &Labels,
    effective: &Labels,
    edit: &LabelEdit,
    scope: Option<&Selector>,
) -> Result<(Labels, Labels), EditRefusal> {
    let reported_key = |k: &str| {
        EditRefusal::Invalid(format!(
            "label {k:?}: keys starting with {:?} are what the agent reports about itself and cannot be edited",
            labels::AGENT_PREFIX
        ))
    };
    let guarded: Vec<&str> = scope.map(|s| s.keys().collect()).unwrap_or_default();
    let guard = |k: &str| match scope {
        Some(s) if guarded.contains(&k) => {
            Err(EditRefusal::Scope(format!("label {k:?}: this token's scope ({s}) depends on it, so it cannot change it")))
        }
        _ => Ok(()),
    };
    let mut out = trusted.clone();
    for k in &edit.remove {
        labels::validate_key(k).map_err(|e| EditRefusal::Invalid(e.to_string()))?;
        if labels::is_reported(k) {
            return Err(reported_key(k));
        }
        guard(k)?;
        out.remove(k);
    }
    for (k, v) in edit.set.iter() {
        if labels::is_reported(k) {
            return Err(reported_key(k));
        }
        guard(k)?;
        out.insert(k, v).map_err(|e| EditRefusal::Invalid(e.to_string()))?;
    }
    let mut merged = out.clone();
    for (k, v) in effective.iter().filter(|(k, _)| labels::is_reported(k)) {
        if merged.len() >= labels::MAX_LABELS {
            break;
        }
        // Reported keys are validated when read back; one that is not is simply left out.
        let _ = merged.insert(k, v);
    }
    Ok((out, merged))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[&str]) -> Labels {
        Labels::from_pairs(pairs).unwrap()
    }

    fn sel(s: &str) -> Selector {
        Selector::parse(s).unwrap()
    }

    fn edit(set: &[&str], remove: &[&str]) -> LabelEdit {
        LabelEdit { set: labels(set), remove: remove.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn a_scoped_token_may_create_only_tokens_within_its_scope() {
        let paris = sel("site=paris");
        assert!(new_token_scope(None, None).is_ok());
        assert!(new_token_scope(None, Some(&sel("site=lyon"))).is_ok());
        assert!(new_token_scope(Some(&paris), Some(&paris)).is_ok());
        assert!(new_token_scope(Some(&paris), Some(&sel("site=paris,role=pos"))).is_ok());
        assert!(new_token_scope(Some(&paris), None).is_err());
        assert!(new_token_scope(Some(&paris), Some(&sel("site=lyon"))).is_err());
        assert!(new_token_scope(Some(&paris), Some(&sel("site in (paris,lyon)"))).is_err());
    }

    #[test]
    fn a_scoped_caller_sees_only_jobs_made_within_its_scope() {
        let paris = sel("site=paris");
        assert!(covers(None, None));
        assert!(covers(Some(&paris), Some(&sel("site=paris,role=pos"))));
        assert!(!covers(Some(&paris), None));
        assert!(!covers(Some(&sel("site=paris,role=pos")), Some(&paris)));
    }

    #[test]
    fn an_edit_keeps_reported_labels_and_refuses_to_touch_them() {
        let trusted = labels(&["site=paris", "role=pos"]);
        let effective = labels(&["site=paris", "role=pos", "agent.os=linux"]);
        let (t, e) = edit_labels(&trusted, &effective, &edit(&["tier=1"], &["role"]), None).unwrap();
        assert_eq!(t.to_string(), "site=paris,tier=1");
        assert_eq!(e.to_string(), "agent.os=linux,site=paris,tier=1");
        assert!(matches!(edit_labels(&trusted, &effective, &edit(&["agent.os=bsd"], &[]), None), Err(EditRefusal::Invalid(_))));
        assert!(matches!(edit_labels(&trusted, &effective, &edit(&[], &["agent.os"]), None), Err(EditRefusal::Invalid(_))));
        let (t, _) = edit_labels(&trusted, &effective, &edit(&["role=kiosk"], &["role"]), None).unwrap();
        assert_eq!(t.get("role"), Some("kiosk"), "a key both removed and set ends up set");
        assert_eq!(edit_labels(&trusted, &effective, &edit(&[], &[]), None).unwrap(), (trusted.clone(), effective.clone()));
    }

    #[test]
    fn a_scoped_caller_cannot_edit_a_key_its_scope_names() {
        let trusted = labels(&["site=paris", "role=pos"]);
        let scope = sel("site=paris,!canary");
        assert!(matches!(edit_labels(&trusted, &trusted, &edit(&["site=lyon"], &[]), Some(&scope)), Err(EditRefusal::Scope(_))));
        assert!(matches!(edit_labels(&trusted, &trusted, &edit(&[], &["site"]), Some(&scope)), Err(EditRefusal::Scope(_))));
        assert!(matches!(edit_labels(&trusted, &trusted, &edit(&["canary=yes"], &[]), Some(&scope)), Err(EditRefusal::Scope(_))));
        assert!(edit_labels(&trusted, &trusted, &edit(&["role=kiosk"], &[]), Some(&scope)).is_ok());
    }
}
