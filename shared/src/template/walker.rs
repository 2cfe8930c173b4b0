//! The [`Walker`], which collects problems while reading a document, with its
//! typed field readers and the path, suggestion and identifier helpers.

use std::fmt;

use serde_json::{Map, Value};

use super::draft::Dep;
use super::schema::schema_problems;
use super::{
    DEFAULT_VERSION, MAX_LABEL_LEN, MAX_NAME_LEN, MAX_PROBLEMS, MAX_RETRY_LIMIT, MAX_STEPS,
    MAX_VERSION_LEN, Problem, codes,
};

/// Collects problems while walking a document.
pub(super) struct Walker {
    /// The first [`MAX_PROBLEMS`] problems found.
    pub(super) problems: Vec<Problem>,
    /// How many more were found and not kept.
    omitted: usize,
    /// What was accepted but is not used (tasker-engine keys Tasker has no use for),
    /// at most [`MAX_PROBLEMS`]: answered beside a registered template.
    pub(super) warnings: Vec<Problem>,
    /// Most steps accepted.
    max_steps: usize,
}

impl Default for Walker {
    fn default() -> Self {
        Walker::new(MAX_STEPS)
    }
}

impl Walker {
    pub(super) fn new(max_steps: usize) -> Self {
        Walker {
            problems: Vec::new(),
            omitted: 0,
            warnings: Vec::new(),
            max_steps,
        }
    }

    /// The problems kept, and one `more_problems` problem counting the others.
    pub(super) fn into_problems(mut self) -> Vec<Problem> {
        if self.omitted > 0 {
            self.problems.push(Problem::new(
                "",
                codes::MORE_PROBLEMS,
                format!(
                    "{} more problem(s) were found and are not listed (only the first \
                     {MAX_PROBLEMS} are)",
                    self.omitted
                ),
            ));
        }
        self.problems
    }
}

/// The value of `key`, treating an explicit `null` like an absent key.
pub(super) fn field<'a>(object: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    object.get(key).filter(|value| !value.is_null())
}

/// Path of `key` inside the object at `parent`.
pub(super) fn join(parent: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !plain {
        format!("{parent}[{}]", Value::String(key.to_owned()))
    } else if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// Path of item `index` of the list at `parent`.
pub(super) fn item(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// Describes the JSON type of a value for messages.
pub(super) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(number) if number.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Levenshtein distance between two short strings.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        current[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// The known key to suggest for an unknown one, if any.
/// The keys of `object` outside `known`, each with the known key it was probably meant
/// to be.
fn strangers<'a>(
    object: &'a Map<String, Value>,
    known: &'a [&'a str],
    hints: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = (&'a str, Option<&'a str>)> + 'a {
    object
        .keys()
        .filter(|key| !known.contains(&key.as_str()))
        .map(|key| (key.as_str(), suggestion(key, known, hints)))
}

fn suggestion<'k>(key: &str, known: &[&'k str], hints: &[(&str, &'k str)]) -> Option<&'k str> {
    if let Some((_, target)) = hints.iter().find(|(from, _)| *from == key) {
        return Some(target);
    }
    known
        .iter()
        .map(|candidate| (edit_distance(key, candidate), *candidate))
        .filter(|(distance, _)| *distance <= 2)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Why `value` breaks the identifier rule, if it does.
pub(super) fn identifier_error(value: &str, max_len: usize) -> Option<String> {
    let length = value.chars().count();
    let mut chars = value.chars();
    let first = chars.next()?;
    if length > max_len {
        return Some(format!(
            "is {length} characters long; at most {max_len} are allowed"
        ));
    }
    if !first.is_ascii_alphanumeric() {
        return Some(format!(
            "must start with an ASCII letter or digit, not `{}`",
            first.escape_default()
        ));
    }
    chars
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        .map(|bad| {
            format!(
                "contains `{}`; only ASCII letters, digits, `_`, `-` and `.` are allowed",
                bad.escape_default()
            )
        })
}

/// Why `value` is not a template name, if it is not: one or more identifiers joined by
/// `/`, at most [`MAX_NAME_LEN`] characters in all.
pub(super) fn template_name_error(value: &str) -> Option<String> {
    if value.is_empty() {
        return Some("must not be empty".to_owned());
    }
    let length = value.chars().count();
    if length > MAX_NAME_LEN {
        return Some(format!(
            "is {length} characters long; at most {MAX_NAME_LEN} are allowed"
        ));
    }
    if value.split('/').any(str::is_empty) {
        return Some(
            "has an empty part: `/` may only separate names (`group/name`), not start, \
             end or repeat"
                .to_owned(),
        );
    }
    value
        .split('/')
        .find_map(|part| identifier_error(part, MAX_NAME_LEN))
        .map(|reason| {
            let reason = reason.replace(
                "only ASCII letters, digits, `_`, `-` and `.` are allowed",
                "only ASCII letters, digits, `_`, `-`, `.` and `/` are allowed",
            );
            format!("(each part between `/`) {reason}")
        })
}

impl Walker {
    pub(super) fn report(
        &mut self,
        path: impl Into<String>,
        code: &str,
        message: impl Into<String>,
    ) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(Problem::new(path, code, message));
        } else {
            self.omitted += 1;
        }
    }

    /// Something accepted but not used: not a problem, but said in the answer and the log.
    pub(super) fn warn(&mut self, path: impl Into<String>, code: &str, message: impl Into<String>) {
        if self.warnings.len() < MAX_PROBLEMS {
            self.warnings.push(Problem::new(path, code, message));
        }
    }

    /// Keys outside `known`, as warnings: tasker-engine validated its files with a JSON
    /// Schema that allowed any other key and ignored it, so its files carry such keys
    /// (`monitoring`, `retry_strategies`, ...) and still load.
    pub(super) fn ignored_keys(
        &mut self,
        object: &Map<String, Value>,
        parent: &str,
        known: &[&str],
        hints: &[(&str, &str)],
    ) {
        for (key, candidate) in strangers(object, known, hints) {
            let message = match candidate {
                Some(candidate) => {
                    format!("unknown key `{key}` is ignored; did you mean `{candidate}`?")
                }
                None => format!("unknown key `{key}` is ignored"),
            };
            self.warn(join(parent, key), codes::UNKNOWN_KEY, message);
        }
    }

    pub(super) fn not_an_object(&mut self, path: &str, value: &Value, what: &str) {
        self.report(
            path,
            codes::NOT_AN_OBJECT,
            format!("{what} must be an object (mapping), found {}", kind(value)),
        );
    }

    pub(super) fn wrong_type(&mut self, path: &str, expected: &str, value: &Value) {
        self.report(
            path,
            codes::WRONG_TYPE,
            format!("expected {expected}, found {}", kind(value)),
        );
    }

    pub(super) fn unknown_keys(
        &mut self,
        object: &Map<String, Value>,
        parent: &str,
        known: &[&str],
        hints: &[(&str, &str)],
    ) {
        for (key, candidate) in strangers(object, known, hints) {
            let message = match candidate {
                Some(candidate) => format!("unknown key `{key}`; did you mean `{candidate}`?"),
                None => format!(
                    "unknown key `{key}`; allowed keys here: {}",
                    known.join(", ")
                ),
            };
            self.report(join(parent, key), codes::UNKNOWN_KEY, message);
        }
    }

    /// A required key; reports `missing_key` when absent or null.
    pub(super) fn required<'a>(
        &mut self,
        object: &'a Map<String, Value>,
        parent: &str,
        key: &str,
        what: &str,
    ) -> Option<&'a Value> {
        let value = field(object, key);
        if value.is_none() {
            let message = if what.replace(' ', "_") == key {
                format!("missing required key `{key}`")
            } else {
                format!("missing required key `{key}` ({what})")
            };
            self.report(join(parent, key), codes::MISSING_KEY, message);
        }
        value
    }

    pub(super) fn string<'a>(&mut self, value: &'a Value, path: &str) -> Option<&'a str> {
        let text = value.as_str();
        if text.is_none() {
            self.wrong_type(path, "a string", value);
        }
        text
    }

    pub(super) fn optional_string<'a>(
        &mut self,
        object: &'a Map<String, Value>,
        parent: &str,
        key: &str,
    ) -> Option<&'a str> {
        field(object, key).and_then(|value| self.string(value, &join(parent, key)))
    }

    pub(super) fn optional_bool(
        &mut self,
        object: &Map<String, Value>,
        parent: &str,
        key: &str,
    ) -> Option<bool> {
        let value = field(object, key)?;
        let flag = value.as_bool();
        if flag.is_none() {
            self.wrong_type(&join(parent, key), "a boolean (true or false)", value);
        }
        flag
    }

    pub(super) fn optional_int(
        &mut self,
        object: &Map<String, Value>,
        parent: &str,
        key: &str,
        min: i64,
        max: i64,
    ) -> Option<i64> {
        let value = field(object, key)?;
        let path = join(parent, key);
        let out_of_range = |this: &mut Self, shown: &dyn fmt::Display| {
            this.report(
                path.as_str(),
                codes::INVALID_VALUE,
                format!("`{key}` must be between {min} and {max}, got {shown}"),
            );
        };
        match value {
            Value::Number(number) => {
                if let Some(int) = number.as_i64() {
                    if (min..=max).contains(&int) {
                        return Some(int);
                    }
                    out_of_range(self, &int);
                } else if number.is_u64() {
                    out_of_range(self, number);
                } else {
                    self.report(
                        path.as_str(),
                        codes::WRONG_TYPE,
                        format!("expected an integer, found the number {number}"),
                    );
                }
            }
            _ => self.wrong_type(&path, "an integer", value),
        }
        None
    }

    pub(super) fn check_identifier(&mut self, value: &str, path: &str, what: &str, max_len: usize) {
        if value.is_empty() {
            self.report(
                path,
                codes::INVALID_VALUE,
                format!("{what} must not be empty"),
            );
        } else if let Some(reason) = identifier_error(value, max_len) {
            self.report(
                path,
                codes::INVALID_VALUE,
                format!("{what} `{value}` {reason}"),
            );
        }
    }

    /// Handler class names and dependent systems: non-empty, at most 256
    /// characters, no control characters.
    pub(super) fn check_label(&mut self, value: &str, path: &str, what: &str) {
        let length = value.chars().count();
        if value.trim().is_empty() {
            self.report(
                path,
                codes::INVALID_VALUE,
                format!("{what} must not be empty"),
            );
        } else if length > MAX_LABEL_LEN {
            self.report(
                path,
                codes::INVALID_VALUE,
                format!("{what} is {length} characters long; at most {MAX_LABEL_LEN} are allowed"),
            );
        } else if let Some(bad) = value.chars().find(|c| c.is_control()) {
            self.report(
                path,
                codes::INVALID_VALUE,
                format!(
                    "{what} contains the control character `{}`",
                    bad.escape_default()
                ),
            );
        }
    }

    /// A template name: identifiers joined by `/` (`api_task/integration_yaml_example`),
    /// as tasker-engine named templates after their folder.
    pub(super) fn required_template_name(
        &mut self,
        object: &Map<String, Value>,
        parent: &str,
    ) -> Option<String> {
        let what = "template name";
        let value = self.required(object, parent, "name", what)?;
        let path = join(parent, "name");
        let text = self.string(value, &path)?;
        if let Some(reason) = template_name_error(text) {
            self.report(
                path,
                codes::INVALID_VALUE,
                format!("{what} `{}` {reason}", text.escape_default()),
            );
        }
        Some(text.to_owned())
    }

    /// A required identifier (namespace, template name).
    pub(super) fn required_identifier(
        &mut self,
        object: &Map<String, Value>,
        parent: &str,
        key: &str,
        what: &str,
        max_len: usize,
    ) -> Option<String> {
        let value = self.required(object, parent, key, what)?;
        let path = join(parent, key);
        let text = self.string(value, &path)?;
        self.check_identifier(text, &path, what, max_len);
        Some(text.to_owned())
    }

    /// A step name. A number or boolean is reported as `wrong_type` but its
    /// text is still used for the dependency checks, to avoid follow-on noise.
    pub(super) fn step_name(
        &mut self,
        object: &Map<String, Value>,
        parent: &str,
    ) -> Option<String> {
        let value = self.required(object, parent, "name", "the step name")?;
        let path = join(parent, "name");
        match value {
            Value::String(text) => {
                self.check_identifier(text, &path, "step name", MAX_NAME_LEN);
                Some(text.clone())
            }
            Value::Number(_) | Value::Bool(_) => {
                self.report(
                    path.as_str(),
                    codes::WRONG_TYPE,
                    format!(
                        "expected a string, found {}; quote the step name",
                        kind(value)
                    ),
                );
                Some(value.to_string())
            }
            _ => {
                self.wrong_type(&path, "a string", value);
                None
            }
        }
    }

    pub(super) fn required_label(
        &mut self,
        object: &Map<String, Value>,
        parent: &str,
        key: &str,
        what: &str,
    ) -> Option<String> {
        let value = self.required(object, parent, key, what)?;
        let path = join(parent, key);
        let text = self.string(value, &path)?;
        self.check_label(text, &path, what);
        Some(text.to_owned())
    }

    pub(super) fn optional_label(
        &mut self,
        object: &Map<String, Value>,
        parent: &str,
        key: &str,
        what: &str,
    ) -> Option<String> {
        let text = self.optional_string(object, parent, key)?;
        self.check_label(text, &join(parent, key), what);
        Some(text.to_owned())
    }

    pub(super) fn version(&mut self, object: &Map<String, Value>, parent: &str) -> String {
        let Some(value) = field(object, "version") else {
            return DEFAULT_VERSION.to_owned();
        };
        let path = join(parent, "version");
        match value {
            Value::String(text) => {
                if text.chars().count() > MAX_VERSION_LEN {
                    self.report(
                        path,
                        codes::INVALID_VALUE,
                        format!(
                            "the version is {} characters long; at most {MAX_VERSION_LEN}",
                            text.chars().count()
                        ),
                    );
                } else if let Err(error) = semver::Version::parse(text) {
                    self.report(
                        path,
                        codes::INVALID_VALUE,
                        format!(
                            "version `{text}` is not a semantic version (MAJOR.MINOR.PATCH, e.g. \"1.0.0\"): {error}"
                        ),
                    );
                }
                text.clone()
            }
            Value::Number(_) => {
                self.report(
                    path,
                    codes::WRONG_TYPE,
                    format!(
                        "expected a string, found the number {value}; write the version as a quoted semantic version, e.g. \"1.0.0\""
                    ),
                );
                DEFAULT_VERSION.to_owned()
            }
            _ => {
                self.wrong_type(&path, "a string", value);
                DEFAULT_VERSION.to_owned()
            }
        }
    }

    pub(super) fn context_schema(
        &mut self,
        object: &Map<String, Value>,
        key: &str,
    ) -> Option<Value> {
        let value = field(object, key)?;
        if !value.is_object() {
            self.not_an_object(key, value, "the context schema");
            return None;
        }
        for reason in schema_problems(value) {
            self.report(
                key,
                codes::INVALID_SCHEMA,
                format!("not a valid JSON Schema: {reason}"),
            );
        }
        Some(value.clone())
    }

    /// The step list: present, a list, non-empty, not too long.
    pub(super) fn step_list<'a>(
        &mut self,
        object: &'a Map<String, Value>,
        key: &str,
    ) -> Option<&'a [Value]> {
        let value = self.required(object, "", key, "the list of steps")?;
        let Some(list) = value.as_array() else {
            self.wrong_type(key, "a list of steps", value);
            return None;
        };
        if list.is_empty() {
            self.report(key, codes::NO_STEPS, "a template needs at least one step");
        } else if list.len() > self.max_steps {
            // The steps are not read: their problems (and the graph checks) would cost
            // time in proportion to a length that is refused anyway.
            self.report(
                key,
                codes::TOO_MANY_STEPS,
                format!(
                    "a template may have at most {} steps, this one has {}",
                    self.max_steps,
                    list.len()
                ),
            );
            return None;
        }
        Some(list)
    }

    /// A list of names (each a non-empty string).
    pub(super) fn name_list(&mut self, value: &Value, path: &str, what: &str) -> Vec<Dep> {
        let Some(list) = value.as_array() else {
            let hint = if value.is_string() {
                "; write a single name as a one-item list, e.g. `[name]`"
            } else {
                ""
            };
            self.report(
                path,
                codes::WRONG_TYPE,
                format!("expected a list of {what}, found {}{hint}", kind(value)),
            );
            return Vec::new();
        };
        let mut names = Vec::with_capacity(list.len());
        for (index, entry) in list.iter().enumerate() {
            let entry_path = item(path, index);
            if let Some(name) = self.string(entry, &entry_path) {
                if name.is_empty() {
                    self.report(
                        entry_path,
                        codes::INVALID_VALUE,
                        "a step name must not be empty",
                    );
                } else {
                    names.push(Dep {
                        name: name.to_owned(),
                        path: entry_path,
                    });
                }
            }
        }
        names
    }

    /// Handler configuration: anything; absent or null means `{}`.
    pub(super) fn config(object: &Map<String, Value>, key: &str) -> Value {
        field(object, key)
            .cloned()
            .unwrap_or_else(|| Value::Object(Map::new()))
    }
}

pub(super) fn retry_limit(
    w: &mut Walker,
    object: &Map<String, Value>,
    parent: &str,
    key: &str,
) -> Option<i32> {
    w.optional_int(object, parent, key, 1, i64::from(MAX_RETRY_LIMIT))
        .and_then(|limit| i32::try_from(limit).ok())
}
