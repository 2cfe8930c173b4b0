//! Prints what CEL evaluations cost under the bound on their work
//! (docs/templates.md, "Expressions"): the time of a typical condition, and for
//! patterns over lists of 10,000 to 400,000 values, the outcome and the time each took,
//! whether it ran or was stopped. Run it in release:
//!
//! ```text
//! cargo run --release -p tasker-shared --example expression_cost
//! ```

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tasker_shared::template::{MAX_EXPRESSION_COST, evaluate_condition};

fn main() {
    println!("bound: {MAX_EXPRESSION_COST} units per evaluation");
    typical();
    let mut slowest = Duration::ZERO;
    for n in [10_000_usize, 100_000, 400_000] {
        println!("\n{n} values:");
        let context = context(n);
        let path = format!(
            "context.items.exists(x, context{} == 1)",
            ".aaaaaaaaaaaaaaa".repeat(250)
        );
        let operands = format!("context.items.all(b, {})", vec!["b >= 0"; 500].join("&&"));
        let zeros = format!("[{}]", vec!["0"; 400].join(","));
        let written =
            format!("{zeros}.exists_one(a, {zeros}.exists_one(b, {zeros}.exists_one(c, true)))");
        let patterns = PATTERNS
            .iter()
            .map(|&(label, when)| (label, when.to_owned()))
            .chain([
                ("lists written, nested", written),
                ("a path of 250 fields", path.clone()),
                ("500 comparisons per step", operands.clone()),
            ]);
        for (label, when) in patterns {
            let start = Instant::now();
            let outcome = evaluate_condition(&when, &context, &json!({}), &json!({}));
            let took = start.elapsed();
            slowest = slowest.max(took);
            let outcome = match outcome {
                Ok(value) => format!("ran ({value})"),
                Err(error) if error.contains("did more work than") => "stopped".to_owned(),
                Err(error) => format!("failed: {}", error.chars().take(80).collect::<String>()),
            };
            println!(
                "  {label:<26} {outcome:<10} {:>8.1} ms",
                took.as_secs_f64() * 1e3
            );
        }
    }
    println!(
        "\nslowest evaluation: {:.1} ms",
        slowest.as_secs_f64() * 1e3
    );
}

/// What each pattern is, and the expression.
const PATTERNS: &[(&str, &str)] = &[
    (
        "each with every other",
        "context.objs.all(a, context.objs.exists_one(b, a.id == b.id))",
    ),
    ("a pass over objects", "context.objs.all(a, a.id >= 0)"),
    ("a pass over numbers", "context.items.all(a, a >= 0)"),
    (
        "filter and map",
        "context.objs.filter(o, o.id < 10).map(o, o.id).size() == 10",
    ),
    (
        "list copied per element",
        "context.items.map(a, context.items).size() > 0",
    ),
    (
        "list searched per element",
        "context.items.all(a, a in context.items)",
    ),
    (
        "map looked up per element",
        "context.items.all(a, 'a' in context.m)",
    ),
    (
        "size per element",
        "context.items.all(a, size(context.items) > 0)",
    ),
    (
        "pattern per element",
        "context.items.all(a, string(a).matches('^[0-9]+$'))",
    ),
    (
        "text searched per element",
        "context.items.all(a, !context.text.contains('y'))",
    ),
    (
        "costly pattern search",
        "context.items.all(a, !context.ab.matches('(a|b)*a(a|b){200}c'))",
    ),
];

/// `n` numbers, up to 100,000 objects, 500 KB of text and 500 KB of `a`s and `b`s.
fn context(n: usize) -> Value {
    let mut state: u64 = 88_172_645_463_325_252;
    let ab: String = (0..500_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if state & 1 == 0 { 'a' } else { 'b' }
        })
        .collect();
    json!({
        "items": (0..n as u64).collect::<Vec<_>>(),
        "objs": (0..n.min(100_000) as u64).map(|id| json!({"id": id})).collect::<Vec<_>>(),
        "text": "x".repeat(500_000),
        "ab": ab,
        "m": {"a": 1},
    })
}

/// A condition as templates write them, evaluated 20,000 times.
fn typical() {
    let when = "parents.a.total > context.min && task.priority > 3 \
                && context.items.exists(i, i == 2)";
    let context = json!({"min": 10, "items": [1, 2, 3]});
    let parents = json!({"a": {"total": 12}});
    let task = json!({"priority": 5});
    let rounds = 20_000;
    let start = Instant::now();
    for _ in 0..rounds {
        assert_eq!(
            evaluate_condition(when, &context, &parents, &task),
            Ok(true)
        );
    }
    println!(
        "a typical condition ({when}): {:.1} us per evaluation",
        start.elapsed().as_secs_f64() * 1e6 / f64::from(rounds)
    );
}
