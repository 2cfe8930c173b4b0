//! Failure semantics: retries and their limits, backoff, deferrals, timeouts, panics,
//! lost workers, and the fence against duplicated results.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tasker_tests::http_stub::{Answer, HttpStub};
use tasker_tests::{StatusCode, StepStatus, Task, TaskStatus, TestEnv, binary};
use uuid::Uuid;

use crate::step_history;

/// A one-step template in namespace `failing`.
fn one_step(name: &str, step: &str) -> String {
    format!("namespace: failing\nname: {name}\nsteps:\n  - name: only\n{step}")
}

/// Create a task of the one-step template `name` and wait until its step runs.
async fn running(env: &TestEnv, name: &str) -> Uuid {
    let task = env
        .api
        .create_task(&json!({"namespace": "failing", "name": name}))
        .await
        .unwrap();
    env.api
        .wait_until(
            task.task_id,
            "the step runs on the doomed worker",
            Duration::from_secs(20),
            |t| t.step("only").status == StepStatus::InProgress,
        )
        .await
        .unwrap();
    task.task_id
}

/// Create a task of the one-step template `name` and wait until it is finished.
async fn run(env: &TestEnv, name: &str) -> Task {
    env.api
        .run_task(
            &json!({"namespace": "failing", "name": name}),
            Duration::from_secs(60),
        )
        .await
        .unwrap()
}

/// Milliseconds between each failure being recorded and the next dispatch.
async fn retry_gaps(env: &TestEnv, task_id: Uuid) -> Vec<i64> {
    let history: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT reason, created_at FROM step_transitions WHERE task_id = $1 ORDER BY transition_id",
    )
    .bind(task_id)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let mut gaps = Vec::new();
    let mut failed_at = None;
    for (reason, at) in history {
        match reason.as_str() {
            "retry_scheduled" | "deferred" => failed_at = Some(at),
            "dispatched" => {
                if let Some(failed) = failed_at.take() {
                    gaps.push((at - failed).num_milliseconds());
                }
            }
            _ => {}
        }
    }
    gaps
}

#[tokio::test]
async fn retries_stop_at_the_limit_and_permanent_errors_stop_at_once() {
    let mut env = TestEnv::start("retries").await.unwrap();
    env.start_worker("w1", &["failing"]).await.unwrap();
    let fast = "    backoff: {base_seconds: 0.05, jitter: false}\n";
    let cases = [
        (
            "recovers",
            format!(
                "    handler: tasker.fail\n    retry_limit: 3\n    config: {{times: 2}}\n{fast}"
            ),
            TaskStatus::Complete,
            3,
        ),
        (
            "exhausts",
            format!(
                "    handler: tasker.fail\n    retry_limit: 3\n    config: {{times: 5}}\n{fast}"
            ),
            TaskStatus::Error,
            3,
        ),
        (
            "permanent",
            format!(
                "    handler: tasker.fail\n    retry_limit: 3\n    config: {{times: 5, kind: permanent}}\n{fast}"
            ),
            TaskStatus::Error,
            1,
        ),
        (
            "not_retryable",
            format!(
                "    handler: tasker.fail\n    retryable: false\n    config: {{times: 5}}\n{fast}"
            ),
            TaskStatus::Error,
            1,
        ),
        (
            "panics",
            format!(
                "    handler: tasker.fail\n    retry_limit: 2\n    config: {{times: 1, kind: panic}}\n{fast}"
            ),
            TaskStatus::Complete,
            2,
        ),
    ];
    for (name, step, status, attempts) in &cases {
        let (code, body) = env.register_template(&one_step(name, step)).await.unwrap();
        assert_eq!(code, StatusCode::CREATED, "{body}");
        let task = run(&env, name).await;
        assert_eq!(task.status, *status, "{name}: {task:#?}");
        let only = task.step("only");
        assert_eq!(only.attempts, *attempts, "{name}: {only:#?}");
        let dispatches = step_history(&env.pool, task.task_id)
            .await
            .iter()
            .filter(|h| h.3 == "dispatched")
            .count();
        assert_eq!(
            dispatches, *attempts as usize,
            "{name} ran {dispatches} times"
        );
        if *status == TaskStatus::Error {
            assert_eq!(only.status, StepStatus::Error);
            let error = only.last_error.as_ref().expect("a last error");
            assert!(error.message.contains("tasker.fail"), "{only:#?}");
            let execution = task.execution.as_ref().expect("an execution context");
            assert_eq!(execution["execution_status"], "blocked_by_failures");
            assert_eq!(execution["health"], "blocked");
        }
    }
    let exhausted = run(&env, "exhausts").await;
    let reasons: Vec<String> = step_history(&env.pool, exhausted.task_id)
        .await
        .into_iter()
        .map(|h| h.3)
        .filter(|r| r != "started")
        .collect();
    assert_eq!(
        reasons,
        [
            "dispatched",
            "retry_scheduled",
            "dispatched",
            "retry_scheduled",
            "dispatched",
            "attempts_exhausted"
        ]
    );
    let panicked = run(&env, "panics").await;
    let error_codes: Vec<Value> = step_history(&env.pool, panicked.task_id)
        .await
        .into_iter()
        .filter(|h| h.3 == "retry_scheduled")
        .map(|h| h.4["error_code"].clone())
        .collect();
    assert_eq!(
        error_codes,
        [json!("panic")],
        "a panic is a retryable failure"
    );
    assert!(
        env.workers[0].log().contains("handler panicked"),
        "the worker survived and said why"
    );
    env.finish().await.unwrap();
}

#[tokio::test]
async fn backoff_follows_the_configured_policy() {
    let mut env = TestEnv::start("backoff").await.unwrap();
    env.start_worker("w1", &["failing"]).await.unwrap();
    env.register_template(&one_step(
        "exponential",
        "    handler: tasker.fail\n    retry_limit: 4\n    config: {times: 3}\n    backoff: {base_seconds: 0.2, max_seconds: 0.5, jitter: false}\n",
    ))
    .await
    .unwrap();
    env.register_template(&one_step(
        "scheduled",
        "    handler: tasker.fail\n    retry_limit: 4\n    config: {times: 3}\n    backoff: {schedule: [0.5, 0.1]}\n",
    ))
    .await
    .unwrap();

    // Tolerance: never early; at most 250 ms late (the dispatcher sleeps until the due time).
    let check = |gaps: &[i64], expected: &[i64]| {
        assert_eq!(gaps.len(), expected.len(), "{gaps:?}");
        for (gap, want) in gaps.iter().zip(expected) {
            assert!(
                *gap >= want - 5 && *gap <= want + 250,
                "gap {gap} ms, expected {want} ms: {gaps:?}"
            );
        }
    };
    let task = run(&env, "exponential").await;
    assert_eq!(task.status, TaskStatus::Complete);
    check(&retry_gaps(&env, task.task_id).await, &[200, 400, 500]);
    let task = run(&env, "scheduled").await;
    assert_eq!(task.status, TaskStatus::Complete);
    check(&retry_gaps(&env, task.task_id).await, &[500, 100, 100]);
    env.finish().await.unwrap();
}

#[tokio::test]
async fn retry_after_from_an_http_429_delays_the_next_attempt_by_that_long() {
    let mut env = TestEnv::start("retry-after").await.unwrap();
    env.start_worker_calling_stubs("w1", &["failing"])
        .await
        .unwrap();
    let stub = HttpStub::start(vec![
        Answer::new(429, "slow down").header("retry-after", "2"),
        Answer::new(200, r#"{"ok": true}"#),
    ])
    .await
    .unwrap();
    env.register_template(&one_step(
        "http",
        &format!("    handler: tasker.http\n    config: {{url: \"{}\", method: POST, body: {{n: 1}}}}\n    backoff: {{base_seconds: 0.1, max_seconds: 10}}\n", stub.url),
    ))
    .await
    .unwrap();
    let task = run(&env, "http").await;
    assert_eq!(task.status, TaskStatus::Complete, "{task:#?}");
    let only = task.step("only");
    assert_eq!(only.attempts, 2);
    assert_eq!(
        only.results,
        Some(json!({"status": 200, "body": {"ok": true}}))
    );
    let arrivals = stub.arrivals();
    assert_eq!(arrivals.len(), 2);
    let gap = arrivals[1] - arrivals[0];
    assert!(
        gap >= Duration::from_secs(2),
        "next attempt after {gap:?}, not the 2 s asked"
    );
    assert!(
        gap < Duration::from_millis(2600),
        "next attempt after {gap:?}"
    );
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_deferral_spends_no_attempt_and_the_deferral_limit_ends_in_error() {
    let mut env = TestEnv::start("deferral").await.unwrap();
    env.start_worker("w1", &["failing"]).await.unwrap();
    env.register_template(&one_step(
        "patient",
        "    handler: tasker.fail\n    retry_limit: 1\n    config: {kind: defer, times: 3, retry_after_seconds: 0.1}\n",
    ))
    .await
    .unwrap();
    env.register_template(&one_step(
        "impatient",
        "    handler: tasker.fail\n    max_deferrals: 2\n    config: {kind: defer, times: 10, retry_after_seconds: 0.1}\n",
    ))
    .await
    .unwrap();

    // Deferred three times with a retry limit of one: still completes on attempt 1.
    let task = run(&env, "patient").await;
    assert_eq!(task.status, TaskStatus::Complete, "{task:#?}");
    let only = task.step("only");
    assert_eq!(only.attempts, 1);
    assert_eq!(only.deferrals, 3);
    assert_eq!(only.results, Some(json!({"attempt": 1, "deferrals": 3})));
    let gaps = retry_gaps(&env, task.task_id).await;
    assert!(gaps.len() == 3 && gaps.iter().all(|g| *g >= 95), "{gaps:?}");

    let task = run(&env, "impatient").await;
    assert_eq!(task.status, TaskStatus::Error, "{task:#?}");
    let only = task.step("only");
    let error = only.last_error.as_ref().expect("a last error");
    assert_eq!(error.code.as_deref(), Some("deferral_limit"));
    assert!(error.message.contains("deferred 2 times"), "{only:#?}");
    assert_eq!(only.attempts, 0, "deferrals are not attempts");
    let (_, readiness) = env
        .get(&format!("/v1/tasks/{}/readiness", task.task_id))
        .await
        .unwrap();
    assert_eq!(readiness["steps"][0]["reason"], "deferrals_exhausted");
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_step_past_its_timeout_is_cancelled_and_retried() {
    let mut env = TestEnv::start("timeout").await.unwrap();
    env.start_worker("w1", &["failing"]).await.unwrap();
    env.register_template(&one_step(
        "slow",
        "    handler: tasker.sleep\n    timeout_ms: 200\n    retry_limit: 2\n    config: {ms: 5000}\n    backoff: {base_seconds: 0.05}\n",
    ))
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let task = run(&env, "slow").await;
    // About 0.5 s of timeouts and backoff. A retry that falls due just after the
    // dispatcher looked waited for its 5 s safety poll instead (seen in CI).
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the retry waited for the dispatcher's poll: {:?}",
        started.elapsed()
    );
    assert_eq!(task.status, TaskStatus::Error);
    let only = task.step("only");
    assert_eq!(only.attempts, 2);
    assert_eq!(
        only.last_error.as_ref().map(|e| e.kind.as_str()),
        Some("timeout")
    );
    let outcomes: Vec<Value> = step_history(&env.pool, task.task_id)
        .await
        .into_iter()
        .filter(|h| h.3 == "retry_scheduled" || h.3 == "attempts_exhausted")
        .map(|h| h.4)
        .collect();
    let codes: Vec<&Value> = outcomes.iter().map(|o| &o["error_code"]).collect();
    assert_eq!(codes, [&json!("timeout"), &json!("timeout")]);
    // Each attempt was cut off at its 200 ms timeout, not run for the handler's 5 s: the
    // worker's own timing, whatever the machine's load did to the time between attempts.
    for outcome in &outcomes {
        let ms = outcome["duration_ms"].as_f64().unwrap();
        assert!(
            (190.0..2_000.0).contains(&ms),
            "the handler was not cut off at its timeout: {outcome}"
        );
    }
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_worker_killed_mid_step_loses_nothing_and_the_attempt_is_counted() {
    let options = tasker_tests::EnvOptions {
        coordinator_env: vec![("TASKER_HEARTBEAT_LEASE_MS".into(), "1500".into())],
        ..Default::default()
    };
    let mut env = TestEnv::start_with("kill-9", options).await.unwrap();
    env.register_template(&one_step(
        "long",
        "    handler: tasker.sleep\n    timeout_ms: 20000\n    config: {ms: 1500}\n",
    ))
    .await
    .unwrap();
    let beat = [("TASKER_HEARTBEAT_INTERVAL_MS", "300")];
    let doomed = env
        .start_worker_with(binary("tasker-worker"), "doomed", &["failing"], 4, &beat)
        .await
        .unwrap();
    let id = running(&env, "long").await;
    env.workers[doomed].kill().await;

    env.start_worker_with(binary("tasker-worker"), "rescuer", &["failing"], 4, &beat)
        .await
        .unwrap();
    let done = env
        .api
        .wait_for_task(
            id,
            &[TaskStatus::Complete, TaskStatus::Error],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    let only = done.step("only");
    assert_eq!(
        only.attempts, 2,
        "the killed run counts as an attempt: {only:#?}"
    );
    let history = step_history(&env.pool, id).await;
    let completions: Vec<&Value> = history
        .iter()
        .filter(|h| h.2 == "complete")
        .map(|h| &h.4)
        .collect();
    assert_eq!(completions.len(), 1);
    assert_eq!(completions[0]["worker_id"], "rescuer");
    env.finish().await.unwrap();
}

/// A step on its last attempt whose worker is killed: the broker hands its message to
/// another worker at once. The first worker may only have lost its connection and still
/// be running, so the coordinator cannot fail the step: the new run counts as a new
/// attempt, even past the retry limit, and exactly one result is applied.
#[tokio::test]
async fn a_redelivered_step_on_its_last_attempt_runs_again_and_completes_once() {
    let options = tasker_tests::EnvOptions {
        coordinator_env: vec![("TASKER_HEARTBEAT_LEASE_MS".into(), "30000".into())],
        ..Default::default()
    };
    let mut env = TestEnv::start_with("kill-9-last", options).await.unwrap();
    env.register_template(&one_step(
        "once",
        "    handler: tasker.sleep\n    timeout_ms: 20000\n    retry_limit: 1\n    config: {ms: 1500}\n",
    ))
    .await
    .unwrap();
    let doomed = env
        .start_worker_with(binary("tasker-worker"), "doomed", &["failing"], 4, &[])
        .await
        .unwrap();
    let id = running(&env, "once").await;
    env.workers[doomed].kill().await;
    env.start_worker("rescuer", &["failing"]).await.unwrap();
    // The heartbeat lease (30 s) is far away: only the redelivery can finish it this soon.
    let done = env
        .api
        .wait_for_task(
            id,
            &[TaskStatus::Complete, TaskStatus::Error],
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    assert_eq!(done.step("only").attempts, 2, "{done:#?}");
    let reasons: Vec<String> = step_history(&env.pool, id)
        .await
        .into_iter()
        .map(|h| h.3)
        .collect();
    assert_eq!(
        reasons,
        [
            "dispatched",
            "started",
            "restarted_after_redelivery",
            "succeeded"
        ],
        "{reasons:?}"
    );
    env.finish().await.unwrap();
}

/// A step whose handler takes down every worker that runs it (a crash in native code,
/// an out-of-memory kill): on a classic queue its message is redelivered for ever. Each
/// restart counts an attempt; past `retry_limit` by three, the coordinator fails the step
/// with `worker_lost`, and the next worker skips the message and acks it.
#[tokio::test]
async fn a_step_that_crashes_every_worker_fails_and_stops_taking_workers_down() {
    let mut env = TestEnv::start("crash-loop").await.unwrap();
    env.register_template(&one_step(
        "crashing",
        "    handler: failpoint.crash\n    retry_limit: 1\n",
    ))
    .await
    .unwrap();
    let task = env
        .api
        .create_task(&json!({"namespace": "failing", "name": "crashing"}))
        .await
        .unwrap();
    let pool = env.pool.clone();
    let status = || async {
        sqlx::query_scalar::<_, String>("SELECT status FROM tasks WHERE task_id = $1")
            .bind(task.task_id)
            .fetch_one(&pool)
            .await
            .unwrap()
    };

    // One worker at a time, the next started once the last one is gone, until the task
    // ends: the crash loop a fleet that restarts its workers goes through.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut crashed = 0;
    let survivor = 'loop_: loop {
        let worker = env
            .start_worker_with(
                binary("tasker-worker"),
                &format!("w{crashed}"),
                &["failing"],
                1,
                &[],
            )
            .await
            .unwrap();
        loop {
            if status().await == "error" {
                break 'loop_ worker;
            }
            if !env.workers[worker].running() {
                crashed += 1;
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still crashing workers after {crashed} crashes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // One start per attempt up to retry_limit (1) + 3, the last of which the coordinator
    // refuses: four crashes, five when the first run's notice did not leave before its
    // worker died, one more each time the coordinator's answer comes after a worker's 1 s
    // wait (on a slow machine, once or twice).
    assert!((4..=7).contains(&crashed), "{crashed} workers crashed");
    let (code, message): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT last_error ->> 'code', last_error ->> 'message' FROM steps WHERE task_id = $1",
    )
    .bind(task.task_id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(code.as_deref(), Some("worker_lost"), "{message:?}");

    // The message is gone: the survivor acked it without running it, stays up, and
    // hands nothing back when it stops.
    let queue = format!("{}.steps.failing", env.prefix);
    let settled = tokio::time::Instant::now() + Duration::from_secs(30);
    while !env.workers[survivor]
        .log()
        .contains("redelivered copy skipped")
    {
        assert!(
            env.workers[survivor].running(),
            "the survivor crashed too:\n{}",
            env.workers[survivor].log()
        );
        assert!(
            tokio::time::Instant::now() < settled,
            "the copy was not skipped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.workers[survivor].terminate().await.unwrap();
    assert_eq!(tasker_tests::queue_messages(&queue).await.unwrap(), 0);
    env.finish().await.unwrap();
}

/// With no other worker to take the killed worker's messages back from the broker, only
/// the sweeper notices: it counts each lost run as a failed attempt, retries the step
/// that has attempts left and fails the one that has none, and the metrics count those
/// outcomes as they count a worker's reported failures.
#[tokio::test]
async fn the_sweeper_s_retries_and_failures_of_lost_workers_are_counted() {
    let options = tasker_tests::EnvOptions {
        coordinator_env: vec![("TASKER_HEARTBEAT_LEASE_MS".into(), "1500".into())],
        ..Default::default()
    };
    let mut env = TestEnv::start_with("lost-worker", options).await.unwrap();
    // `spare` has attempts to spare; `last` is on its only attempt when its worker dies.
    for (name, retry_limit) in [("spare", 3), ("last", 1)] {
        env.register_template(&one_step(
            name,
            &format!(
                "    handler: tasker.sleep\n    timeout_ms: 20000\n    retry_limit: {retry_limit}\n    config: {{ms: 60000}}\n    backoff: {{base_seconds: 0.05}}\n"
            ),
        ))
        .await
        .unwrap();
    }
    let beat = [("TASKER_HEARTBEAT_INTERVAL_MS", "300")];
    let doomed = env
        .start_worker_with(binary("tasker-worker"), "doomed", &["failing"], 4, &beat)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for name in ["spare", "last"] {
        ids.push(running(&env, name).await);
    }
    env.workers[doomed].kill().await;

    let failed = env
        .api
        .wait_for_task(
            ids[1],
            &[TaskStatus::Complete, TaskStatus::Error],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(failed.status, TaskStatus::Error, "{failed:#?}");
    let code = |task: &Task| task.step("only").last_error.as_ref()?.code.clone();
    assert_eq!(
        code(&failed).as_deref(),
        Some("lease_expired"),
        "{failed:#?}"
    );
    let retried = env
        .api
        .wait_until(
            ids[0],
            "the sweeper schedules a retry",
            Duration::from_secs(30),
            |t| t.step("only").status != StepStatus::InProgress,
        )
        .await
        .unwrap();
    assert_eq!(
        code(&retried).as_deref(),
        Some("lease_expired"),
        "{retried:#?}"
    );
    assert_ne!(retried.status, TaskStatus::Error, "{retried:#?}");

    // The metrics follow the commit that the API has just shown: give them a moment.
    let metrics = env.metrics_url();
    let lost = "tasker_leases_expired_total{reason=\"lease_expired\"}";
    tasker_tests::wait_for_metric(&metrics, lost, 2.0).await;
    for (sample, expected) in [
        (lost, 2.0),
        (
            "tasker_step_retries_scheduled_total{namespace=\"failing\"}",
            1.0,
        ),
        (
            "tasker_steps_finished_total{namespace=\"failing\",status=\"error\"}",
            1.0,
        ),
        (
            "tasker_tasks_finished_total{namespace=\"failing\",status=\"error\"}",
            1.0,
        ),
    ] {
        assert_eq!(
            tasker_tests::metric(&metrics, sample).await,
            expected,
            "{sample}"
        );
    }
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_duplicated_result_changes_state_once() {
    // The test plays the worker: it takes the step message from the queue itself and
    // publishes the same result twice.
    let env = TestEnv::start("duplicate").await.unwrap();
    env.register_template(&one_step("dup", "    handler: tasker.noop\n"))
        .await
        .unwrap();
    let (_, task) = env
        .create_task(json!({"namespace": "failing", "name": "dup"}))
        .await
        .unwrap();
    let id = task["task_id"].as_str().unwrap().to_owned();

    let connection = lapin::Connection::connect(
        &tasker_tests::amqp_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let step = tasker_tests::take_steps(&channel, &env.queue("failing"), 1)
        .await
        .remove(0);
    let now = Utc::now().to_rfc3339();
    let result = json!({
        "type": "result", "schema_version": 1, "task_id": step["task_id"], "step_id": step["step_id"],
        "dispatch_token": step["dispatch_token"], "outcome": "success", "results": {"n": 1},
        "started_at": now, "finished_at": now, "worker_id": "test"
    });
    for _ in 0..2 {
        channel
            .basic_publish(
                "".into(),
                format!("{}.results", env.prefix).into(),
                Default::default(),
                result.to_string().as_bytes(),
                Default::default(),
            )
            .await
            .unwrap();
    }
    let done = env
        .wait_for_task(&id, &["complete", "error"], Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(done["status"], "complete");
    assert_eq!(TestEnv::step(&done, "only")["results"], json!({"n": 1}));
    // The second copy was dropped by the fence, once.
    let stale = "tasker_stale_results_dropped_total";
    assert_eq!(
        tasker_tests::wait_for_metric(&env.metrics_url(), stale, 1.0).await,
        1.0
    );
    assert_eq!(completions(&env, &id).await, 1);
    let _ = connection.close(200, "OK".into()).await;
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_batch_of_results_is_applied_whole_and_once() {
    // The test plays a worker that sends its results in `results` batches.
    let env = TestEnv::start("batched").await.unwrap();
    let template = "namespace: failing\nname: trio\nsteps:\n  - name: a\n    handler: tasker.noop\n  - name: b\n    handler: tasker.noop\n  - name: c\n    handler: tasker.noop\n  - name: d\n    handler: tasker.echo\n    depends_on: [a, b, c]\n";
    env.register_template(template).await.unwrap();
    let (_, task) = env
        .create_task(json!({"namespace": "failing", "name": "trio"}))
        .await
        .unwrap();
    let id = task["task_id"].as_str().unwrap().to_owned();

    let (_connection, channel) = tasker_tests::confirm_channel().await;
    let queue = env.queue("failing");
    let now = Utc::now().to_rfc3339();
    let entry = |step: &Value| {
        json!({
            "schema_version": 1, "task_id": step["task_id"], "step_id": step["step_id"],
            "dispatch_token": step["dispatch_token"], "outcome": "success",
            "results": {"ran": step["step_name"]}, "started_at": now, "finished_at": now,
            "worker_id": "batcher"
        })
    };
    let batch = |entries: Vec<Value>| {
        json!({"type": "results", "schema_version": 1, "results": entries}).to_string()
    };
    let results_queue = format!("{}.results", env.prefix);

    let roots = tasker_tests::take_steps(&channel, &queue, 3).await;
    let roots_batch = batch(roots.iter().map(entry).collect());
    tasker_tests::publish(&channel, "", &results_queue, roots_batch.as_bytes()).await;
    // The same batch again, as a redelivery would bring it: every result in it is stale.
    tasker_tests::publish(&channel, "", &results_queue, roots_batch.as_bytes()).await;
    let stale = "tasker_stale_results_dropped_total";
    assert_eq!(
        tasker_tests::wait_for_metric(&env.metrics_url(), stale, 3.0).await,
        3.0
    );

    // The join step was dispatched once its three parents completed together.
    let join = tasker_tests::take_steps(&channel, &queue, 1)
        .await
        .remove(0);
    assert_eq!(join["step_name"], "d");
    let parents: Vec<&str> = join["parents"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p["ran"].as_str().unwrap())
        .collect();
    assert_eq!(parents, ["a", "b", "c"]);

    // A batch with one result of an unknown version is dead-lettered whole: its good
    // result is not applied either.
    let mut bad = entry(&join);
    bad["schema_version"] = json!(2);
    let mixed = batch(vec![entry(&join), bad]);
    tasker_tests::publish(&channel, "", &results_queue, mixed.as_bytes()).await;
    let letters =
        tasker_tests::take_dead_letters(&channel, &format!("{}.dead_letter", env.prefix), 1).await;
    assert_eq!(letters[0].body, mixed.as_bytes());
    assert!(
        letters[0].reason.contains("unsupported schema_version 2"),
        "{}",
        letters[0].reason
    );
    let (_, now_task) = env.get(&format!("/v1/tasks/{id}")).await.unwrap();
    assert_eq!(TestEnv::step(&now_task, "d")["status"], "enqueued");

    tasker_tests::publish(
        &channel,
        "",
        &results_queue,
        batch(vec![entry(&join)]).as_bytes(),
    )
    .await;
    let done = env
        .wait_for_task(&id, &["complete", "error"], Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(done["status"], "complete");
    for name in ["a", "b", "c", "d"] {
        let step = TestEnv::step(&done, name);
        assert_eq!(step["status"], "complete", "{name}");
        assert_eq!(step["results"], json!({"ran": name}), "{name}");
    }
    assert_eq!(completions(&env, &id).await, 4);
    assert_eq!(tasker_tests::metric(&env.metrics_url(), stale).await, 3.0);
    env.finish().await.unwrap();
}

/// How many `complete` transitions the task's steps have.
async fn completions(env: &TestEnv, task_id: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM step_transitions WHERE task_id = $1::uuid AND to_status = 'complete'",
    )
    .bind(task_id)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

/// A step whose message would be larger than the broker takes (its context and its
/// parents' results together, here over a 1 MiB limit) is not published: the broker
/// would close the coordinator's channel at every try, and the step would be dispatched
/// again for ever. It fails for good with code `step_message_too_large`, naming the
/// sizes, and the coordinator goes on dispatching.
#[tokio::test]
async fn a_step_too_large_to_publish_fails_and_dispatch_goes_on() {
    let options = tasker_tests::EnvOptions {
        coordinator_env: vec![("TASKER_MAX_STEP_MESSAGE_BYTES".into(), "1048576".into())],
        ..Default::default()
    };
    let mut env = TestEnv::start_with("too-large", options).await.unwrap();
    env.register_template(
        "namespace: failing\nname: swell\nsteps:\n  - name: echo\n    handler: tasker.echo\n  - name: after\n    handler: tasker.noop\n    depends_on: [echo]\n",
    )
    .await
    .unwrap();
    env.register_template(&one_step("small", "    handler: tasker.noop\n"))
        .await
        .unwrap();
    env.start_worker("swelling", &["failing"]).await.unwrap();

    // The context (700 KB) travels to `echo`, which returns it: `after`'s message
    // carries it twice.
    let context = json!({"blob": "x".repeat(700_000)});
    let task = env
        .api
        .run_task(
            &json!({"namespace": "failing", "name": "swell", "context": context}),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(task.status, TaskStatus::Error, "{task:#?}");
    assert_eq!(task.step("echo").status, StepStatus::Complete);
    let after = task.step("after");
    assert_eq!(after.status, StepStatus::Error, "{task:#?}");
    assert_eq!(after.attempts, 1, "failed for good, not retried");
    let error = after.last_error.as_ref().expect("the step's error");
    assert_eq!(error.code.as_deref(), Some("step_message_too_large"));
    assert_eq!(error.kind, "permanent");
    assert!(
        error
            .message
            .contains("TASKER_MAX_STEP_MESSAGE_BYTES = 1048576"),
        "{}",
        error.message
    );

    // The coordinator's broker session is whole: the next tasks run.
    for _ in 0..2 {
        let small = env
            .api
            .run_task(
                &json!({"namespace": "failing", "name": "small", "context": {}}),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        assert_eq!(small.status, TaskStatus::Complete);
    }
    env.finish().await.unwrap();
}
