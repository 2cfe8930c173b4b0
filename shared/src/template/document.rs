//! Text to JSON value: the strict YAML/JSON parsing behind
//! [`parse_template`](super::parse_template).

use std::cell::Cell;
use std::fmt::{self, Write as _};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::{Problem, codes};

/// Parse the text into a JSON value, rejecting duplicate keys.
pub(super) fn parse_document(text: &str) -> Result<Value, Problem> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let looks_like_json = matches!(text.trim_start().chars().next(), Some('{' | '['));
    if looks_like_json {
        match parse_json(text) {
            Ok(value) => return Ok(value),
            Err(json_error)
                if json_error
                    .to_string()
                    .starts_with("recursion limit exceeded") =>
            {
                // Too deep for JSON is too deep for YAML as well; and the YAML parser
                // reads every event of the document before it finds out, which takes
                // minutes for 100,000 nested lists.
                return Err(Problem::new(
                    "",
                    codes::SYNTAX,
                    format!("JSON syntax error: {json_error}"),
                ));
            }
            Err(json_error) => {
                // Flow-style YAML (`{a: 1}`) is not JSON; give YAML a chance, within the
                // same bounds as any YAML, but report the JSON error, which is the
                // likelier intent.
                if too_deep(text).is_some() {
                    return Err(Problem::new(
                        "",
                        codes::SYNTAX,
                        format!("JSON syntax error: {json_error}"),
                    ));
                }
                return match parse_yaml(text) {
                    Ok(value) => Ok(value),
                    Err(_) => Err(Problem::new(
                        "",
                        codes::SYNTAX,
                        format!("JSON syntax error: {json_error}"),
                    )),
                };
            }
        }
    }
    if let Some(problem) = too_deep(text) {
        return Err(Problem::new(
            "",
            codes::SYNTAX,
            format!("YAML syntax error: recursion limit exceeded: {problem}"),
        ));
    }
    parse_yaml(text).map_err(|error| {
        let mut message = format!("YAML syntax error: {error}");
        if let Some(location) = error.location()
            && !message.contains(" line ")
        {
            let _ = write!(
                message,
                " at line {} column {}",
                location.line(),
                location.column()
            );
        }
        Problem::new("", codes::SYNTAX, message)
    })
}

/// Deepest flow nesting (`[`, `{`) given to the YAML parser, as deep as serde_json and
/// the YAML deserialiser go (128) anyway.
const MAX_FLOW_DEPTH: usize = 128;

/// Most flow collections (`[`, `{`) in one YAML document. The YAML parser takes time
/// quadratic in the nesting depth before its own limit refuses a document, and the depth
/// scan below can be fooled (see there); this cap bounds the depth, and so the parser's
/// worst case, whatever the document hides in its strings: in a release build, 0.29 s
/// for 8,190 nested collections (just under this cap) and 1.1 s for 16,300. Every `[`
/// and `{` counts, an inline list (`depends_on: [a]`) too: a template of a few thousand
/// steps fits; larger ones can be written with block lists or as JSON, which does not
/// count.
const MAX_FLOW_COLLECTIONS: usize = 8_192;

/// Why `text` may nest flow collections too deep for the YAML parser, if it may.
///
/// A linear scan: the parser reads every event of a document before its deserialiser
/// finds the nesting too deep, which takes minutes for 100,000 nested lists. The depth
/// count treats every bracket as one, including those in quoted scalars and comments,
/// so a closing bracket in a string can make it too low; [`MAX_FLOW_COLLECTIONS`]
/// bounds what such a document can cost.
fn too_deep(text: &str) -> Option<String> {
    let mut depth = 0_usize;
    let mut openers = 0_usize;
    let mut line = 1;
    for byte in text.bytes() {
        match byte {
            b'\n' => line += 1,
            b'[' | b'{' => {
                depth += 1;
                openers += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Some(format!(
                        "more than {MAX_FLOW_DEPTH} nested lists or mappings at line {line}"
                    ));
                }
                if openers > MAX_FLOW_COLLECTIONS {
                    return Some(format!(
                        "more than {MAX_FLOW_COLLECTIONS} flow lists or mappings (`[…]`, `{{…}}`) \
                         by line {line}; write a template this large in block style or as JSON"
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// Most values (scalars, lists and mappings; keys not counted) a document may expand
/// to. Every use of a YAML alias counts the aliased values again, so an alias bomb is
/// refused while it is parsed, before it fills memory: 25 values for each of a
/// template's [`MAX_STEPS`](super::MAX_STEPS) steps.
pub const MAX_DOCUMENT_VALUES: usize = 250_000;
/// Most text (strings and keys, in bytes) a document may expand to, aliases counted at
/// every use.
pub const MAX_DOCUMENT_TEXT_BYTES: usize = 16 * 1024 * 1024;

fn parse_json(text: &str) -> serde_json::Result<Value> {
    let budget = Budget::default();
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let value = Strict::<false>(&budget).deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

fn parse_yaml(text: &str) -> Result<Value, yaml_serde::Error> {
    let budget = Budget::default();
    Strict::<true>(&budget).deserialize(yaml_serde::Deserializer::from_str(text))
}

/// What is left of a document's expansion limits while it is parsed.
struct Budget {
    values: Cell<usize>,
    text_bytes: Cell<usize>,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            values: Cell::new(MAX_DOCUMENT_VALUES),
            text_bytes: Cell::new(MAX_DOCUMENT_TEXT_BYTES),
        }
    }
}

impl Budget {
    fn value<E: de::Error>(&self) -> Result<(), E> {
        let left = self.values.get().checked_sub(1).ok_or_else(|| {
            E::custom(format!(
                "the document expands to more than {MAX_DOCUMENT_VALUES} values \
                 (each use of a YAML alias counts its values again)"
            ))
        })?;
        self.values.set(left);
        Ok(())
    }

    fn text<E: de::Error>(&self, bytes: usize) -> Result<(), E> {
        let left = self.text_bytes.get().checked_sub(bytes).ok_or_else(|| {
            E::custom(format!(
                "the document expands to more than {} MiB of text \
                 (each use of a YAML alias counts its text again)",
                MAX_DOCUMENT_TEXT_BYTES >> 20
            ))
        })?;
        self.text_bytes.set(left);
        Ok(())
    }
}

/// Deserialises a JSON value strictly, within a [`Budget`]: duplicate keys and
/// non-finite numbers are errors. With `YAML`, merge keys (`<<`) are applied.
#[derive(Clone, Copy)]
struct Strict<'b, const YAML: bool>(&'b Budget);

impl<'de, const YAML: bool> DeserializeSeed<'de> for Strict<'_, YAML> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

/// A mapping key, charged to the budget as text.
struct Key<'b>(&'b Budget);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        let key = <String as serde::Deserialize>::deserialize(deserializer)?;
        self.0.text(key.len())?;
        Ok(key)
    }
}

impl<'de, const YAML: bool> Visitor<'de> for Strict<'_, YAML> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON-compatible value (null, boolean, number, string, list or mapping)")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.0.value()?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.0.value()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.0.value()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        if let Ok(small) = i64::try_from(v) {
            self.0.value()?;
            Ok(Value::Number(small.into()))
        } else if let Ok(small) = u64::try_from(v) {
            self.0.value()?;
            Ok(Value::Number(small.into()))
        } else {
            // Like serde_json: integers beyond 64 bits become floats.
            #[allow(clippy::cast_precision_loss)]
            let approximate = v as f64;
            self.visit_f64(approximate)
        }
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        match u64::try_from(v) {
            Ok(small) => {
                self.0.value()?;
                Ok(Value::Number(small.into()))
            }
            Err(_) => {
                #[allow(clippy::cast_precision_loss)]
                let approximate = v as f64;
                self.visit_f64(approximate)
            }
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.0.value()?;
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom(format!("the number {v} is not supported (not finite)")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.0.value()?;
        self.0.text(v.len())?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.0.value()?;
        self.0.text(v.len())?;
        Ok(Value::String(v))
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.0.value()?;
        Ok(Value::Null)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.0.value()?;
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.0.value()?;
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.0.value()?;
        let mut object = Map::new();
        let mut merges = Vec::new();
        while let Some(key) = map.next_key_seed(Key(self.0))? {
            let value = map.next_value_seed(self)?;
            if YAML && key == "<<" {
                merges.push(value);
                continue;
            }
            if object.contains_key(&key) {
                // The YAML parser places the error at the start of the
                // mapping; the JSON parser just after the repeated entry.
                let message = if YAML {
                    format!("duplicate key `{key}` in the mapping that starts")
                } else {
                    format!("duplicate key `{key}`")
                };
                return Err(de::Error::custom(message));
            }
            object.insert(key, value);
        }
        // YAML merge keys: explicit keys win, then earlier merged mappings win.
        for merge in merges {
            let sources = match merge {
                Value::Object(source) => vec![source],
                Value::Array(items) => {
                    let mut sources = Vec::with_capacity(items.len());
                    for item in items {
                        match item {
                            Value::Object(source) => sources.push(source),
                            _ => return Err(merge_error()),
                        }
                    }
                    sources
                }
                _ => return Err(merge_error()),
            };
            for source in sources {
                for (key, value) in source {
                    object.entry(key).or_insert(value);
                }
            }
        }
        Ok(Value::Object(object))
    }
}

fn merge_error<E: de::Error>() -> E {
    E::custom("the merge key `<<` needs a mapping or a list of mappings")
}
