//! The seed corpus in `tests/fuzz_corpus/`: real templates and messages (from
//! `deploy/templates`, `tests/fixtures` and the docs) and hostile ones, fed to the parsers.
//!
//! File names say what must happen:
//! - `bad_*`: refused (with problems that say why);
//! - `nasty_*`: accepted or refused, but quickly and without a panic;
//! - anything else: accepted. Templates must then round-trip; messages are `step_*`
//!   (a [`StepMessage`](tasker_protocol::messages::StepMessage)), `worker_*` (a
//!   [`WorkerMessage`](tasker_protocol::messages::WorkerMessage)) or `control_*` (a
//!   [`ControlMessage`](tasker_protocol::messages::ControlMessage)).
//!
//! The corpus also seeds the mutation properties of `templates` and `messages`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tasker_shared::template::parse_template;

use crate::messages::decode_every_way;

/// Longest a single corpus file may take (debug build, all checks).
const PATIENCE: Duration = Duration::from_secs(10);

fn dir(kind: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(kind)
}

/// Every file of `fuzz_corpus/<kind>`, by name.
pub(crate) fn files(kind: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir(kind))
        .unwrap_or_else(|error| panic!("reading the {kind} corpus: {error}"))
        .map(|entry| {
            let path = entry.expect("a directory entry").path();
            let name = path
                .file_name()
                .and_then(|name| name.to_str())
                .expect("a UTF-8 file name")
                .to_owned();
            let bytes = std::fs::read(&path).expect("a readable corpus file");
            (name, bytes)
        })
        .collect();
    files.sort();
    files
}

/// Whether a corpus file must be accepted.
pub(crate) fn expect_valid(name: &str) -> bool {
    !name.starts_with("bad_") && !name.starts_with("nasty_")
}

/// Contexts to check against every accepted template's context schema.
fn contexts() -> Vec<Value> {
    let mut deep = json!("leaf");
    for _ in 0..200 {
        deep = json!({ "a": [deep] });
    }
    vec![
        json!({}),
        Value::Null,
        json!({"order_id": 1, "customer": {"email": "a@example.com"}, "who": "you"}),
        json!({"order_id": "1", "customer": {"email": "not an email"}, "id": "ABC"}),
        json!({"a": format!("{}!", "a".repeat(64)), "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxy": 1}),
        deep,
    ]
}

fn check_template(name: &str, bytes: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(bytes);
    for environment in ["development", "production"] {
        match parse_template(&text, environment) {
            Ok(definition) => {
                if name.starts_with("bad_") {
                    return Err(format!("accepted ({environment})"));
                }
                let stored = serde_json::to_value(&definition).map_err(|e| e.to_string())?;
                let reparsed = parse_template(&stored.to_string(), environment)
                    .map_err(|e| format!("stored form refused: {:?}", e.problems()))?;
                if reparsed != definition {
                    return Err("the stored form parses to another definition".into());
                }
                for context in contexts() {
                    // Any answer will do, as long as there is one.
                    let _ = definition.validate_context(&context);
                }
            }
            Err(error) => {
                if expect_valid(name) {
                    return Err(format!("refused ({environment}): {:?}", error.problems()));
                }
                if error.problems().is_empty()
                    || error
                        .problems()
                        .iter()
                        .any(|p| p.message.is_empty() || p.code.is_empty())
                {
                    return Err(format!("refused without reasons: {:?}", error.problems()));
                }
            }
        }
    }
    Ok(())
}

fn check_message(name: &str, bytes: &[u8]) -> Result<(), String> {
    let decoded = decode_every_way(bytes);
    let expected = if name.starts_with("step_") {
        Some((true, false, false))
    } else if name.starts_with("worker_") {
        Some((false, true, false))
    } else if name.starts_with("control_") {
        Some((false, false, true))
    } else if name.starts_with("bad_") {
        Some((false, false, false))
    } else {
        None
    };
    match expected {
        Some(expected) if expected != decoded => Err(format!(
            "decoded as (step, worker, control) = {decoded:?}, expected {expected:?}"
        )),
        _ => Ok(()),
    }
}

/// Run `check` on every file of the corpus, collecting every failure, panic or slow file.
fn run_corpus(kind: &str, check: fn(&str, &[u8]) -> Result<(), String>) {
    let files = files(kind);
    assert!(files.len() >= 10, "the {kind} corpus is missing");
    let mut failures = Vec::new();
    for (name, bytes) in &files {
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| check(name, bytes)));
        let elapsed = started.elapsed();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => failures.push(format!("{name}: {reason}")),
            Err(_) => failures.push(format!("{name}: PANIC (see the output above)")),
        }
        if elapsed > PATIENCE {
            failures.push(format!("{name}: took {elapsed:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} {kind} corpus files failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn every_corpus_template_gets_an_answer() {
    run_corpus("templates", check_template);
}

#[test]
fn every_corpus_message_gets_an_answer() {
    run_corpus("messages", check_message);
}

/// What each corpus template and message gets, for people:
/// `cargo test -p tasker-shared --test fuzz -- --ignored --nocapture corpus_report`.
#[test]
#[ignore = "a report, not a check"]
fn corpus_report() {
    for (name, bytes) in files("templates") {
        let started = Instant::now();
        let outcome = parse_template(&String::from_utf8_lossy(&bytes), "development");
        let elapsed = started.elapsed();
        let answer = match outcome {
            Ok(definition) => format!("accepted, {} step(s)", definition.steps.len()),
            Err(error) => {
                let first = &error.problems()[0];
                let mut text = format!("{} problem(s), first: {first}", error.problems().len());
                text.truncate(text.floor_char_boundary(160));
                text
            }
        };
        println!("{name:45} {elapsed:>10.1?}  {answer}");
    }
    for (name, bytes) in files("messages") {
        let answers = [
            tasker_shared::messages::StepMessage::decode(&bytes).map(|_| ()),
            tasker_shared::messages::WorkerMessage::decode(&bytes).map(|_| ()),
            tasker_shared::messages::ControlMessage::decode(&bytes).map(|_| ()),
        ];
        let shown: Vec<String> = answers
            .iter()
            .map(|answer| match answer {
                Ok(()) => "ok".to_owned(),
                Err(error) => {
                    let mut text = error.to_string();
                    text.truncate(text.floor_char_boundary(60));
                    text
                }
            })
            .collect();
        println!(
            "{name:45} step: {} | worker: {} | control: {}",
            shown[0], shown[1], shown[2]
        );
    }
}
