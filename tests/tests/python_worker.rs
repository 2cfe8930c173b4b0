//! The Python example worker (`deploy/examples/python_worker/worker.py`) in a fleet with
//! Rust workers: one task whose steps hop from a Rust worker to the Python worker and
//! back, on the same namespace queue, against the real coordinator.
//!
//! # Why the hand-offs are deterministic
//!
//! A task has one namespace, so all its steps go to one queue, and the broker gives each
//! message to whichever consumer of that queue has credit. Two workers consuming `mixed`
//! at the same time would split the steps by chance, and a Python step that reached the
//! Rust worker would fail for good (`unknown_handler`). So the test never lets a worker
//! consume while a step it must not run can be dispatched. It controls two things:
//!
//! - **who consumes**: a worker is started only when the steps it must not run are
//!   already held by another worker, and is stopped with SIGTERM (which stops its
//!   consuming at once but lets its running steps finish) before the steps it must not
//!   run are dispatched;
//! - **when dependents are dispatched**: the Rust steps `a` and `hold` are `tasker.http`
//!   calls to a gate served by this test, which answers only when the test opens it.
//!
//! ```text
//!  a (tasker.http, gate a) ──▶ b (python.greet) ──▶ c (python.sum) ──▶ e (python.sum)
//!                                   │                   │                   │
//!  hold (tasker.http, gate hold) ───┴───────────────────┴───────────────────┴──▶ d (tasker.echo)
//! ```
//!
//! 1. Only `rust-1` consumes when the task is created, so it takes both roots, whose
//!    handlers then wait at the gates.
//! 2. `rust-1` gets SIGTERM: it stops consuming and keeps running `a` and `hold`. The
//!    Python worker starts; gate `a` opens; `b`, `c` and `e` can only go to `py-worker`.
//!    (A second task, also served only by `py-worker`, checks its failure answers: an
//!    unknown handler and a handler that raises.)
//! 3. `py-worker` gets SIGTERM and exits; `rust-2` starts; gate `hold` opens, so `rust-1`
//!    finishes `hold` and exits, and `d` can only go to `rust-2`.
//!
//! The step history then shows exactly which worker ran each step, and the results of
//! the Python steps are compared exactly, including what they read from their parents
//! and what the Rust step `d` read from them.
//!
//! The other tests run the worker's unit tests (`test_worker.py`, which checks every
//! message it publishes against `docs/schemas/`), and run it with `TASKER_MESSAGE_KEY`
//! beside a coordinator with the same key: a task completes signed both ways, poison
//! step messages are dead-lettered without stopping it, and results that cannot travel
//! (NaN, a set, over `TASKER_MAX_RESULT_BYTES`) fail their steps with a clear
//! `last_error`.
//!
//! These tests need `python3` with the packages of
//! `deploy/examples/python_worker/requirements-test.txt` (`deploy/test.sh` installs them).
//! Without them they fail, saying what to install, unless `TASKER_SKIP_PYTHON_WORKER=1`
//! says to skip them.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::routing::get;
use serde_json::{Value, json};
use tasker_shared::broker::header_str;
use tasker_tests::{EnvOptions, Process, TestEnv, amqp_url, bin_dir, binary};
use tokio::process::Command;
use tokio::sync::watch;

const LONG: Duration = Duration::from_secs(60);
const REQUIREMENTS: &str = "deploy/examples/python_worker/requirements-test.txt";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace folder")
        .to_path_buf()
}

/// Whether to run the Python worker's tests: `false` (skip) only when
/// `TASKER_SKIP_PYTHON_WORKER=1` says so. Fails when `python3` or a package the worker or
/// its tests import is missing: a test that passes as skipped would hide a worker nobody
/// ran.
fn python_ready() -> bool {
    if std::env::var("TASKER_SKIP_PYTHON_WORKER").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: TASKER_SKIP_PYTHON_WORKER=1; the Python worker is not tested");
        return false;
    }
    let python = |args: &[&str]| {
        std::process::Command::new("python3")
            .args(args)
            .current_dir(repo_root())
            .output()
    };
    let install = format!(
        "install them with `python3 -m pip install -r {REQUIREMENTS}` (deploy/test.sh does), \
         or set TASKER_SKIP_PYTHON_WORKER=1 to skip the Python worker's tests"
    );
    match python(&["--version"]) {
        Ok(output) if output.status.success() => {}
        _ => panic!("python3 is not installed, and the Python example worker needs it: {install}"),
    }
    let imports =
        python(&["-c", "import pika, jsonschema, rfc3339_validator"]).expect("running python3");
    assert!(
        imports.status.success(),
        "python3 lacks a package the Python worker or its tests need: {install}\n{}",
        String::from_utf8_lossy(&imports.stderr)
    );
    true
}

/// An HTTP server whose every path `/<gate>` answers only once that gate is opened.
struct Gates {
    url: String,
    gates: Arc<HashMap<String, watch::Sender<bool>>>,
}

impl Gates {
    async fn start(names: &[&str]) -> Self {
        let gates: Arc<HashMap<String, watch::Sender<bool>>> = Arc::new(
            names
                .iter()
                .map(|name| (name.to_string(), watch::channel(false).0))
                .collect(),
        );
        async fn pass(
            State(gates): State<Arc<HashMap<String, watch::Sender<bool>>>>,
            UrlPath(name): UrlPath<String>,
        ) -> axum::Json<Value> {
            if let Some(gate) = gates.get(&name) {
                let _ = gate.subscribe().wait_for(|open| *open).await;
            }
            axum::Json(json!({"gate": name}))
        }
        let app = Router::new()
            .route("/{name}", get(pass))
            .with_state(gates.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Gates { url, gates }
    }

    fn open(&self, name: &str) {
        self.gates[name].send_replace(true);
    }
}

/// The worker ids in each step's history (started notices and results).
async fn workers_by_step(env: &TestEnv, task_id: &str) -> HashMap<String, BTreeSet<String>> {
    let rows: Vec<(String, Value)> = sqlx::query_as(
        "SELECT s.name, t.metadata FROM step_transitions t JOIN steps s USING (step_id)
         WHERE t.task_id = $1::uuid ORDER BY t.transition_id",
    )
    .bind(task_id)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let mut by_step: HashMap<String, BTreeSet<String>> = HashMap::new();
    for (step, metadata) in rows {
        if let Some(worker) = metadata["worker_id"].as_str() {
            by_step.entry(step).or_default().insert(worker.to_owned());
        }
    }
    by_step
}

/// Wait until the process's log file holds `needle` (for a process whose handle is busy
/// elsewhere, such as in `terminate`).
async fn wait_for_file(path: &Path, needle: &str) {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        if std::fs::read_to_string(path).is_ok_and(|log| log.contains(needle)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never logged {needle:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn relay(gates: &Gates) -> String {
    format!(
        r#"namespace: mixed
name: relay
description: Rust, then Python, then Rust again
defaults: {{timeout_ms: 60000, retry_limit: 1}}
steps:
  - {{name: a, handler: tasker.http, config: {{url: "{url}/a"}}}}
  - {{name: hold, handler: tasker.http, config: {{url: "{url}/hold"}}}}
  - {{name: b, handler: python.greet, depends_on: [a]}}
  - {{name: c, handler: python.sum, depends_on: [b], config: {{numbers: [1, 2, 3]}}}}
  - {{name: e, handler: python.sum, depends_on: [b, c], config: {{numbers: [0.5]}}}}
  - {{name: d, handler: tasker.echo, depends_on: [b, c, e, hold]}}
"#,
        url = gates.url
    )
}

const BROKEN: &str = r#"namespace: mixed
name: broken
defaults: {retry_limit: 1}
steps:
  - {name: nope, handler: python.nope}
  - {name: raises, handler: python.sum, config: {no_numbers: true}}
"#;

#[tokio::test]
async fn a_task_hops_between_rust_and_python_workers_on_one_queue() {
    if !python_ready() {
        return;
    }
    let mut env = TestEnv::start("python_worker").await.unwrap();
    // The env's own log folder (`TestEnv::start` names it after the test and prefix).
    let log_dir = bin_dir()
        .parent()
        .unwrap()
        .join("e2e-logs")
        .join(format!("python_worker-{}", &env.prefix[2..]));
    std::fs::create_dir_all(&log_dir).unwrap();
    let gates = Gates::start(&["a", "hold"]).await;
    let (status, body) = env.register_template(&relay(&gates)).await.unwrap();
    assert!(status.is_success(), "{body}");
    let (status, body) = env.register_template(BROKEN).await.unwrap();
    assert!(status.is_success(), "{body}");

    // 1. Only rust-1 consumes: it takes both roots, which wait at their gates.
    let mut command = Command::new(binary("tasker-worker"));
    command
        .env("AMQP_URL", amqp_url())
        .env("TASKER_AMQP_PREFIX", &env.prefix)
        .env("TASKER_NAMESPACES", "mixed")
        .env("TASKER_WORKER_ID", "rust-1")
        // `a` and `hold` call this test's HTTP stubs on loopback.
        .env("TASKER_HTTP_ALLOW", "127.0.0.1");
    let mut rust_1 = Process::spawn(command, "rust-1".into(), &log_dir).unwrap();
    let consuming = format!("\"queue\":\"{}\"", env.queue("mixed"));
    rust_1.wait_for_log(&consuming, LONG).await.unwrap();
    let (_, task) = env
        .create_task(json!({"namespace": "mixed", "name": "relay", "context": {"who": "tasker"}}))
        .await
        .unwrap();
    let id = task["task_id"].as_str().unwrap().to_owned();
    env.wait_until(&id, "a and hold running on rust-1", LONG, |task| {
        ["a", "hold"]
            .iter()
            .all(|step| TestEnv::step(task, step)["status"] == "in_progress")
    })
    .await
    .unwrap();

    // 2. rust-1 stops consuming (its running steps go on); the Python worker takes over.
    let rust_1_exit = tokio::spawn(async move { rust_1.terminate().await });
    wait_for_file(&log_dir.join("rust-1.log"), "stopping: no new steps").await;
    let mut command = Command::new("python3");
    command
        .arg("deploy/examples/python_worker/worker.py")
        .current_dir(repo_root())
        .env("AMQP_URL", amqp_url())
        .env("TASKER_AMQP_PREFIX", &env.prefix)
        .env("TASKER_NAMESPACES", "mixed")
        .env("TASKER_WORKER_ID", "py-worker");
    let mut python = Process::spawn(command, "py-worker".into(), &log_dir).unwrap();
    python
        .wait_for_log(&format!("consuming {}", env.queue("mixed")), LONG)
        .await
        .unwrap();
    gates.open("a");
    env.wait_until(&id, "the Python steps complete", LONG, |task| {
        ["b", "c", "e"]
            .iter()
            .all(|step| TestEnv::step(task, step)["status"] == "complete")
    })
    .await
    .unwrap();

    // The Python worker's failures: an unknown handler fails the step at once (and is
    // dead-lettered), a handler that raises is a retryable error (one attempt allowed).
    let broken = env
        .run_task(json!({"namespace": "mixed", "name": "broken"}), LONG)
        .await
        .unwrap();
    assert_eq!(broken["status"], "error", "{broken:#}");
    let nope = TestEnv::step(&broken, "nope");
    assert_eq!(nope["status"], "error", "{nope:#}");
    assert_eq!(nope["last_error"]["code"], "unknown_handler", "{nope:#}");
    assert_eq!(
        nope["last_error"]["message"],
        "unknown handler `python.nope`; this worker has: python.greet, python.sum"
    );
    let raises = TestEnv::step(&broken, "raises");
    assert_eq!(raises["status"], "error", "{raises:#}");
    assert_eq!(raises["last_error"]["kind"], "retryable", "{raises:#}");
    assert_eq!(raises["last_error"]["message"], "KeyError: 'numbers'");
    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let dead = channel
        .basic_get(
            format!("{}.dead_letter", env.prefix).into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the unknown handler's step is dead-lettered");
    let properties = &dead.delivery.properties;
    assert_eq!(
        header_str(properties, "x-tasker-reason").as_deref(),
        nope["last_error"]["message"].as_str()
    );
    assert_eq!(
        header_str(properties, "x-tasker-source-queue"),
        Some(env.queue("mixed"))
    );
    let dead_step: Value = serde_json::from_slice(&dead.delivery.data).unwrap();
    assert_eq!(dead_step["handler"], "python.nope");
    let _ = connection.close(200, "OK".into()).await;

    // 3. The Python worker stops; rust-2 starts; `hold` finishes, so `d` goes to rust-2.
    let status = python.terminate().await.unwrap();
    assert!(
        status.success(),
        "py-worker exited with {status}:\n{}",
        python.log()
    );
    python.wait_for_log("worker stopped", LONG).await.unwrap();
    env.start_worker_calling_stubs("rust-2", &["mixed"])
        .await
        .unwrap();
    gates.open("hold");
    let status = rust_1_exit.await.unwrap().unwrap();
    assert!(status.success(), "rust-1 exited with {status}");
    let task = env
        .wait_for_task(&id, &["complete", "error"], LONG)
        .await
        .unwrap();
    assert_eq!(task["status"], "complete", "{task:#}");

    // Exactly what the Python handlers compute, from their parents' results.
    let results = |step: &str| TestEnv::step(&task, step)["results"].clone();
    let greeting = json!({"greeting": "hello tasker", "parents": ["a"]});
    assert_eq!(results("b"), greeting);
    assert_eq!(
        results("c"),
        json!({"total": 6}),
        "1 + 2 + 3; b has no total"
    );
    assert_eq!(results("e"), json!({"total": 6.5}), "0.5 + c's total");
    // The Rust step after them read them as its parents.
    assert_eq!(
        results("d")["parents"],
        json!({
            "b": greeting,
            "c": {"total": 6},
            "e": {"total": 6.5},
            "hold": {"status": 200, "body": {"gate": "hold"}},
        })
    );

    let workers = workers_by_step(&env, &id).await;
    let ran = |step: &str| workers.get(step).cloned().unwrap_or_default();
    for (step, worker) in [
        ("a", "rust-1"),
        ("hold", "rust-1"),
        ("b", "py-worker"),
        ("c", "py-worker"),
        ("e", "py-worker"),
        ("d", "rust-2"),
    ] {
        assert_eq!(
            ran(step),
            BTreeSet::from([worker.to_owned()]),
            "the workers in step {step}'s history"
        );
    }
    env.finish().await.unwrap();
}

/// The worker's own unit tests: every message it publishes is valid against
/// `docs/schemas/` (with format assertion) and has no property the schemas do not list,
/// and every poison message and unsendable result is answered without a crash.
#[test]
fn the_python_worker_unit_tests_pass() {
    if !python_ready() {
        return;
    }
    let output = std::process::Command::new("python3")
        .args([
            "-m",
            "unittest",
            "discover",
            "-v",
            "-s",
            "deploy/examples/python_worker",
        ])
        .current_dir(repo_root())
        .output()
        .expect("running python3");
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "test_worker.py failed:\n{report}");
    assert!(
        report.contains("\nOK") && !report.contains("Ran 0 tests"),
        "test_worker.py ran nothing:\n{report}"
    );
}

const KEY: &str = "the-message-key-of-the-python-worker-test-01";
const NAMESPACE: &str = "pysigned";
/// Bytes a result may take in the signed test (`TASKER_MAX_RESULT_BYTES`).
const MAX_RESULT_BYTES: usize = 1000;

/// The example worker, with three more handlers whose answers cannot travel. They are
/// the test's, so the example's `HANDLERS` stays what the README documents.
const WITH_BAD_HANDLERS: &str = r#"
import sys
sys.path.insert(0, "deploy/examples/python_worker")
import worker
worker.main({
    **worker.HANDLERS,
    "test.nan": lambda step: {"ratio": float("nan")},
    "test.set": lambda step: {"ids": {1, 2}},
    "test.huge": lambda step: "x" * 5000,
})
"#;

const SIGNED: &str = r#"namespace: pysigned
name: signed
defaults: {retry_limit: 1}
steps:
  - {name: hi, handler: python.greet}
  - {name: add, handler: python.sum, depends_on: [hi], config: {numbers: [2, 3]}}
"#;

const UNSENDABLE: &str = r#"namespace: pysigned
name: unsendable
defaults: {retry_limit: 2}
steps:
  - {name: nan, handler: test.nan}
  - {name: set, handler: test.set}
  - {name: huge, handler: test.huge}
"#;

/// Take `count` dead letters from the env's dead-letter queue: (body, reason, source).
async fn dead_letters(
    channel: &lapin::Channel,
    env: &TestEnv,
    count: usize,
) -> Vec<(Vec<u8>, String, String)> {
    let queue = format!("{}.dead_letter", env.prefix);
    tasker_tests::take_messages(channel, &queue, count, LONG)
        .await
        .into_iter()
        .map(|delivery| {
            let properties = &delivery.properties;
            (
                delivery.data.clone(),
                header_str(properties, "x-tasker-reason")
                    .expect("every dead letter has an x-tasker-reason header"),
                header_str(properties, "x-tasker-source-queue")
                    .expect("every dead letter has an x-tasker-source-queue header"),
            )
        })
        .collect()
}

/// Publish `body` with a publisher confirm, signed with [`KEY`] when `signed`.
async fn publish_step(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    signed: bool,
) {
    let keys = tasker_shared::signing::MessageKeys::new(Some(KEY), None).unwrap();
    let mut properties = tasker_shared::broker::persistent();
    if signed {
        properties = properties.with_headers(keys.sign(body, Default::default()));
    }
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "the broker refused a test message");
}

#[tokio::test]
async fn a_signed_python_worker_completes_tasks_and_fails_unsendable_results_cleanly() {
    if !python_ready() {
        return;
    }
    let env = TestEnv::start_with(
        "python_worker_signed",
        EnvOptions {
            coordinator_env: vec![("TASKER_MESSAGE_KEY".into(), KEY.into())],
            ..EnvOptions::default()
        },
    )
    .await
    .unwrap();
    for template in [SIGNED, UNSENDABLE] {
        let (status, body) = env.register_template(template).await.unwrap();
        assert!(status.is_success(), "{body}");
    }
    let log_dir = bin_dir()
        .parent()
        .unwrap()
        .join("e2e-logs")
        .join(format!("python_worker_signed-{}", &env.prefix[2..]));
    std::fs::create_dir_all(&log_dir).unwrap();
    let mut command = Command::new("python3");
    command
        .args(["-c", WITH_BAD_HANDLERS])
        .current_dir(repo_root())
        .env("AMQP_URL", amqp_url())
        .env("TASKER_AMQP_PREFIX", &env.prefix)
        .env("TASKER_NAMESPACES", NAMESPACE)
        .env("TASKER_WORKER_ID", "py-signed")
        .env("TASKER_MESSAGE_KEY", KEY)
        .env("TASKER_MAX_RESULT_BYTES", MAX_RESULT_BYTES.to_string());
    let mut python = Process::spawn(command, "py-signed".into(), &log_dir).unwrap();
    python
        .wait_for_log("messages signed and checked", LONG)
        .await
        .unwrap();
    python
        .wait_for_log(&format!("consuming {}", env.queue(NAMESPACE)), LONG)
        .await
        .unwrap();

    // Poison first: none of it may stop the worker, which must then run real tasks.
    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let step = |schema_version: Value| {
        json!({
            "schema_version": schema_version,
            "task_id": uuid::Uuid::new_v4(), "step_id": uuid::Uuid::new_v4(),
            "step_name": "x", "namespace": NAMESPACE, "template": "signed@1", "handler": "python.greet",
            "config": {}, "context": {}, "parents": {}, "attempt": 1, "retry_limit": 1,
            "deferrals": 0, "dispatch_token": uuid::Uuid::new_v4(), "timeout_ms": 1000,
            "dispatched_at": "2026-12-04T10:00:00Z"
        })
        .to_string()
        .into_bytes()
    };
    let queue = env.queue(NAMESPACE);
    let steps_exchange = format!("{}.steps", env.prefix);
    // Through the steps exchange (routing key: the namespace) and through the default
    // exchange (routing key: the queue's name): the source is the queue either way.
    let poison: [(&str, &str, Vec<u8>, bool, &str); 4] = [
        (
            &steps_exchange,
            NAMESPACE,
            step(json!(1)),
            false,
            "bad_signature: the message is not signed",
        ),
        (
            "",
            &queue,
            step(json!(true)),
            true,
            "undecodable message: `schema_version` must be an integer",
        ),
        (
            "",
            &queue,
            step(json!(1.0)),
            true,
            "undecodable message: `schema_version` must be an integer",
        ),
        (
            &steps_exchange,
            NAMESPACE,
            b"{\"ratio\": NaN}".to_vec(),
            true,
            "undecodable message:",
        ),
    ];
    for (exchange, routing_key, body, signed, _) in &poison {
        publish_step(&channel, exchange, routing_key, body, *signed).await;
    }
    let letters = dead_letters(&channel, &env, poison.len()).await;
    for (_, _, body, _, reason) in &poison {
        let (_, got, source) = letters
            .iter()
            .find(|(letter, ..)| letter == body)
            .unwrap_or_else(|| {
                panic!(
                    "{} was not dead-lettered: {letters:?}",
                    String::from_utf8_lossy(body)
                )
            });
        assert!(
            got.starts_with(reason),
            "{got:?} should start with {reason:?}"
        );
        assert_eq!(source, &queue, "the source queue of {got:?}");
    }
    assert!(
        python.running(),
        "the poison stopped py-signed:\n{}",
        python.log()
    );

    // Signed both ways: the coordinator applies only results signed with its key.
    let task = env
        .run_task(
            json!({"namespace": NAMESPACE, "name": "signed", "context": {"who": "keys"}}),
            LONG,
        )
        .await
        .unwrap();
    assert_eq!(task["status"], "complete", "{task:#}");
    assert_eq!(
        TestEnv::step(&task, "hi")["results"],
        json!({"greeting": "hello keys", "parents": []})
    );
    assert_eq!(TestEnv::step(&task, "add")["results"], json!({"total": 5}));
    let workers = workers_by_step(&env, task["task_id"].as_str().unwrap()).await;
    assert_eq!(workers["add"], BTreeSet::from(["py-signed".to_owned()]));

    // Answers that cannot travel fail their steps at once (no retry: the same code would
    // return the same thing), with a message saying why.
    let task = env
        .run_task(json!({"namespace": NAMESPACE, "name": "unsendable"}), LONG)
        .await
        .unwrap();
    assert_eq!(task["status"], "error", "{task:#}");
    for (name, code, says) in [
        (
            "nan",
            "result_not_json",
            "Out of range float values are not JSON compliant",
        ),
        (
            "set",
            "result_not_json",
            "Object of type set is not JSON serializable",
        ),
        (
            "huge",
            "result_too_large",
            "the handler's result is 5002 bytes of JSON, over this worker's limit of 1000 bytes",
        ),
    ] {
        let step = TestEnv::step(&task, name);
        assert_eq!(step["status"], "error", "{step:#}");
        assert_eq!(step["attempts"], 1, "{step:#}");
        assert_eq!(step["last_error"]["kind"], "permanent", "{step:#}");
        assert_eq!(step["last_error"]["code"], code, "{step:#}");
        let message = step["last_error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{name}: {message}");
    }

    // Nothing the worker sent was refused: an unsigned or wrongly signed notice or result
    // would be dead-lettered by the coordinator (`bad_signature`).
    let late = channel
        .basic_get(
            format!("{}.dead_letter", env.prefix).into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap();
    assert!(
        late.is_none(),
        "the coordinator dead-lettered a message of py-signed: {:?}",
        late.map(|m| header_str(&m.delivery.properties, "x-tasker-reason"))
    );
    let _ = connection.close(200, "OK".into()).await;

    let status = python.terminate().await.unwrap();
    assert!(
        status.success(),
        "py-signed exited with {status}:\n{}",
        python.log()
    );
    env.finish().await.unwrap();
}
