//! Label selectors: which agents a query or a job targets.
//!
//! The grammar is Kubernetes' set-based selector: terms joined by `,` are ANDed.
//! `site=paris`, `site==paris`, `site!=paris`, `role in (pos,kiosk)`, `role notin (pos)`,
//! `canary` (the label exists), `!canary` (it does not). `!=` and `notin` also match agents that
//! lack the key, as in Kubernetes.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::labels::{Labels, validate_key, validate_value};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Term {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    Absent(String),
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Selector {
    terms: Vec<Term>,
    source: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid selector {input:?}: {reason}")]
pub struct InvalidSelector {
    pub input: String,
    pub reason: String,
}

impl Selector {
    pub fn parse(input: &str) -> Result<Self, InvalidSelector> {
        let err = |reason: String| InvalidSelector { input: input.to_owned(), reason };
        if input.trim().is_empty() {
            return Err(err("empty selector".into()));
        }
        let terms =
            split_top_level(input).map_err(err)?.into_iter().map(|t| parse_term(t.trim())).collect::<Result<Vec<_>, _>>().map_err(err)?;
        Ok(Selector { terms, source: input.trim().to_owned() })
    }

    pub fn terms(&self) -> &[Term] {
        &self.terms
    }

    /// Every label key a term names.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.terms.iter().map(|t| match t {
            Term::Eq(k, _) | Term::NotEq(k, _) | Term::In(k, _) | Term::NotIn(k, _) | Term::Exists(k) | Term::Absent(k) => k.as_str(),
        })
    }

    /// Whether `self` is the same as `outer` or narrower, by a rule that is sound without
    /// reasoning about values: every term of `outer` is also a term of `self` (value sets
    /// compared as sets). `self` then asks all that `outer` asks and maybe more, so any labels
    /// `self` matches, `outer` matches too. (`site in (paris)` is not taken as within
    /// `site=paris`: a false "no" is safe, a false "yes" would not be.)
    pub fn is_within(&self, outer: &Selector) -> bool {
        fn norm(t: &Term) -> Term {
            let sorted = |vs: &[String]| {
                let mut vs = vs.to_vec();
                vs.sort();
                vs.dedup();
                vs
            };
            match t {
                Term::In(k, vs) => Term::In(k.clone(), sorted(vs)),
                Term::NotIn(k, vs) => Term::NotIn(k.clone(), sorted(vs)),
                t => t.clone(),
            }
        }
        let mine: Vec<Term> = self.terms.iter().map(norm).collect();
        outer.terms.iter().map(norm).all(|t| mine.contains(&t))
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.terms.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v.as_str()),
            Term::NotEq(k, v) => labels.get(k) != Some(v.as_str()),
            Term::In(k, vs) => labels.get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Term::NotIn(k, vs) => labels.get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            Term::Exists(k) => labels.get(k).is_some(),
            Term::Absent(k) => labels.get(k).is_none(),
        })
    }
}

fn split_top_level(s: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err("unbalanced ')'".into());
                }
            }
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '('".into());
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn parse_term(t: &str) -> Result<Term, String> {
    if t.is_empty() {
        return Err("empty term (two commas in a row?)".into());
    }
    let key = |k: &str| -> Result<String, String> {
        let k = k.trim();
        validate_key(k).map_err(|e| e.to_string())?;
        Ok(k.to_owned())
    };
    let value = |v: &str| -> Result<String, String> {
        let v = v.trim();
        validate_value(v).map_err(|e| e.to_string())?;
        Ok(v.to_owned())
    };
    if let Some(rest) = t.strip_prefix('!')
        && !rest.contains(['=', '('])
    {
        return Ok(Term::Absent(key(rest)?));
    }
    if let Some((k, v)) = t.split_once("!=") {
        return Ok(Term::NotEq(key(k)?, value(v)?));
    }
    if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
        return Ok(Term::Eq(key(k)?, value(v)?));
    }
    if let Some(open) = t.find('(') {
        let head = t[..open].trim_end();
        let body = t[open + 1..].strip_suffix(')').ok_or("expected ')' at the end of a set")?;
        let values = body.split(',').map(value).collect::<Result<Vec<_>, _>>()?;
        if values.iter().any(String::is_empty) {
            return Err("empty value in a set".into());
        }
        if let Some(k) = head.strip_suffix(" notin") {
            return Ok(Term::NotIn(key(k)?, values));
        }
        if let Some(k) = head.strip_suffix(" in") {
            return Ok(Term::In(key(k)?, values));
        }
        return Err(format!("expected 'in' or 'notin' before '(' in {t:?}"));
    }
    Ok(Term::Exists(key(t)?))
}

impl TryFrom<String> for Selector {
    type Error = InvalidSelector;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Selector::parse(&s)
    }
}

impl From<Selector> for String {
    fn from(s: Selector) -> String {
        s.source
    }
}

impl std::str::FromStr for Selector {
    type Err = InvalidSelector;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({})", self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[&str]) -> Labels {
        Labels::from_pairs(pairs).unwrap()
    }

    #[test]
    fn selector_from_the_docs_matches_as_described() {
        let s = Selector::parse("site=paris,role in (pos,kiosk),!canary").unwrap();
        assert!(s.matches(&labels(&["site=paris", "role=pos"])));
        assert!(s.matches(&labels(&["site=paris", "role=kiosk", "tier=1"])));
        assert!(!s.matches(&labels(&["site=paris", "role=pos", "canary=yes"])));
        assert!(!s.matches(&labels(&["site=lyon", "role=pos"])));
        assert!(!s.matches(&labels(&["site=paris"])));
    }

    #[test]
    fn every_operator_parses() {
        let s = Selector::parse("a==1, b!=2, c notin (x, y), d, !e").unwrap();
        assert_eq!(
            s.terms(),
            &[
                Term::Eq("a".into(), "1".into()),
                Term::NotEq("b".into(), "2".into()),
                Term::NotIn("c".into(), vec!["x".into(), "y".into()]),
                Term::Exists("d".into()),
                Term::Absent("e".into()),
            ]
        );
        assert!(s.matches(&labels(&["a=1", "d=", "c=z"])));
        assert!(s.matches(&labels(&["a=1", "d=yes"])));
        assert!(!s.matches(&labels(&["a=1", "d=yes", "b=2"])));
        assert!(!s.matches(&labels(&["a=1", "d=yes", "c=x"])));
    }

    #[test]
    fn malformed_selectors_are_refused_with_a_reason() {
        for bad in ["", "a=1,,b=2", "role in (pos", "role in pos)", "role within (a)", "a=b c", "!", "x in ()"] {
            assert!(Selector::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn a_selector_is_within_another_only_if_it_has_every_term_of_it() {
        let paris = Selector::parse("site=paris").unwrap();
        assert!(paris.is_within(&paris));
        assert!(Selector::parse("role=pos, site=paris").unwrap().is_within(&paris));
        assert!(!Selector::parse("site=lyon").unwrap().is_within(&paris));
        assert!(!Selector::parse("role=pos").unwrap().is_within(&paris));
        assert!(!paris.is_within(&Selector::parse("site=paris,role=pos").unwrap()));
        let set = Selector::parse("role in (pos,kiosk)").unwrap();
        assert!(Selector::parse("role in (kiosk, pos),site=paris").unwrap().is_within(&set));
        assert!(!Selector::parse("role in (kiosk)").unwrap().is_within(&set));
        assert_eq!(Selector::parse("site=paris,!canary").unwrap().keys().collect::<Vec<_>>(), ["site", "canary"]);
    }

    #[test]
    fn selector_serializes_as_written() {
        let s: Selector = serde_json::from_str("\"site=paris,!canary\"").unwrap();
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"site=paris,!canary\"");
    }
}
