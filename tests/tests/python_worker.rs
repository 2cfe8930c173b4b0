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
//! The test is skipped (passes with a message) when `python3` is not installed. When the
//! `pika` package is missing it installs `requirements.txt` with pip.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::routing::get;
use serde_json::{Value, json};
use tasker_shared::broker::header_str;
use tasker_tests::{Process, TestEnv, amqp_url, bin_dir, binary};
use tokio::process::Command;
use tokio::sync::watch;

const LONG: Duration = Duration::from_secs(60);
const REQUIREMENTS: &str = "deploy/examples/python_worker/requirements.txt";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace folder")
        .to_path_buf()
}

/// Whether `python3` can run the worker: `None` to skip (no python3), after installing
/// the requirements when `pika` is missing.
fn python_ready() -> Option<()> {
    let python = |args: &[&str]| {
        std::process::Command::new("python3")
            .args(args)
            .current_dir(repo_root())
            .output()
    };
    match python(&["--version"]) {
        Ok(output) if output.status.success() => {}
        _ => return None,
    }
    if !python(&["-c", "import pika"]).is_ok_and(|o| o.status.success()) {
        let install =
            python(&["-m", "pip", "install", "-r", REQUIREMENTS, "--quiet"]).expect("running pip");
        assert!(
            install.status.success(),
            "pip install -r {REQUIREMENTS} failed:\n{}",
            String::from_utf8_lossy(&install.stderr)
        );
    }
    Some(())
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
    if python_ready().is_none() {
        eprintln!("SKIPPED: python3 is not installed; the Python worker cannot be tested");
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
