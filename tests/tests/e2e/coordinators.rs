//! Coordinators sharing one database: a result whose step another transaction holds
//! (another coordinator applying it) waits for a later batch, and the results behind it
//! are applied meanwhile.

use std::time::Duration;

use serde_json::json;
use tasker_shared::broker::Topology;
use tasker_tests::{EnvOptions, StepStatus, TaskStatus, TestEnv};

const SLOW: &str = "namespace: held\nname: slow\nsteps:\n  - name: one\n    handler: tasker.sleep\n    config: {ms: 3000}\n";
const QUICK: &str = "namespace: held\nname: quick\nsteps:\n  - name: one\n    handler: tasker.noop\n  - name: two\n    handler: tasker.noop\n    depends_on: [one]\n";

#[tokio::test]
async fn a_result_for_a_held_step_waits_and_does_not_block_the_others() {
    let mut env = TestEnv::start("held-result").await.unwrap();
    env.register_template(SLOW).await.unwrap();
    env.register_template(QUICK).await.unwrap();
    env.start_worker("held-1", &["held"]).await.unwrap();
    let metrics = env.metrics_url();
    let held = "tasker_result_messages_held_total";

    let slow = env
        .api
        .create_task(&json!({"namespace": "held", "name": "slow", "context": {}}))
        .await
        .unwrap();
    let running = env
        .api
        .wait_until(
            slow.task_id,
            "step one running",
            Duration::from_secs(30),
            |task| task.step("one").status == StepStatus::InProgress,
        )
        .await
        .unwrap();
    let step_id = running.step("one").step_id;

    // Hold the step's row, as another coordinator applying a batch with it would, from
    // before its result arrives until after the result has been turned away.
    let mut holder = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM steps WHERE step_id = $1 FOR UPDATE")
        .bind(step_id)
        .execute(&mut *holder)
        .await
        .unwrap();
    tasker_tests::wait_for_metric(&metrics, held, 1.0).await;

    // Results behind the held one are applied while it waits: a whole task runs.
    let quick = env
        .api
        .run_task(
            &json!({"namespace": "held", "name": "quick", "context": {}}),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(quick.status, TaskStatus::Complete);
    let still = env.api.task(slow.task_id).await.unwrap();
    assert_eq!(
        still.step("one").status,
        StepStatus::InProgress,
        "the held result is not applied while its row is held"
    );

    // Once the row is free, the held result is applied, once.
    holder.rollback().await.unwrap();
    let slow = env
        .api
        .wait_for_task(
            slow.task_id,
            &[TaskStatus::Complete, TaskStatus::Error],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(slow.status, TaskStatus::Complete);
    let succeeded = crate::step_history(&env.pool, slow.task_id)
        .await
        .into_iter()
        .filter(|(_, _, _, reason, _)| reason == "succeeded")
        .count();
    assert_eq!(succeeded, 1);
    env.finish().await.unwrap();
}

const LONG: &str = "namespace: held\nname: long\nsteps:\n  - name: one\n    handler: tasker.sleep\n    config: {ms: 12000}\n";

/// `LONG` registered, a heartbeat lease of 3 s, sweeps every `sweep_ms`, and a worker
/// that beats every `beat_ms`.
async fn long_steps_beating(test: &str, sweep_ms: &str, beat_ms: &str) -> TestEnv {
    let options = EnvOptions {
        coordinator_env: vec![
            ("TASKER_HEARTBEAT_LEASE_MS".into(), "3000".into()),
            ("TASKER_SWEEP_INTERVAL_MS".into(), sweep_ms.into()),
        ],
        ..Default::default()
    };
    let mut env = TestEnv::start_with(test, options).await.unwrap();
    env.register_template(LONG).await.unwrap();
    env.start_worker_with(
        tasker_tests::binary("tasker-worker"),
        "beating",
        &["held"],
        4,
        &[("TASKER_HEARTBEAT_INTERVAL_MS", beat_ms)],
    )
    .await
    .unwrap();
    env
}

/// A new `long` task once its step runs: the task and the step.
async fn long_step_running(env: &TestEnv) -> (uuid::Uuid, uuid::Uuid) {
    let task_id = env
        .api
        .create_task(&json!({"namespace": "held", "name": "long", "context": {}}))
        .await
        .unwrap()
        .task_id;
    let task = env
        .api
        .wait_until(task_id, "step one running", Duration::from_secs(30), |t| {
            t.step("one").status == StepStatus::InProgress
        })
        .await
        .unwrap();
    (task_id, task.step("one").step_id)
}

/// `task_id` once it ended: it completed.
async fn completes(env: &TestEnv, task_id: uuid::Uuid) -> tasker_tests::Task {
    let task = env
        .api
        .wait_for_task(
            task_id,
            &[TaskStatus::Complete, TaskStatus::Error],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(task.status, TaskStatus::Complete, "{task:#?}");
    task
}

/// No step of `task_id` was taken for lost (`lease_expired`).
async fn never_taken_for_lost(env: &TestEnv, task_id: uuid::Uuid) {
    let reasons: Vec<String> = crate::step_history(&env.pool, task_id)
        .await
        .into_iter()
        .map(|(_, _, _, reason, _)| reason)
        .collect();
    assert!(
        !reasons.iter().any(|r| r == "lease_expired"),
        "the running step was taken for lost: {reasons:?}"
    );
}

/// A worker's heartbeat names all its running steps. One of them held by another
/// transaction for longer than a lease (an operator's open transaction, a stalled
/// coordinator) must not keep the others' leases from being extended: the sweeper would
/// take them for lost and run them again.
#[tokio::test]
async fn a_held_step_does_not_hold_back_the_heartbeats_of_the_others() {
    let env = long_steps_beating("held-heartbeat", "300", "250").await;

    let (held, held_step) = long_step_running(&env).await;
    let (other, _) = long_step_running(&env).await;

    // Hold the first step's row for twice the lease; the worker goes on beating for both.
    let mut holder = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM steps WHERE step_id = $1 FOR UPDATE")
        .bind(held_step)
        .execute(&mut *holder)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = env.api.task(other).await.unwrap();
    holder.rollback().await.unwrap();
    assert_eq!(
        during.step("one").status,
        StepStatus::InProgress,
        "the other step's lease was extended while the first was held: {during:#?}"
    );

    for task_id in [held, other] {
        completes(&env, task_id).await;
    }
    never_taken_for_lost(&env, other).await;
    env.finish().await.unwrap();
}

/// A running step whose heartbeats could not be applied for longer than a lease (they
/// wait behind results, or its row was busy) is not taken for lost while its worker is
/// heard from on the control exchange.
#[tokio::test]
async fn late_heartbeats_of_a_worker_heard_from_do_not_expire_its_step() {
    let env = long_steps_beating("late-heartbeats", "50", "1000").await;
    let (task_id, step) = long_step_running(&env).await;

    // No heartbeat of it is applied for longer than the lease.
    let mut holder = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM steps WHERE step_id = $1 FOR UPDATE")
        .bind(step)
        .execute(&mut *holder)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    holder.rollback().await.unwrap();

    let done = completes(&env, task_id).await;
    never_taken_for_lost(&env, task_id).await;
    assert_eq!(done.step("one").attempts, 1, "{done:#?}");
    env.finish().await.unwrap();
}

fn versioned(version: &str) -> String {
    format!(
        "namespace: versions\nname: flow\nversion: {version}\nsteps:\n  - name: one\n    handler: tasker.noop\n"
    )
}

/// Creates that name no version get the newest, even when that version was registered
/// through another coordinator after this one had already resolved the name.
#[tokio::test]
async fn a_version_registered_on_another_coordinator_is_the_newest_at_once() {
    let env = TestEnv::start("newest-version").await.unwrap();
    let mut other = env
        .start_coordinator_in_process("coordinator-b", &[])
        .await
        .unwrap();
    let other_url = other.base_url();
    let http = reqwest::Client::new();
    let register_on_other = |version: &str| {
        http.post(format!("{other_url}/v1/templates"))
            .header("content-type", "application/yaml")
            .body(versioned(version))
            .send()
    };
    let create = |body: serde_json::Value| {
        let env = &env;
        async move {
            let (status, task) = env.create_task(body).await.unwrap();
            assert_eq!(status, 201, "{task}");
            task["version"].as_str().unwrap().to_owned()
        }
    };
    let newest = || create(json!({"namespace": "versions", "name": "flow"}));

    let (status, _) = env.register_template(&versioned("1.0.0")).await.unwrap();
    assert_eq!(status, 201);
    assert_eq!(newest().await, "1.0.0");

    let response = register_on_other("1.1.0").await.unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(
        newest().await,
        "1.1.0",
        "the newer version, registered elsewhere"
    );
    assert_eq!(newest().await, "1.1.0");

    // An older version registered later changes the count, not the newest.
    let response = register_on_other("0.9.0").await.unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(newest().await, "1.1.0");
    assert_eq!(
        create(json!({"namespace": "versions", "name": "flow", "version": "1.0.0"})).await,
        "1.0.0"
    );

    // Every create above made exactly one task.
    assert_eq!(crate::task_count(&env.pool).await, 5);
    other.stop().await.unwrap();
    env.finish().await.unwrap();
}

/// `TASKER_RESULT_CONSUMERS` consumers share the results queue. With a prefetch of two
/// each (`TASKER_BATCH_SIZE=1`), a burst of results overflows the first to the others,
/// whose batches then lock the same tasks' steps: every task still completes, and
/// every step succeeds once.
#[tokio::test]
async fn results_are_applied_by_as_many_consumers_as_configured() {
    let options = EnvOptions {
        coordinator_env: vec![
            ("TASKER_RESULT_CONSUMERS".into(), "3".into()),
            ("TASKER_BATCH_SIZE".into(), "1".into()),
        ],
        ..EnvOptions::default()
    };
    let mut env = TestEnv::start_with("result-consumers", options)
        .await
        .unwrap();
    let topology = Topology::new(env.prefix.clone());
    let consumers = tasker_tests::broker::queue_consumers(&topology.results_queue())
        .await
        .unwrap();
    assert_eq!(consumers, 3);

    env.register_template(QUICK).await.unwrap();
    env.start_worker("consumers-1", &["held"]).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..40 {
        let task = env
            .api
            .create_task(&json!({"namespace": "held", "name": "quick", "context": {}}))
            .await
            .unwrap();
        ids.push(task.task_id);
    }
    for id in ids {
        let task = env
            .api
            .wait_for_task(
                id,
                &[TaskStatus::Complete, TaskStatus::Error],
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(task.status, TaskStatus::Complete, "{task:#?}");
    }
    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM step_transitions WHERE reason = 'succeeded'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(succeeded, 80, "each of the 80 steps succeeded once");
    env.finish().await.unwrap();
}

const SIGNALLED: &str = "namespace: held\nname: signalled\nsteps:\n  - {name: hold, handler: tasker.wait, config: {signal: go}}\n  - {name: after, handler: tasker.noop, depends_on: [hold]}\n";

/// A `signalled` task waiting for its signal, and a request signalling it that waits
/// for the task's row, held by the returned transaction (its answer: the handle).
async fn signal_held_up(
    env: &TestEnv,
) -> (
    uuid::Uuid,
    sqlx::Transaction<'static, sqlx::Postgres>,
    tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
) {
    let (status, body) = env.register_template(SIGNALLED).await.unwrap();
    assert_eq!(status, 201, "{body}");
    let task = env
        .api
        .create_task(&json!({"namespace": "held", "name": "signalled"}))
        .await
        .unwrap()
        .task_id;
    crate::until_reason(env, task, "hold", "waiting_for_signal").await;
    let mut holder = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM tasks WHERE task_id = $1 FOR UPDATE")
        .bind(task)
        .execute(&mut *holder)
        .await
        .unwrap();
    let signal = {
        let http = env.http.clone();
        let url = format!("{}/v1/tasks/{task}/signals/go", env.base_url);
        tokio::spawn(async move { http.post(url).json(&json!({})).send().await })
    };
    tasker_tests::wait_for_lock_waiters(&env.pool, "FOR UPDATE", 1).await;
    (task, holder, signal)
}

#[tokio::test]
async fn a_coordinator_stopping_publishes_what_its_last_requests_claimed() {
    let mut env = TestEnv::start("stop-publishes").await.unwrap();
    // A signal whose request is still being answered when the coordinator is asked to
    // stop.
    let (task, holder, signal) = signal_held_up(&env).await;
    // The coordinator is asked to stop (its broker loops stop first), then the signal
    // goes on.
    let go_on = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        holder.commit().await.unwrap();
        signal.await.unwrap().unwrap()
    };
    let (stopped, answer) = tokio::join!(env.coordinator.stop(), go_on);
    stopped.unwrap();
    assert_eq!(answer.status(), 200);

    // `after`, which the signal made ready and claimed, went out: its message waits in
    // the queue, its dispatch lease lifted.
    let (status, lease_ended): (String, bool) = sqlx::query_as(
        "SELECT status, lease_expires_at IS NOT NULL FROM steps \
         WHERE task_id = $1 AND name = 'after'",
    )
    .bind(task)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), lease_ended), ("enqueued", false));
    assert_eq!(
        tasker_tests::broker::queue_messages(&env.queue("held"))
            .await
            .unwrap(),
        1
    );
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_second_sigterm_stops_a_draining_coordinator_at_once() {
    let options = EnvOptions {
        binary_coordinator: true,
        ..EnvOptions::default()
    };
    let mut env = TestEnv::start_with("second-sigterm", options)
        .await
        .unwrap();
    // A request the first SIGTERM waits for (up to its 10 s drain).
    let (_, holder, _signal) = signal_held_up(&env).await;
    let process = env.coordinator.process();
    let pid = process.pid().unwrap().to_string();
    let sigterm = || {
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
    };
    sigterm();
    // Past the second in which another signal is the same stop delivered twice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(process.running(), "the first SIGTERM drains");
    let second = std::time::Instant::now();
    sigterm();
    let deadline = second + Duration::from_secs(5);
    while process.running() {
        assert!(
            std::time::Instant::now() < deadline,
            "still running 5 s after the second SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    holder.rollback().await.unwrap();
    env.finish().await.unwrap();
}
