//! The flow-control keys of a step, and the CEL expressions that name their keys.
//!
//! ```yaml
//! concurrency:                                                # the template's: tasks per key
//!   - {key: context.customer_id, limit: 1, on_limit: queue}
//! steps:
//!   - name: call
//!     concurrency: {key: "context.customer_id", limit: 2}    # at most 2 running per customer
//!     rate_limit: {key: "'partner-api'", limit: 100, per: 1s} # 100 starts a second, fleet-wide
//! ```
//!
//! A key is a CEL expression over `context` (the task's context) and `task` (`namespace`,
//! `name`, `version`, `priority`, `tags`). It is compiled when the template is registered
//! (a key that does not compile, or names another variable, is a problem there) and
//! evaluated once per task, when it is created ([`LimitKeys`]); the values are stored with
//! the steps, where the claim counts them (migrations/0013).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use serde_json::{Map, Value};

use super::cost;
use super::walker::{Walker, field, item, join};
use super::{
    ConcurrencyLimit, OnLimit, Problem, RateLimit, TaskConcurrency, TemplateDefinition, codes,
};

pub(super) const CONCURRENCY_KEYS: &[&str] = &["key", "limit"];
pub(super) const RATE_LIMIT_KEYS: &[&str] = &["key", "limit", "per"];
pub(super) const TASK_CONCURRENCY_KEYS: &[&str] = &["key", "limit", "on_limit"];
pub(super) const HINTS: &[(&str, &str)] = &[
    ("max", "limit"),
    ("max_concurrency", "limit"),
    ("window", "per"),
    ("interval", "per"),
    ("expression", "key"),
];

/// Most entries of a template's `concurrency`.
pub const MAX_TASK_LIMITS: usize = 4;
/// Most steps of one key at once.
pub const MAX_CONCURRENCY: i64 = 10_000;
/// Most starts of one key per window: the claim reads the window's start times.
pub const MAX_RATE: i64 = 10_000;
/// Longest rate window: one day.
const MAX_WINDOW_MS: i64 = 86_400_000;
/// The variables a key may use.
const VARIABLES: &[&str] = &["context", "task"];
/// Longest key value, in bytes.
pub const MAX_KEY_BYTES: usize = 256;

/// Read a step's `concurrency`.
pub(super) fn walk_concurrency(
    w: &mut Walker,
    object: &Map<String, Value>,
    path: &str,
    step: Option<&str>,
) -> Option<ConcurrencyLimit> {
    let spec = limit_object(w, object, path, "concurrency", CONCURRENCY_KEYS)?;
    let path = join(path, "concurrency");
    let who = about(step);
    let key = key(w, spec, &path, &who);
    let limit = limit(w, spec, &path, &who, MAX_CONCURRENCY);
    Some(ConcurrencyLimit {
        key: key?,
        limit: limit?,
    })
}

/// Read a step's `rate_limit`.
pub(super) fn walk_rate_limit(
    w: &mut Walker,
    object: &Map<String, Value>,
    path: &str,
    step: Option<&str>,
) -> Option<RateLimit> {
    let spec = limit_object(w, object, path, "rate_limit", RATE_LIMIT_KEYS)?;
    let path = join(path, "rate_limit");
    let who = about(step);
    let key = key(w, spec, &path, &who);
    let limit = limit(w, spec, &path, &who, MAX_RATE);
    let per = window(w, spec, &path, &who);
    Some(RateLimit {
        key: key?,
        limit: limit?,
        per: per?,
    })
}

/// Read a template's `concurrency`: a list of `{key, limit, on_limit}`.
pub(super) fn walk_task_concurrency(
    w: &mut Walker,
    root: &Map<String, Value>,
) -> Vec<TaskConcurrency> {
    let Some(value) = field(root, "concurrency") else {
        return Vec::new();
    };
    let Some(list) = value.as_array() else {
        w.wrong_type(
            "concurrency",
            "a list of `{key, limit, on_limit}` (a step's `concurrency` is one object)",
            value,
        );
        return Vec::new();
    };
    if list.len() > MAX_TASK_LIMITS {
        w.report(
            "concurrency",
            codes::INVALID_VALUE,
            format!(
                "a template may have at most {MAX_TASK_LIMITS} concurrency limits, this one has {}",
                list.len()
            ),
        );
        return Vec::new();
    }
    let mut limits = Vec::new();
    for (index, entry) in list.iter().enumerate() {
        let path = item("concurrency", index);
        let Some(spec) = entry.as_object() else {
            w.not_an_object(&path, entry, "a concurrency limit");
            continue;
        };
        w.unknown_keys(spec, &path, TASK_CONCURRENCY_KEYS, HINTS);
        let who = format!("the template's concurrency[{index}]");
        let key = key(w, spec, &path, &who);
        let limit = limit(w, spec, &path, &who, MAX_CONCURRENCY);
        let on_limit = on_limit(w, spec, &path);
        if let (Some(key), Some(limit), Some(on_limit)) = (key, limit, on_limit) {
            limits.push(TaskConcurrency {
                key,
                limit,
                on_limit,
            });
        }
    }
    limits
}

fn on_limit(w: &mut Walker, spec: &Map<String, Value>, path: &str) -> Option<OnLimit> {
    let Some(value) = field(spec, "on_limit") else {
        return Some(OnLimit::Queue);
    };
    match value.as_str() {
        Some("queue") => Some(OnLimit::Queue),
        Some("cancel_newest") => Some(OnLimit::CancelNewest),
        Some("cancel_oldest") => Some(OnLimit::CancelOldest),
        _ => {
            w.report(
                join(path, "on_limit"),
                codes::INVALID_VALUE,
                format!(
                    "`on_limit` must be `queue`, `cancel_newest` or `cancel_oldest`, got {value}"
                ),
            );
            None
        }
    }
}

fn limit_object<'a>(
    w: &mut Walker,
    object: &'a Map<String, Value>,
    path: &str,
    name: &str,
    keys: &[&str],
) -> Option<&'a Map<String, Value>> {
    let value = field(object, name)?;
    let path = join(path, name);
    let Some(spec) = value.as_object() else {
        w.not_an_object(&path, value, &format!("`{name}`"));
        return None;
    };
    w.unknown_keys(spec, &path, keys, HINTS);
    Some(spec)
}

/// How a message names a step: by name when it has a usable one.
pub(super) fn about(step: Option<&str>) -> String {
    step.map_or_else(|| "this step".to_owned(), |name| format!("step `{name}`"))
}

fn key(w: &mut Walker, spec: &Map<String, Value>, path: &str, who: &str) -> Option<String> {
    let key_path = join(path, "key");
    let Some(value) = field(spec, "key") else {
        w.report(
            key_path,
            codes::MISSING_KEY,
            format!(
                "{}: missing required key `key` (a CEL expression such as `context.customer_id`)",
                who
            ),
        );
        return None;
    };
    let source = w.string(value, &key_path)?;
    match compile(source) {
        Ok(_) => Some(source.to_owned()),
        Err(error) => {
            w.report(
                key_path,
                codes::INVALID_EXPRESSION,
                format!("{}: the key {error}", who),
            );
            None
        }
    }
}

fn limit(
    w: &mut Walker,
    spec: &Map<String, Value>,
    path: &str,
    who: &str,
    max: i64,
) -> Option<i32> {
    let limit_path = join(path, "limit");
    let Some(value) = field(spec, "limit") else {
        w.report(
            limit_path,
            codes::MISSING_KEY,
            format!("{}: missing required key `limit`", who),
        );
        return None;
    };
    match value.as_i64() {
        Some(limit) if (1..=max).contains(&limit) => i32::try_from(limit).ok(),
        _ => {
            w.report(
                limit_path,
                codes::INVALID_VALUE,
                format!(
                    "{}: `limit` must be an integer between 1 and {max}, got {value}",
                    who
                ),
            );
            None
        }
    }
}

fn window(w: &mut Walker, spec: &Map<String, Value>, path: &str, who: &str) -> Option<String> {
    let per_path = join(path, "per");
    let Some(value) = field(spec, "per") else {
        w.report(
            per_path,
            codes::MISSING_KEY,
            format!("{}: missing required key `per` (`1s`, `1m` or `1h`)", who),
        );
        return None;
    };
    match value.as_str().and_then(window_ms) {
        Some(_) => value.as_str().map(str::to_owned),
        None => {
            w.report(
                per_path,
                codes::INVALID_VALUE,
                format!(
                    "{}: `per` must be a window such as `1s`, `1m`, `1h` or `10s` (at most \
                     a day), got {value}",
                    who
                ),
            );
            None
        }
    }
}

/// A rate window in milliseconds: a whole number of seconds, minutes or hours (`1s`,
/// `10s`, `1m`, `1h`), from one second to one day.
pub fn window_ms(per: &str) -> Option<i64> {
    let ms = crate::span::parse_span(per, &["s", "m", "h"])
        .ok()?
        .num_milliseconds();
    (1_000..=MAX_WINDOW_MS).contains(&ms).then_some(ms)
}

/// Compiled keys, by source: a template's keys are compiled when it is registered, and
/// again at most once per coordinator (and then at most [`MAX_CACHED`] of them, of
/// [`MAX_CACHED_BYTES`] of source in all).
static PROGRAMS: LazyLock<Mutex<Programs>> = LazyLock::new(Mutex::default);
const MAX_CACHED: usize = 10_000;
const MAX_CACHED_BYTES: usize = 4 << 20;

#[derive(Default)]
struct Programs {
    by_source: HashMap<String, Arc<Compiled>>,
    bytes: usize,
}

/// The most characters a CEL expression may have.
pub const MAX_EXPRESSION_CHARS: usize = 4_096;
/// The deepest a CEL expression's syntax tree may be: each operator of a chain
/// (`1 + 1 + …`), field of a path (`a.b.c…`), index, call or bracket is a level. CEL
/// evaluates an expression by recursion over its tree, about a level per stack frame:
/// a chain of 1,500 additions overflowed a 2 MiB thread stack (1,200 did not), which
/// aborts the process. The charges that bound an evaluation's work ([`cost::meter`])
/// wrap operands in calls: the depth evaluated is up to about twice the depth written.
pub const MAX_EXPRESSION_DEPTH: usize = 256;
/// The stack of the thread an expression is compiled on: CEL's parser recurses once per
/// level too, and the depth is known only once it has parsed. Enough for any expression
/// of [`MAX_EXPRESSION_CHARS`]; only touched pages cost memory.
const COMPILE_STACK_BYTES: usize = 256 << 20;

/// An expression as compiled, and as run: with the charges that bound its work laid in
/// ([`cost::meter`]).
pub(super) struct Compiled {
    metered: cel::IdedExpr,
    /// The variables it reads, sorted: names it does not bind itself (a macro binds its
    /// loop's variable: `x` in `context.items.all(x, x > 0)`).
    variables: Vec<String>,
}

impl Compiled {
    /// Evaluate with `context` (from [`cost::context`]), within the expressions' cost
    /// bound.
    ///
    /// # Errors
    ///
    /// CEL's error, or that the evaluation did more work than an expression may.
    pub(super) fn run(&self, context: &cel::Context<'_, '_>) -> Result<cel::Value, String> {
        cost::run(&self.metered, context)
    }
}

/// Compile `source` on a thread of its own with a stack large enough for any expression
/// of its length, refuse it there (where its tree is dropped) when it is longer or
/// deeper than the limits, and lay in the charges that bound its work, so that what is
/// returned runs safely on any thread.
fn compile_guarded(source: &str) -> Result<Compiled, String> {
    let chars = source.chars().count();
    let shown: String = source.chars().take(60).collect();
    let shown = if chars > 60 {
        format!("{shown}…")
    } else {
        shown
    };
    if chars > MAX_EXPRESSION_CHARS {
        return Err(format!(
            "`{shown}` is too long: {chars} characters, at most {MAX_EXPRESSION_CHARS}"
        ));
    }
    let owned = source.to_owned();
    let compiled = std::thread::Builder::new()
        .name("cel-compile".to_owned())
        .stack_size(COMPILE_STACK_BYTES)
        .spawn(move || {
            let program = cel::Program::compile(&owned)
                .map_err(|error| format!("`{owned}` does not compile: {error}"))?;
            let depth = expression_depth(program.expression());
            if depth > MAX_EXPRESSION_DEPTH {
                return Err(format!(
                    "`{shown}` nests too deep: {depth} levels (operators of a chain, fields \
                     of a path, indexes, calls, brackets), at most {MAX_EXPRESSION_DEPTH}"
                ));
            }
            let metered = cost::meter(program.expression());
            let mut variables = Vec::new();
            free_variables(program.expression(), &mut Vec::new(), &mut variables);
            variables.sort_unstable();
            variables.dedup();
            Ok(Compiled { metered, variables })
        })
        .map_err(|error| format!("cannot compile `{source}`: {error}"))?
        .join();
    compiled.unwrap_or_else(|_| Err(format!("`{source}` could not be compiled")))
}

/// The depth of an expression's syntax tree, walked without recursion.
fn expression_depth(root: &cel::common::ast::IdedExpr) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(root, 1_usize)];
    while let Some((node, depth)) = stack.pop() {
        deepest = deepest.max(depth);
        stack.extend(cost::operands(node).into_iter().map(|e| (e, depth + 1)));
    }
    deepest
}

/// Add to `found` the names `node` reads and does not bind, with `bound` the names the
/// macros around it bind. Recursive: run it on the compiling thread, whose stack holds
/// any expression of the limits.
fn free_variables(
    node: &cel::common::ast::IdedExpr,
    bound: &mut Vec<String>,
    found: &mut Vec<String>,
) {
    use cel::common::ast::Expr;
    match &node.expr {
        Expr::Ident(name) => {
            // CEL's own names (a macro's accumulator) begin with `@`.
            if !name.starts_with('@') && !bound.contains(name) {
                found.push(name.clone());
            }
        }
        Expr::Comprehension(c) => {
            free_variables(&c.iter_range, bound, found);
            free_variables(&c.accu_init, bound, found);
            let outer = bound.len();
            bound.push(c.iter_var.clone());
            bound.extend(c.iter_var2.clone());
            bound.push(c.accu_var.clone());
            for part in [&c.loop_cond, &c.loop_step, &c.result] {
                free_variables(part, bound, found);
            }
            bound.truncate(outer);
        }
        _ => {
            for operand in cost::operands(node) {
                free_variables(operand, bound, found);
            }
        }
    }
}

/// Compile a key, or say why it cannot be: it does not parse, or it uses a variable
/// other than `context` and `task`.
fn compile(source: &str) -> Result<Arc<Compiled>, String> {
    compile_with(
        source,
        VARIABLES,
        "a key may use `context` (the task's context) and `task` (its namespace, name, \
         version, priority and tags)",
    )
}

/// Compile a CEL expression (each source once per process, up to [`MAX_CACHED`]), and
/// check that it uses only the variables `allowed`; `allowed_text` says which, for the
/// message.
pub(super) fn compile_with(
    source: &str,
    allowed: &[&str],
    allowed_text: &str,
) -> Result<Arc<Compiled>, String> {
    let cached = PROGRAMS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .by_source
        .get(source)
        .cloned();
    let program = match cached {
        Some(program) => program,
        None => {
            let program = Arc::new(compile_guarded(source)?);
            let mut cache = PROGRAMS.lock().unwrap_or_else(|e| e.into_inner());
            if cache.by_source.len() >= MAX_CACHED || cache.bytes >= MAX_CACHED_BYTES {
                *cache = Programs::default();
            }
            cache.bytes += source.len();
            cache.by_source.insert(source.to_owned(), program.clone());
            program
        }
    };
    let unknown: Vec<&str> = program
        .variables
        .iter()
        .map(String::as_str)
        .filter(|name| !allowed.contains(name))
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "`{source}` uses {}; {allowed_text}",
            unknown
                .iter()
                .map(|name| format!("`{name}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(program)
}

/// What a key is evaluated with: the task being created.
#[derive(Debug, Clone, Copy)]
pub struct KeyInputs<'a> {
    /// The task's context.
    pub context: &'a Value,
    /// Its tags.
    pub tags: &'a Value,
    /// Its priority.
    pub priority: i16,
}

/// The limits of one step of a task being created, with their keys evaluated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitKeys {
    /// The concurrency key, scoped to the template and step
    /// (`namespace/name:step=value`), and its limit.
    pub concurrency: Option<(String, i32)>,
    /// The rate key (its value: shared by every step with the same one), its limit and
    /// window in milliseconds.
    pub rate: Option<(String, i32, i32)>,
}

/// One of a task's template concurrency limits, its key evaluated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskKey {
    /// The key, scoped to the template and the entry (`namespace/name=value`, or
    /// `namespace/name#n=value` for the entry at position n > 0).
    pub key: String,
    /// At most this many started and unfinished tasks.
    pub limit: i32,
    /// What a task past the limit does.
    pub on_limit: OnLimit,
}

/// A task's limits with their keys evaluated: empty when its template has none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Each step's, in template order (empty when no step has a limit).
    pub steps: Vec<LimitKeys>,
    /// The template's own (`concurrency`).
    pub task: Vec<TaskKey>,
}

impl Limits {
    /// Whether the task has no limit at all (neither its template's nor a step's).
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty() && self.task.is_empty()
    }
}

impl TemplateDefinition {
    /// Whether the template or any step has a limit.
    pub fn has_limits(&self) -> bool {
        !self.concurrency.is_empty()
            || self
                .steps
                .iter()
                .any(|step| step.concurrency.is_some() || step.rate_limit.is_some())
    }

    /// Evaluate the limit keys of the template and of every step for a task created with
    /// `inputs`.
    ///
    /// # Errors
    ///
    /// Every key that cannot be evaluated (a missing context field, say) or gives
    /// something other than a string, number or boolean, named by step (or template
    /// entry) and key.
    pub fn limit_keys(&self, inputs: KeyInputs<'_>) -> Result<Limits, Vec<Problem>> {
        if !self.has_limits() {
            return Ok(Limits::default());
        }
        let task = super::condition_task(self, inputs.priority, inputs.tags);
        let mut context = cost::context();
        let mut problems = Vec::new();
        for (name, value) in [("context", inputs.context), ("task", &task)] {
            if let Err(error) = context.add_variable(name, value) {
                problems.push(Problem::new(
                    "",
                    codes::INVALID_EXPRESSION,
                    format!("the {name} cannot be given to a key: {error}"),
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut evaluate = |source: &str, path: String, who: &str| {
            evaluate(&context, source).map_err(|error| {
                problems.push(Problem::new(
                    path,
                    codes::INVALID_EXPRESSION,
                    format!("{who}: the key `{source}` {error}"),
                ));
            })
        };
        let task: Vec<TaskKey> = self
            .concurrency
            .iter()
            .enumerate()
            .filter_map(|(n, limit)| {
                let path = format!("concurrency[{n}].key");
                let value = evaluate(&limit.key, path, "the template's concurrency").ok()?;
                let scope = if n == 0 {
                    format!("{}/{}", self.namespace, self.name)
                } else {
                    format!("{}/{}#{n}", self.namespace, self.name)
                };
                Some(TaskKey {
                    key: format!("{scope}={value}"),
                    limit: limit.limit,
                    on_limit: limit.on_limit,
                })
            })
            .collect();
        let steps_limited = self
            .steps
            .iter()
            .any(|step| step.concurrency.is_some() || step.rate_limit.is_some());
        let keys: Vec<LimitKeys> = self
            .steps
            .iter()
            .filter(|_| steps_limited)
            .enumerate()
            .map(|(n, step)| LimitKeys {
                concurrency: step.concurrency.as_ref().and_then(|limit| {
                    let path = format!("steps[{n}].concurrency.key");
                    evaluate(&limit.key, path, &format!("step `{}`", step.name))
                        .ok()
                        .map(|value| {
                            // `:` is in no name: `.` is in names, and joined the template
                            // `orders` and its step `v2.charge` to the key of the template
                            // `orders.v2` and its step `charge`.
                            let scoped =
                                format!("{}/{}:{}={value}", self.namespace, self.name, step.name);
                            (scoped, limit.limit)
                        })
                }),
                rate: step.rate_limit.as_ref().and_then(|limit| {
                    let path = format!("steps[{n}].rate_limit.key");
                    let window = i32::try_from(limit.per_ms()).unwrap_or(i32::MAX);
                    evaluate(&limit.key, path, &format!("step `{}`", step.name))
                        .ok()
                        .map(|value| (value, limit.limit, window))
                }),
            })
            .collect();
        if problems.is_empty() {
            Ok(Limits { steps: keys, task })
        } else {
            Err(problems)
        }
    }
}

/// A key's value as text: a string as it is, a number or boolean written out.
fn evaluate(context: &cel::Context<'_, '_>, source: &str) -> Result<String, String> {
    let program = compile(source)?;
    let value = program
        .run(context)
        .map_err(|error| format!("cannot be evaluated: {error}"))?;
    let text = match value {
        cel::Value::String(text) => text.to_string(),
        cel::Value::Int(n) => n.to_string(),
        cel::Value::UInt(n) => n.to_string(),
        cel::Value::Float(n) => n.to_string(),
        cel::Value::Bool(b) => b.to_string(),
        other => {
            return Err(format!(
                "gave a {}; a key must be a string, a number or a boolean",
                other.type_of()
            ));
        }
    };
    if text.len() > MAX_KEY_BYTES {
        return Err(format!(
            "gave {} bytes; a key value may have at most {MAX_KEY_BYTES}",
            text.len()
        ));
    }
    Ok(text)
}
