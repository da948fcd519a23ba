//! Typed `with:` params: one `#[serde(deny_unknown_fields)]` struct per stage
//! kind, deserialized once, when the kind declares a stage (`KindDecl::declare`
//! at pipeline load), and kept on the stage for `run` (`RunCtx::params`).
//!
//! Rules:
//! - Values arrive resolved: `${params.X}` and `-p` overrides were
//!   interpolated before `declare` (`pipeline::interpolate`). A value that is
//!   exactly one `${params.X}` keeps the param's type, and a `-p` override may
//!   be a string, so the field types here are as lenient as the hand-checked
//!   maps were: [`Text`] takes a string, number or boolean; [`Number`] and
//!   [`Count`] take a number or a string holding one. Anything else (a list,
//!   a map, null, a negative count) is an error.
//! - Errors name the key: an unknown key is ``unknown `with.KEY`; this kind
//!   takes: A, B, C`` (the struct's fields, in declaration order); a missing
//!   one ``missing `with.KEY` ``; a wrong type ``` `with.KEY` must be a number,
//!   not [1]```. Each is a [`StageError`] that says which key it is about
//!   (none for a missing one), so the pipeline loader adds the file, that
//!   key's line and the stage.
//! - The cache key is fed the resolved map (`Stage::with`), not these
//!   structs: adding a struct changes no key.

use crate::pipeline::StageError;
use serde::de::{self, Deserialize, DeserializeOwned, Deserializer};
use serde_json::{Map, Value};
use std::any::Any;
use std::sync::Arc;

/// A string param. Numbers and booleans are taken as their text (YAML
/// `as_of: 2026-01-01` and `-p rows=5` must both work).
#[derive(Debug, Clone, PartialEq)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Text(s)),
            Value::Number(n) => Ok(Text(n.to_string())),
            Value::Bool(b) => Ok(Text(b.to_string())),
            other => Err(de::Error::custom(format!("must be a string, not {other}"))),
        }
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// A number param (a number, or a string holding one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Number(pub f64);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Number(n) => n.as_f64().map(Number).ok_or_else(|| de::Error::custom("is not a number")),
            Value::String(s) => s.trim().parse::<f64>().map(Number).map_err(|_| de::Error::custom(format!("= {s:?} is not a number"))),
            other => Err(de::Error::custom(format!("must be a number, not {other}"))),
        }
    }
}

/// A whole number ≥ 0 (a number, or a string holding one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count(pub u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Number(n) => n.as_u64().map(Count).ok_or_else(|| de::Error::custom(format!("= {n} must be a whole number ≥ 0"))),
            Value::String(s) => s.trim().parse::<u64>().map(Count).map_err(|_| de::Error::custom(format!("= {s:?} must be a whole number ≥ 0"))),
            other => Err(de::Error::custom(format!("must be a whole number, not {other}"))),
        }
    }
}

/// A `YYYY-MM-DD` date, as written and as days since 1970-01-01.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Date {
    pub text: String,
    pub days: i32,
}

impl<'de> Deserialize<'de> for Date {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let Text(text) = Text::deserialize(d)?;
        let days = crate::data::schema::parse_date(&text).map_err(|e| de::Error::custom(format!(": {e:#}")))?;
        Ok(Date { text, days })
    }
}

/// For optional fields: present means it must parse (`null` is not "absent").
/// Use with `#[serde(default, deserialize_with = "present")]`.
pub fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// The keys a `with:` struct accepts, in declaration order (serde's own list
/// of its fields, read by asking it to deserialize from a probe).
pub fn accepted_keys<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe(&'static [&'static str]);
    impl<'de> Deserializer<'de> for &mut Probe {
        type Error = de::value::Error;
        fn deserialize_any<V: de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: de::Visitor<'de>>(self, _: &'static str, fields: &'static [&'static str], _: V) -> Result<V::Value, Self::Error> {
            self.0 = fields;
            Err(de::Error::custom("fields read"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit unit_struct
            newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut p = Probe(&[]);
    let _ = T::deserialize(&mut p);
    p.0
}

/// Check and type a stage's resolved `with:` map (see the module rules for
/// the messages).
pub fn parse<T: DeserializeOwned>(with: &Map<String, Value>) -> Result<T, StageError> {
    let keys = accepted_keys::<T>();
    if let Some(k) = with.keys().find(|k| !keys.contains(&k.as_str())) {
        return Err(StageError::at_key(k, format!("unknown `with.{k}`; this kind takes: {}", keys.join(", "))));
    }
    serde_path_to_error::deserialize(Value::Object(with.clone())).map_err(|e| {
        let msg = e.inner().to_string();
        let path = e.path().to_string();
        // The top-level key of the path (`files` of `files[0]`).
        let key = match e.path().iter().next() {
            Some(serde_path_to_error::Segment::Map { key }) => Some(key.clone()),
            _ => None,
        };
        let message = if let Some(name) = msg.strip_prefix("missing field `").and_then(|r| r.strip_suffix('`')) {
            format!("missing `with.{name}`")
        } else if path == "." {
            format!("`with:` {msg}")
        } else if msg.starts_with(':') {
            format!("`with.{path}`{msg}")
        } else {
            format!("`with.{path}` {msg}")
        };
        StageError { key, message }
    })
}

/// The typed params as kept on the stage (`Declared::params`).
pub fn keep<T: Any + Send + Sync>(p: T) -> Option<Arc<dyn Any + Send + Sync>> {
    Some(Arc::new(p))
}

/// The typed params of `stage` if they are a `T` (None for a stage of
/// another kind).
pub fn get<T: Any>(stage: &crate::pipeline::Stage) -> Option<&T> {
    stage.typed_with.as_deref().and_then(|p| p.downcast_ref::<T>())
}

/// The typed params of `stage` (those its kind's `declare` kept), for the
/// kind's own code, where they must be there.
pub fn of<T: Any>(stage: &crate::pipeline::Stage) -> anyhow::Result<&T> {
    get(stage).ok_or_else(|| {
        anyhow::anyhow!("stage {}: its `with:` params were not checked when the pipeline was loaded (a bug in dagrun: please report it)", stage.name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        rows: Count,
        #[serde(rename = "C")]
        c: Number,
        name: Text,
        #[serde(default, deserialize_with = "present")]
        as_of: Option<Date>,
    }

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn lenient_types_take_numbers_and_strings() {
        let s: Sample = parse(&map(json!({"rows": "12", "C": "0.5", "name": 7, "as_of": "2026-01-31"}))).unwrap();
        assert_eq!((s.rows, s.c, s.name.0.as_str()), (Count(12), Number(0.5), "7"));
        assert_eq!(s.as_of.unwrap().text, "2026-01-31");
        let s: Sample = parse(&map(json!({"rows": 3, "C": 2, "name": true}))).unwrap();
        assert_eq!((s.rows, s.c, s.name.0.as_str(), s.as_of), (Count(3), Number(2.0), "true", None));
    }

    #[test]
    fn unknown_key_names_it_and_the_accepted_keys() {
        let e = parse::<Sample>(&map(json!({"rows": 1, "C": 1, "name": "x", "colour": 1}))).unwrap_err();
        assert_eq!(e, StageError::at_key("colour", "unknown `with.colour`; this kind takes: rows, C, name, as_of"));
        assert_eq!(accepted_keys::<Sample>(), ["rows", "C", "name", "as_of"]);
    }

    #[test]
    fn wrong_types_name_the_key() {
        let bad = |v: Value| parse::<Sample>(&map(v)).unwrap_err().message;
        assert_eq!(bad(json!({"rows": [1], "C": 1, "name": "x"})), "`with.rows` must be a whole number, not [1]");
        assert_eq!(bad(json!({"rows": -1, "C": 1, "name": "x"})), "`with.rows` = -1 must be a whole number ≥ 0");
        assert_eq!(bad(json!({"rows": "many", "C": 1, "name": "x"})), "`with.rows` = \"many\" must be a whole number ≥ 0");
        assert_eq!(bad(json!({"rows": 1, "C": "abc", "name": "x"})), "`with.C` = \"abc\" is not a number");
        assert_eq!(bad(json!({"rows": 1, "C": {"a": 1}, "name": "x"})), "`with.C` must be a number, not {\"a\":1}");
        assert_eq!(bad(json!({"rows": 1, "C": 1, "name": ["x"]})), "`with.name` must be a string, not [\"x\"]");
        assert_eq!(bad(json!({"rows": 1, "C": 1, "name": "x", "as_of": null})), "`with.as_of` must be a string, not null");
        assert_eq!(bad(json!({"rows": 1, "C": 1, "name": "x", "as_of": "2026-02-30"})), "`with.as_of`: not a valid calendar date (YYYY-MM-DD)");
        assert_eq!(bad(json!({"C": 1, "name": "x"})), "missing `with.rows`");
    }

    /// The error says which key it is about (the loader names that key's
    /// line); a missing key is not written anywhere, so none.
    #[test]
    fn errors_carry_their_key() {
        let key = |v: Value| parse::<Sample>(&map(v)).unwrap_err().key;
        assert_eq!(key(json!({"rows": [1], "C": 1, "name": "x"})).as_deref(), Some("rows"));
        assert_eq!(key(json!({"rows": 1, "C": 1, "name": "x", "as_of": "2026-02-30"})).as_deref(), Some("as_of"));
        assert_eq!(key(json!({"C": 1, "name": "x"})), None);
    }
}
