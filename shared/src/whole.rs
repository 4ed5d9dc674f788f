//! Whole numbers in API request bodies. JSON has one kind of number, and JSON Schema, which the
//! OpenAPI document speaks, calls `60.0` and `6e1` integers; serde alone takes only `60` for a
//! `u64`. These take any number that is whole and in range, and refuse fractions, negative
//! numbers and overflow as serde does. Use with `#[serde(deserialize_with = "...")]`.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserializer;
use serde::de::{Error, Unexpected, Visitor};

/// 2^64, the first `f64` past `u64::MAX`; every whole `f64` below it converts exactly.
const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;

struct Whole<T>(PhantomData<T>);

impl<T: TryFrom<u64>> Visitor<'_> for Whole<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a whole number in range")
    }

    fn visit_u64<E: Error>(self, v: u64) -> Result<T, E> {
        T::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
    }

    fn visit_i64<E: Error>(self, v: i64) -> Result<T, E> {
        let v = u64::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))?;
        self.visit_u64(v)
    }

    fn visit_f64<E: Error>(self, v: f64) -> Result<T, E> {
        if v.fract() == 0.0 && (0.0..TWO_POW_64).contains(&v) {
            self.visit_u64(v as u64)
        } else {
            Err(E::invalid_value(Unexpected::Float(v), &self))
        }
    }
}

/// A whole number: `60`, `60.0` or `6e1`.
pub fn number<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
    d.deserialize_u64(Whole(PhantomData))
}

struct OptionalWhole<T>(PhantomData<T>);

impl<'de, T: TryFrom<u64>> Visitor<'de> for OptionalWhole<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a whole number or null")
    }

    fn visit_none<E: Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_unit<E: Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        number(d).map(Some)
    }
}

/// A whole number or null; with `#[serde(default)]`, also left out.
pub fn option<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<Option<T>, D::Error> {
    d.deserialize_option(OptionalWhole(PhantomData))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Body {
        #[serde(deserialize_with = "super::number")]
        n: u32,
        #[serde(default, deserialize_with = "super::option")]
        o: Option<u64>,
    }

    fn parse(json: &str) -> Result<Body, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn whole_numbers_are_taken_in_any_notation() {
        assert_eq!(parse(r#"{"n": 60}"#).unwrap(), Body { n: 60, o: None });
        assert_eq!(parse(r#"{"n": 60.0, "o": 6e1}"#).unwrap(), Body { n: 60, o: Some(60) });
        assert_eq!(parse(r#"{"n": 0, "o": null}"#).unwrap(), Body { n: 0, o: None });
        assert_eq!(parse(r#"{"n": 4294967295, "o": 18446744073709551615}"#).unwrap().o, Some(u64::MAX));
        assert_eq!(parse(r#"{"n": -0.0, "o": 1e19}"#).unwrap(), Body { n: 0, o: Some(10_000_000_000_000_000_000) });
    }

    #[test]
    fn fractions_negatives_and_overflow_are_refused() {
        for bad in [
            r#"{"n": 1.5}"#,
            r#"{"n": -1}"#,
            r#"{"n": -1.0}"#,
            r#"{"n": 4294967296}"#,
            r#"{"n": 4294967296.0}"#,
            r#"{"n": 1, "o": 18446744073709551616}"#,
            r#"{"n": 1, "o": 1.8446744073709552e19}"#,
            r#"{"n": "1"}"#,
            r#"{"n": null}"#,
            r#"{"n": 1, "o": true}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
