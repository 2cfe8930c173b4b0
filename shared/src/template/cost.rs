//! A bound on the work one evaluation of a CEL expression may do.
//!
//! CEL has no loops of its own, but its macros (`all`, `exists`, `exists_one`, `map`,
//! `filter`) nest, and an operator can walk a whole value: `context.items.all(a,
//! context.items.exists(b, a.id == b.id))` over a task context of 100,000 items runs ten
//! billion steps, on the coordinator's thread that judges the step, inside the
//! transaction that holds its row. So every expression is compiled a second time with
//! charges laid into it ([`meter`]), and an evaluation stops once it has spent
//! [`MAX_EXPRESSION_COST`] units ([`run`]).
//!
//! A unit is one value (a number, a string, a list, a map, each element or entry of a
//! list or map) or [`TEXT_BYTES_PER_UNIT`] bytes of text, weighed through nested lists
//! and maps. What is charged, at the value's whole weight:
//! - the list or map a macro iterates over (each element is copied into the loop's
//!   variable), once per run of the macro;
//! - each operand of an operator or function (`==`, `+`, `in`, `contains`, `string()`,
//!   …), which may read all of it; `size()` charges a list or map one unit, and `in` a
//!   map one unit (the key is charged as an operand);
//! - `matches`: a unit per byte of its text for each [`STATES_PER_UNIT`] states of the
//!   pattern's program (a search may step through all of them at each byte), the
//!   pattern as text at each call (it is looked up), and [`PATTERN_UNITS`] and a unit
//!   per byte of the pattern each time it is compiled (within [`PATTERN_SIZE_LIMIT`]
//!   and [`MAX_PATTERN_BYTES`]; an evaluation keeps the last [`KEPT_PATTERNS`]);
//! - the key of an index (`m[k]`), which is hashed or compared, and a unit per field of
//!   a path that begins with a name (`context.a.b`: see [`Meter::path`]);
//! - each step of a macro's loop, by what it evaluates as written ([`step_units`]);
//! - each element of a list and each key and value of a map written in the expression,
//!   literals too (the list is built each time it is evaluated), and the expression's
//!   result (it is converted to JSON).
//!
//! Outside a loop's steps, literals, the boolean operators and the value a field or
//! index is read from are not charged: they run once, or borrow, and their operands
//! are charged where they are used. The charges are counted, not timed, so an
//! expression gives the same outcome on every machine. Once the units are spent,
//! every charge fails, `all` and `exists` stop at their next step and the other macros
//! at their step's failed charge, so the evaluation ends at once.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use cel::common::ast::{
    CallExpr, EntryExpr, Expr, IdedEntryExpr, IdedExpr, LiteralValue, MapExpr, SelectExpr,
    StructExpr, operators,
};
use cel::common::types::{CelBool, CelBytes, CelInt, CelList, CelMap, CelString, DYN_TYPE};
use cel::common::value::{CowVal, Val};
use cel::{Env, ExecutionError};

/// The most units one evaluation of an expression may spend: a simple pass over a list
/// costs a few units per element (the largest task context `TASKER_MAX_CONTEXT_BYTES`
/// allows by default, 1 MiB, holds at most about 500,000 values), and the costliest
/// expressions measured spend this in about a third of a second of one core.
pub const MAX_EXPRESSION_COST: u64 = 2_000_000;
/// Bytes of text per unit.
pub(super) const TEXT_BYTES_PER_UNIT: usize = 16;
/// What compiling a pattern for `matches` costs, besides a unit per byte of it.
pub(super) const PATTERN_UNITS: u64 = 50_000;
/// The compiled size past which a pattern is refused: compiling one as large as that
/// takes a few milliseconds.
pub(super) const PATTERN_SIZE_LIMIT: usize = 1 << 20;
/// States of a pattern's program per unit charged for each byte searched.
pub(super) const STATES_PER_UNIT: u64 = 16;
/// Compiled patterns an evaluation keeps.
const KEPT_PATTERNS: usize = 8;
/// The longest pattern `matches` takes, in bytes (as long as an expression).
const MAX_PATTERN_BYTES: usize = 4096;
/// Nodes of a loop's step evaluated per unit charged: a node takes 10 to 40 ns, a value
/// read or copied 100 to 150.
const NODES_PER_UNIT: u64 = 4;
/// The fields of a path between two of its charges' calls.
const FIELDS_PER_CHARGE: usize = 8;
/// Nesting past which a value is not weighed further: it is charged all that is left.
const MAX_WEIGHED_DEPTH: usize = 512;

/// The functions the charges call. Their names begin with `@`, which CEL source cannot
/// write, so no template can call them or declare one of its own under their name.
const WHOLE: &str = "@tasker_whole";
const SIZE: &str = "@tasker_size";
const LOOKUP: &str = "@tasker_lookup";
const STEP: &str = "@tasker_step";
const TICK: &str = "@tasker_tick";
const FIELDS: &str = "@tasker_fields";
/// `matches`, for which the calls are renamed.
const MATCHES: &str = "@tasker_matches";

thread_local! {
    /// Units left to the evaluation running on this thread.
    static LEFT: Cell<u64> = const { Cell::new(u64::MAX) };
    /// Whether that evaluation ran out.
    static SPENT: Cell<bool> = const { Cell::new(false) };
    /// The patterns that evaluation compiled, or why they cannot be.
    static PATTERNS: RefCell<HashMap<String, Result<Pattern, String>>> =
        RefCell::new(HashMap::new());
}

/// The standard library with the charges' functions.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| {
    let mut env = Env::stdlib();
    for (name, op) in [
        (WHOLE, charge_whole as cel::common::functions::Function),
        (SIZE, charge_size),
        (LOOKUP, charge_lookup),
    ] {
        env.add_overload(name, name, vec![DYN_TYPE], op)
            .expect("the charges' names are declared once");
    }
    for (name, op) in [
        (MATCHES, matches as cel::common::functions::Function),
        (FIELDS, charge_fields),
        (STEP, charge_step),
        (TICK, charge_tick),
    ] {
        env.add_overload(name, name, vec![DYN_TYPE, DYN_TYPE], op)
            .expect("the charges' names are declared once");
    }
    Arc::new(env)
});

/// A context for [`run`]: the standard library and the charges' functions.
pub(super) fn context() -> cel::Context<'static, 'static> {
    cel::Context::with_env(ENV.clone())
}

/// Evaluate the metered expression `metered` (from [`meter`]) with `context` (from
/// [`context`]), within [`MAX_EXPRESSION_COST`].
///
/// # Errors
///
/// CEL's error, or, once the evaluation spent its units, a message saying so (whatever
/// CEL made of the charge that failed: an error beside `||` may still give `true`).
pub(super) fn run(
    metered: &IdedExpr,
    context: &cel::Context<'_, '_>,
) -> Result<cel::Value, String> {
    LEFT.set(MAX_EXPRESSION_COST);
    SPENT.set(false);
    let result = cel::Value::resolve(metered, context);
    LEFT.set(u64::MAX);
    PATTERNS.with_borrow_mut(HashMap::clear);
    if SPENT.replace(false) {
        return Err(format!(
            "did more work than an expression may: more than {MAX_EXPRESSION_COST} units \
             (a unit is a value, or {TEXT_BYTES_PER_UNIT} bytes of text, read or copied; \
             docs/templates.md, \"Expressions\")"
        ));
    }
    result.map_err(|error| error.to_string())
}

/// Spend `units`, or fail once the evaluation has none left.
fn spend(units: u64) -> Result<(), ExecutionError> {
    let left = LEFT.get();
    if units > left || SPENT.get() {
        LEFT.set(0);
        SPENT.set(true);
        return Err(ExecutionError::function_error(
            "cost",
            format!("more than {MAX_EXPRESSION_COST} units"),
        ));
    }
    LEFT.set(left - units);
    Ok(())
}

/// Units of `bytes` of text, at `per_unit` bytes a unit.
fn text_units(bytes: usize, per_unit: usize) -> u64 {
    1 + (bytes / per_unit) as u64
}

/// The weight of `value` through its nested lists and maps, counted up to `limit`
/// (past it the exact figure does not matter, and the walk stops).
fn weigh(value: &dyn Val, limit: u64) -> u64 {
    /// Add `value`'s weight to `total`; false once past `limit`.
    fn walk(value: &dyn Val, limit: u64, depth: usize, total: &mut u64) -> bool {
        if depth > MAX_WEIGHED_DEPTH {
            *total = limit.saturating_add(1);
            return false;
        }
        *total += if let Some(text) = value.downcast_ref::<CelString>() {
            text_units(text.inner().len(), TEXT_BYTES_PER_UNIT)
        } else if let Some(bytes) = value.downcast_ref::<CelBytes>() {
            text_units(bytes.inner().len(), TEXT_BYTES_PER_UNIT)
        } else {
            1
        };
        if *total > limit {
            return false;
        }
        if let Some(list) = value.downcast_ref::<CelList>() {
            list.inner()
                .iter()
                .all(|element| walk(element.as_ref(), limit, depth + 1, total))
        } else if let Some(map) = value.downcast_ref::<CelMap>() {
            map.inner().iter().all(|(key, element)| {
                walk(key.inner(), limit, depth + 1, total)
                    && walk(element.as_ref(), limit, depth + 1, total)
            })
        } else if let Some(items) = value.as_iterable() {
            // A list or map of another kind: its elements (a map's keys) at least.
            let mut items = items.iter();
            while let Some(item) = items.next() {
                if !walk(item, limit, depth + 1, total) {
                    return false;
                }
            }
            true
        } else {
            true
        }
    }
    let mut total = 0;
    walk(value, limit, 0, &mut total);
    total
}

/// Charge the whole weight of the one argument, and hand it back unchanged.
fn charge_whole<'b, 'v>(mut args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let value = args.pop().expect("a charge has one argument");
    spend(weigh(value.as_ref(), LEFT.get()))?;
    Ok(value)
}

/// The value and the units of a charge of two arguments: what it hands back, and a
/// count the meter wrote.
fn value_and_units<'b, 'v>(mut args: Vec<CowVal<'b, 'v>>) -> (CowVal<'b, 'v>, u64) {
    let units = args.pop().expect("this charge has two arguments");
    let value = args.pop().expect("this charge has two arguments");
    let units = units.downcast_ref::<CelInt>().map_or(1, |n| *n.inner());
    (value, u64::try_from(units).unwrap_or(1))
}

/// Charge a step of a macro's loop (the units the meter counted for it), and hand back
/// its condition to go on: false once the units are spent, which ends the loop.
fn charge_step<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let (go_on, units) = value_and_units(args);
    if spend(units).is_err() {
        return Ok(CowVal::Owned(Box::new(CelBool::from(false))));
    }
    Ok(go_on)
}

/// Charge a step of a macro's loop (the units the meter counted for it), and hand back
/// what it gave.
fn charge_tick<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let (value, units) = value_and_units(args);
    spend(units)?;
    Ok(value)
}

/// Charge the fields of a path (the count the meter wrote), and hand back the value it
/// begins with.
fn charge_fields<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let (value, units) = value_and_units(args);
    spend(units)?;
    Ok(value)
}

/// Charge what `size()` reads: the bytes of a text, one unit for anything else.
fn charge_size<'b, 'v>(mut args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let value = args.pop().expect("a charge has one argument");
    let units = if let Some(text) = value.downcast_ref::<CelString>() {
        text_units(text.inner().len(), TEXT_BYTES_PER_UNIT)
    } else {
        1
    };
    spend(units)?;
    Ok(value)
}

/// Charge what `in` reads of its container: one unit for a map, the whole of a list.
fn charge_lookup<'b, 'v>(mut args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let value = args.pop().expect("a charge has one argument");
    let units = if value.downcast_ref::<CelMap>().is_some() {
        1
    } else {
        weigh(value.as_ref(), LEFT.get())
    };
    spend(units)?;
    Ok(value)
}

/// CEL's `matches` (a string and an RE2 pattern): the pattern is charged and compiled
/// unless the evaluation keeps it, and refused past [`PATTERN_SIZE_LIMIT`]; the search
/// is charged by the text's length and the size of the pattern's program.
fn matches<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let [text, pattern] = args.as_slice() else {
        return Err(ExecutionError::function_error(
            "matches",
            "takes a string and a pattern",
        ));
    };
    let (Some(text), Some(pattern)) = (
        text.downcast_ref::<CelString>(),
        pattern.downcast_ref::<CelString>(),
    ) else {
        return Err(ExecutionError::function_error(
            "matches",
            "takes a string and a pattern, both strings",
        ));
    };
    let pattern = pattern.inner();
    // Looking the pattern up reads it.
    spend(text_units(pattern.len(), TEXT_BYTES_PER_UNIT))?;
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(ExecutionError::function_error(
            "matches",
            format!(
                "'{}…' is not a pattern it can use: {} bytes, at most {MAX_PATTERN_BYTES}",
                shown(pattern),
                pattern.len()
            ),
        ));
    }
    PATTERNS.with_borrow_mut(|patterns| {
        if !patterns.contains_key(pattern) {
            spend(PATTERN_UNITS + pattern.len() as u64)?;
            if patterns.len() >= KEPT_PATTERNS {
                patterns.clear();
            }
            patterns.insert(pattern.to_owned(), compile_pattern(pattern));
        }
        match &patterns[pattern] {
            Ok(compiled) => {
                spend(text_units(text.inner().len(), 1).saturating_mul(compiled.units_per_byte))?;
                Ok(CowVal::Owned(Box::new(CelBool::from(
                    compiled.regex.is_match(text.inner()),
                ))))
            }
            Err(error) => Err(ExecutionError::function_error("matches", error)),
        }
    })
}

/// The start of `pattern`, to name it in a message.
fn shown(pattern: &str) -> String {
    pattern.chars().take(60).collect()
}

/// A pattern of `matches`, compiled.
struct Pattern {
    regex: regex::Regex,
    /// What a byte searched costs.
    units_per_byte: u64,
}

/// `pattern` compiled, or why it cannot be.
fn compile_pattern(pattern: &str) -> Result<Pattern, String> {
    use regex_automata::nfa::thompson;
    let refused = |error: &dyn std::fmt::Display| {
        format!("'{}' is not a pattern it can use: {error}", shown(pattern))
    };
    let program = thompson::Compiler::new()
        .configure(thompson::Config::new().nfa_size_limit(Some(PATTERN_SIZE_LIMIT)))
        .build(pattern)
        .map_err(|error| refused(&error))?;
    let regex = regex::RegexBuilder::new(pattern)
        .size_limit(PATTERN_SIZE_LIMIT)
        .build()
        .map_err(|error| refused(&error))?;
    Ok(Pattern {
        regex,
        units_per_byte: 1 + program.states().len() as u64 / STATES_PER_UNIT,
    })
}

/// `expression` with its charges laid in (see the module's documentation). Ids of the
/// new nodes follow the highest of `expression`'s.
pub(super) fn meter(expression: &IdedExpr) -> IdedExpr {
    let mut meter = Meter {
        next_id: highest_id(expression) + 1,
        accumulators: Vec::new(),
    };
    let body = meter.node(expression);
    meter.charge(WHOLE, body)
}

struct Meter {
    next_id: u64,
    /// The accumulators of the macros being walked: `@result` is not a value of the
    /// template's, and a macro's shape (`@result + [x]`) is how CEL recognises it.
    accumulators: Vec<String>,
}

impl Meter {
    /// `expression` wrapped in a call of the charge `function`, unless it is a literal,
    /// which is read where it is written.
    fn charge(&mut self, function: &str, expression: IdedExpr) -> IdedExpr {
        if matches!(expression.expr, Expr::Literal(_)) {
            return expression;
        }
        self.part(function, expression)
    }

    /// An element, key or value of a list or map written in the expression (which is
    /// built each time it is evaluated) wrapped in a call of the charge `function`,
    /// literals too.
    fn part(&mut self, function: &str, expression: IdedExpr) -> IdedExpr {
        // A list or map written out is charged by its parts (and `@result + [x]` must
        // keep its shape); the accumulator of a macro is not the template's value.
        if matches!(
            expression.expr,
            Expr::List(_) | Expr::Map(_) | Expr::Struct(_)
        ) {
            return expression;
        }
        if let Expr::Ident(name) = &expression.expr
            && self.accumulators.contains(name)
        {
            return expression;
        }
        self.wrap(function, expression)
    }

    /// `expression` wrapped in a call of the charge `function`.
    fn wrap(&mut self, function: &str, expression: IdedExpr) -> IdedExpr {
        self.wrap_with(function, vec![expression])
    }

    /// A call of the charge `function` with `args`.
    fn wrap_with(&mut self, function: &str, args: Vec<IdedExpr>) -> IdedExpr {
        self.next_id += 1;
        IdedExpr {
            id: self.next_id,
            expr: Expr::Call(CallExpr {
                func_name: function.to_owned(),
                target: None,
                args,
            }),
        }
    }

    /// `node` with charges laid into its parts.
    fn node(&mut self, node: &IdedExpr) -> IdedExpr {
        let expr = match &node.expr {
            Expr::Call(call) => Expr::Call(self.call(call)),
            Expr::Comprehension(c) => {
                let range = self.node(&c.iter_range);
                let iter_range = self.charge(WHOLE, range);
                let accu_init = self.node(&c.accu_init);
                self.accumulators.push(c.accu_var.clone());
                let loop_cond = self.node(&c.loop_cond);
                let loop_step = self.node(&c.loop_step);
                // Each step is charged what it evaluates ([`step_units`]). A loop whose
                // condition is a literal
                // (`map`, `filter`, `exists_one`) stops at its step's first error, so
                // its step is charged, in the shape CEL recognises to append in place;
                // the others (`all`, `exists`) go on past errors, so their condition
                // is, and stops them.
                let units = step_units(&[&c.loop_cond, &c.loop_step], self.accumulators.len());
                let (loop_cond, loop_step) = if matches!(loop_cond.expr, Expr::Literal(_)) {
                    (loop_cond, self.tick(loop_step, &c.accu_var, units))
                } else {
                    let units = self.count(units);
                    (self.wrap_with(STEP, vec![loop_cond, units]), loop_step)
                };
                let result = self.node(&c.result);
                self.accumulators.pop();
                Expr::Comprehension(Box::new(cel::common::ast::ComprehensionExpr {
                    iter_range,
                    iter_var: c.iter_var.clone(),
                    iter_var2: c.iter_var2.clone(),
                    accu_var: c.accu_var.clone(),
                    accu_init,
                    loop_cond,
                    loop_step,
                    result,
                }))
            }
            Expr::List(list) => {
                let mut list = list.clone();
                list.elements = list
                    .elements
                    .iter()
                    .map(|element| {
                        let element = self.node(element);
                        self.part(WHOLE, element)
                    })
                    .collect();
                Expr::List(list)
            }
            Expr::Map(MapExpr { entries }) => Expr::Map(MapExpr {
                entries: self.entries(entries),
            }),
            Expr::Struct(StructExpr { type_name, entries }) => Expr::Struct(StructExpr {
                type_name: type_name.clone(),
                entries: self.entries(entries),
            }),
            Expr::Select(_) => return self.path(node),
            Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => node.expr.clone(),
        };
        IdedExpr { id: node.id, expr }
    }

    /// A chain of fields (`x.a.b`, `has(x.a.b)`), charged a unit per field where it
    /// begins (a field that fails fails those above it, which are read all the same).
    /// CEL reads the fields under each field again to tell whether the chain is a
    /// qualified name (work that grows with the square of the chain's length), and
    /// resolves one that begins with a name by trying each of its prefixes as a
    /// variable's name in each scope; a call every [`FIELDS_PER_CHARGE`] fields ends what
    /// is read again, and the value it hands over is read one field at a time.
    fn path(&mut self, top: &IdedExpr) -> IdedExpr {
        let mut fields = Vec::new();
        let mut bottom = top;
        while let Expr::Select(select) = &bottom.expr {
            fields.push((bottom.id, select));
            bottom = &select.operand;
        }
        let mut path = match &bottom.expr {
            Expr::Ident(_) => bottom.clone(),
            _ => self.node(bottom),
        };
        let count = fields.len();
        for (n, (id, select)) in fields.into_iter().rev().enumerate() {
            if n % FIELDS_PER_CHARGE == 0 {
                let units = self.count(if n == 0 { count as u64 } else { 0 });
                path = self.wrap_with(FIELDS, vec![path, units]);
            }
            path = IdedExpr {
                id,
                expr: Expr::Select(SelectExpr {
                    operand: Box::new(path),
                    field: select.field.clone(),
                    test: select.test,
                }),
            };
        }
        path
    }

    /// The step of a loop whose condition is a literal, charged a unit each time it runs
    /// (and failing once the units are spent), in its shape: `@result + [x]` (`map`)
    /// is charged by `x`, written as part of a list; `c ? … : @result` (`filter`,
    /// `exists_one`) by its condition.
    fn tick(&mut self, step: IdedExpr, accumulator: &str, units: u64) -> IdedExpr {
        let is_accumulator = |e: &IdedExpr| matches!(&e.expr, Expr::Ident(n) if n == accumulator);
        let units = self.count(units);
        let expr = match step.expr {
            Expr::Call(mut call)
                if call.func_name == operators::ADD
                    && call.target.is_none()
                    && matches!(call.args.as_slice(), [sum, part]
                        if is_accumulator(sum) && matches!(&part.expr, Expr::List(list)
                            if !list.elements.is_empty())) =>
            {
                if let Expr::List(list) = &mut call.args[1].expr {
                    let first = list.elements.remove(0);
                    list.elements
                        .insert(0, self.wrap_with(TICK, vec![first, units]));
                }
                Expr::Call(call)
            }
            Expr::Call(mut call)
                if call.func_name == operators::CONDITIONAL
                    && call.target.is_none()
                    && call.args.len() == 3
                    && is_accumulator(&call.args[2]) =>
            {
                let condition = call.args.remove(0);
                call.args
                    .insert(0, self.wrap_with(TICK, vec![condition, units]));
                Expr::Call(call)
            }
            expr => return self.wrap_with(TICK, vec![IdedExpr { id: step.id, expr }, units]),
        };
        IdedExpr { id: step.id, expr }
    }

    /// A literal of `units`, for a charge of two arguments.
    fn count(&mut self, units: u64) -> IdedExpr {
        self.next_id += 1;
        IdedExpr {
            id: self.next_id,
            expr: Expr::Literal(LiteralValue::Int(CelInt::from(
                i64::try_from(units).unwrap_or(i64::MAX),
            ))),
        }
    }

    fn entries(&mut self, entries: &[IdedEntryExpr]) -> Vec<IdedEntryExpr> {
        entries
            .iter()
            .map(|entry| IdedEntryExpr {
                id: entry.id,
                expr: match &entry.expr {
                    EntryExpr::MapEntry(e) => {
                        let mut e = e.clone();
                        let key = self.node(&e.key);
                        e.key = self.part(WHOLE, key);
                        let value = self.node(&e.value);
                        e.value = self.part(WHOLE, value);
                        EntryExpr::MapEntry(e)
                    }
                    EntryExpr::StructField(f) => {
                        let mut f = f.clone();
                        let value = self.node(&f.value);
                        f.value = self.part(WHOLE, value);
                        EntryExpr::StructField(f)
                    }
                },
            })
            .collect()
    }

    /// A call with charges on its operands, as its function reads them.
    fn call(&mut self, call: &CallExpr) -> CallExpr {
        let name = call.func_name.as_str();
        if name == "matches"
            && let (Some(text), [pattern]) | (None, [text, pattern]) =
                (call.target.as_deref(), call.args.as_slice())
        {
            // `text.matches(pattern)` or `matches(text, pattern)`: both are charged by
            // the function, which knows the pattern's program and keeps it compiled.
            return CallExpr {
                func_name: MATCHES.to_owned(),
                target: None,
                args: vec![self.node(text), self.node(pattern)],
            };
        }
        // Operators that only test or borrow: their operands are charged where used.
        let borrows = matches!(
            name,
            operators::LOGICAL_AND
                | operators::LOGICAL_OR
                | operators::LOGICAL_NOT
                | operators::CONDITIONAL
                | operators::NOT_STRICTLY_FALSE
                | operators::INDEX
                | operators::OPT_INDEX
                | operators::OPT_SELECT
        );
        let target = call.target.as_deref().map(|target| {
            let walked = self.node(target);
            let charged = if borrows {
                walked
            } else {
                self.charge(charge_of(name, 0), walked)
            };
            Box::new(charged)
        });
        let args = call
            .args
            .iter()
            .enumerate()
            .map(|(n, arg)| {
                let walked = self.node(arg);
                // A member call's target is its first operand.
                let position = n + usize::from(call.target.is_some());
                // An index borrows its container, but reads all of its key.
                let key = matches!(name, operators::INDEX | operators::OPT_INDEX) && position == 1;
                if borrows && !key {
                    walked
                } else {
                    self.charge(charge_of(name, position), walked)
                }
            })
            .collect();
        CallExpr {
            func_name: call.func_name.clone(),
            target,
            args,
        }
    }
}

/// The charge for operand `position` of the function `name`.
fn charge_of(name: &str, position: usize) -> &'static str {
    match (name, position) {
        ("size", _) => SIZE,
        (operators::IN, 1) => LOOKUP,
        _ => WHOLE,
    }
}

/// What a step of a loop costs besides the values it reads: its condition and step as
/// written (`parts`), a unit for each [`NODES_PER_UNIT`] nodes evaluated (an operator, a
/// literal, a name, a field), a name counting once more for each of the `scopes` of
/// macros it is looked up through, and a literal text by its length. A macro inside is
/// counted by its list and first value; its own steps are charged by its own loop.
/// Recursive: the meter runs on the compiling thread.
fn step_units(parts: &[&IdedExpr], scopes: usize) -> u64 {
    fn walk(node: &IdedExpr, scopes: u64, nodes: &mut u64, texts: &mut u64) {
        *nodes += 1;
        match &node.expr {
            Expr::Literal(LiteralValue::String(text)) => {
                *texts += text_units(text.inner().len(), TEXT_BYTES_PER_UNIT);
            }
            Expr::Literal(LiteralValue::Bytes(bytes)) => {
                *texts += text_units(bytes.inner().len(), TEXT_BYTES_PER_UNIT);
            }
            Expr::Ident(_) => *nodes += scopes,
            Expr::Comprehension(c) => {
                walk(&c.iter_range, scopes, nodes, texts);
                walk(&c.accu_init, scopes, nodes, texts);
            }
            _ => {
                for operand in operands(node) {
                    walk(operand, scopes, nodes, texts);
                }
            }
        }
    }
    let (mut nodes, mut texts) = (0, 0);
    for part in parts {
        walk(part, scopes as u64, &mut nodes, &mut texts);
    }
    1 + nodes / NODES_PER_UNIT + texts
}

/// The expressions directly under `node`: a call's target and arguments, a macro's
/// list, first value, condition, step and result, the elements of a list, the keys and
/// values of a map, the operand of a field.
pub(super) fn operands(node: &IdedExpr) -> Vec<&IdedExpr> {
    match &node.expr {
        Expr::Call(call) => call
            .target
            .as_deref()
            .into_iter()
            .chain(&call.args)
            .collect(),
        Expr::Comprehension(c) => vec![
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ],
        Expr::List(list) => list.elements.iter().collect(),
        Expr::Map(MapExpr { entries }) | Expr::Struct(StructExpr { entries, .. }) => entries
            .iter()
            .flat_map(|entry| match &entry.expr {
                EntryExpr::MapEntry(e) => vec![&e.key, &e.value],
                EntryExpr::StructField(f) => vec![&f.value],
            })
            .collect(),
        Expr::Select(select) => vec![&select.operand],
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => Vec::new(),
    }
}

/// The highest node id in `root`, walked without recursion.
fn highest_id(root: &IdedExpr) -> u64 {
    let mut highest = 0;
    let mut stack = vec![root];
    while let Some(node) = stack.pop() {
        highest = highest.max(node.id);
        // A map's entries have ids of their own.
        if let Expr::Map(MapExpr { entries }) | Expr::Struct(StructExpr { entries, .. }) =
            &node.expr
        {
            highest = entries.iter().map(|entry| entry.id).fold(highest, u64::max);
        }
        stack.extend(operands(node));
    }
    highest
}
