//! `tasker.wait`: a step the coordinator runs, holding no worker slot, completed by
//! `POST /v1/tasks/{id}/signals/{signal}` or failed at its timeout.

use std::time::Duration;

use serde_json::json;
use tasker_tests::{EnvOptions, StepStatus, TaskStatus, TestEnv, binary};

const APPROVAL: &str = r#"namespace: wait
name: approval
steps:
  - name: quote
    handler: tasker.echo
  - name: approve
    handler: tasker.wait
    depends_on: [quote]
    config: {signal: approved}
  - name: ship
    handler: tasker.echo
    depends_on: [approve]
"#;

const QUICK: &str = "namespace: wait\nname: quick\nsteps:\n  - {name: a, handler: tasker.noop}\n  - {name: b, handler: tasker.noop, depends_on: [a]}\n";

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_waiting_step_holds_no_worker_slot_and_completes_with_the_signal() {
    let mut env = TestEnv::start("wait-signal").await.unwrap();
    for template in [APPROVAL, QUICK] {
        let (status, body) = env.register_template(template).await.unwrap();
        assert_eq!(status, 201, "{body}");
    }
    // One worker running one step at a time.
    env.start_worker_with(binary("tasker-worker"), "one", &["wait"], 1, &[])
        .await
        .unwrap();

    let task = env
        .api
        .create_task(&json!({"namespace": "wait", "name": "approval"}))
        .await
        .unwrap();
    let approve = crate::until_reason(&env, task.task_id, "approve", "waiting_for_signal").await;
    assert_eq!(
        approve["message"], "waiting for the signal `approved`",
        "{approve}"
    );

    // While it waits, the only worker slot runs other tasks.
    for _ in 0..3 {
        let quick = env
            .api
            .create_task(&json!({"namespace": "wait", "name": "quick"}))
            .await
            .unwrap();
        let done = env
            .api
            .wait_for_task(quick.task_id, &[TaskStatus::Complete], WAIT)
            .await
            .unwrap();
        assert_eq!(done.status, TaskStatus::Complete);
    }
    assert_eq!(
        env.api.task(task.task_id).await.unwrap().status,
        TaskStatus::InProgress
    );

    // A signal nobody waits for, then the right one, then the same again.
    let path = |signal: &str| format!("/v1/tasks/{}/signals/{signal}", task.task_id);
    let (status, body) = env.post(&path("rejected"), json!({})).await.unwrap();
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "signal_not_found", "{body}");
    let (status, body) = env
        .post(&path("approved"), json!({"by": "ann"}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["steps"], json!(["approve"]), "{body}");
    assert_eq!(body["completed"], true, "{body}");
    let (status, body) = env
        .post(&path("approved"), json!({"by": "bob"}))
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");

    let done = crate::finished(&env, task.task_id, WAIT).await;
    assert_eq!(done.status, TaskStatus::Complete);
    assert_eq!(done.step("approve").results, Some(json!({"by": "ann"})));
    assert_eq!(
        done.step("approve").attempts,
        0,
        "never dispatched to a worker"
    );
    assert_eq!(
        done.step("ship").results.as_ref().unwrap()["parents"]["approve"],
        json!({"by": "ann"})
    );
    let history = crate::step_history(&env.pool, task.task_id).await;
    let approve: Vec<(&str, &str)> = history
        .iter()
        .filter(|(step, ..)| step == "approve")
        .map(|(_, _, to, reason, _)| (to.as_str(), reason.as_str()))
        .collect();
    assert_eq!(
        approve,
        [
            ("pending", "waiting_for_signal"),
            ("complete", "signal_received")
        ]
    );
    let (status, body) = env.post(&path("approved"), json!({})).await.unwrap();
    assert_eq!(status, 409, "a finished task takes no signal: {body}");
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_signal_before_the_wait_is_kept_and_a_late_one_fails_the_step() {
    let options = EnvOptions {
        coordinator_env: vec![("TASKER_SWEEP_INTERVAL_MS".into(), "200".into())],
        ..EnvOptions::default()
    };
    let mut env = TestEnv::start_with("wait-early-late", options)
        .await
        .unwrap();
    let template = r#"namespace: wait
name: slow
steps:
  - name: prepare
    handler: tasker.sleep
    config: {ms: 500}
  - name: approve
    handler: tasker.wait
    depends_on: [prepare]
    config: {signal: go, timeout: 1s}
"#;
    let (status, body) = env.register_template(template).await.unwrap();
    assert_eq!(status, 201, "{body}");
    env.start_worker("w", &["wait"]).await.unwrap();

    // Signalled while `prepare` still runs: kept, and the step completes when it would
    // start waiting.
    let early = env
        .api
        .create_task(&json!({"namespace": "wait", "name": "slow"}))
        .await
        .unwrap();
    let (status, body) = env
        .post(
            &format!("/v1/tasks/{}/signals/go", early.task_id),
            json!({"ok": true}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["completed"], false, "{body}");
    let done = crate::finished(&env, early.task_id, WAIT).await;
    assert_eq!(done.status, TaskStatus::Complete);
    assert_eq!(done.step("approve").results, Some(json!({"ok": true})));

    // No signal within its timeout: the step fails, and so does the task.
    let late = env
        .api
        .create_task(&json!({"namespace": "wait", "name": "slow"}))
        .await
        .unwrap();
    let done = crate::finished(&env, late.task_id, WAIT).await;
    assert_eq!(done.status, TaskStatus::Error);
    let approve = done.step("approve");
    assert_eq!(approve.status, StepStatus::Error);
    assert_eq!(
        approve.last_error.as_ref().unwrap().code.as_deref(),
        Some("wait_timeout")
    );
    let (status, body) = env
        .post(&format!("/v1/tasks/{}/signals/go", late.task_id), json!({}))
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");

    // A retry waits again, and a signal in time completes it.
    let (status, body) = env
        .post(&format!("/v1/tasks/{}/retry", late.task_id), json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    crate::until_reason(&env, late.task_id, "approve", "waiting_for_signal").await;
    let (status, body) = env
        .post(&format!("/v1/tasks/{}/signals/go", late.task_id), json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let done = crate::finished(&env, late.task_id, WAIT).await;
    assert_eq!(done.status, TaskStatus::Complete);
    env.finish().await.unwrap();
}

#[tokio::test]
async fn malformed_waits_are_refused_at_registration() {
    let env = TestEnv::start("wait-invalid").await.unwrap();
    let template = r#"namespace: wait
name: bad
steps:
  - name: a
    handler: tasker.wait
  - name: b
    handler: tasker.wait
    config: {signal: "no spaces", timeout: soon}
  - name: c
    handler: tasker.wait
    config: {signal: ok, colour: red}
    for_each: "context.items"
"#;
    let (status, body) = env.register_template(template).await.unwrap();
    assert_eq!(status, 422, "{body}");
    let problems = crate::problems(&body);
    for expected in [
        ("steps[0].config", "missing_key"),
        ("steps[1].config.signal", "invalid_value"),
        ("steps[1].config.timeout", "invalid_value"),
        ("steps[2].config.colour", "unknown_key"),
        ("steps[2].for_each", "invalid_value"),
    ] {
        assert!(problems.contains(&expected), "{expected:?} not in {body}");
    }
    env.finish().await.unwrap();
}

/// A signal that comes after its wait's timeout is refused, even before the sweeper has
/// failed the step (`wait_timeout`): the timeout, not the sweep, is the deadline.
#[tokio::test]
async fn a_signal_past_the_waits_timeout_is_refused_before_the_sweep() {
    let env = TestEnv::start_with(
        "wait-late",
        tasker_tests::EnvOptions {
            // No sweep during the test: the step stays `pending` past its timeout.
            coordinator_env: vec![("TASKER_SWEEP_INTERVAL_MS".into(), "600000".into())],
            ..tasker_tests::EnvOptions::default()
        },
    )
    .await
    .unwrap();
    let (status, body) = env
        .register_template(
            "namespace: wait\nname: brief\nsteps:\n  - {name: approve, handler: tasker.wait, config: {signal: go, timeout: 1s}}\n",
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let task = env
        .api
        .create_task(&json!({"namespace": "wait", "name": "brief"}))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (status, body) = env
        .post(&format!("/v1/tasks/{}/signals/go", task.task_id), json!({}))
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{body}"
    );
    let still = env.api.task(task.task_id).await.unwrap();
    assert_eq!(still.step("approve").status, StepStatus::Pending);
    env.finish().await.unwrap();
}
