//! Operator controls: cancel, retry, resolve, and the readiness and history views.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tasker_tests::http_stub::{Answer, HttpStub};
use tasker_tests::{StatusCode, TestEnv};

use crate::{step_history, task_history};

const CHAIN: &str = r#"
namespace: ops
name: chain
steps:
  - {name: one,   handler: tasker.sleep, config: {ms: 300}}
  - {name: two,   handler: tasker.sleep, config: {ms: 1500}, depends_on: [one]}
  - {name: three, handler: tasker.sleep, config: {ms: 300}, depends_on: [two]}
  - {name: four,  handler: tasker.noop, depends_on: [three]}
"#;

#[tokio::test]
async fn cancel_in_the_middle_stops_everything_and_the_task_stays_cancelled() {
    let mut env = TestEnv::start("cancel").await.unwrap();
    env.register_template(CHAIN).await.unwrap();
    env.start_worker("w1", &["ops"]).await.unwrap();
    let (_, task) = env
        .create_task(json!({"namespace": "ops", "name": "chain"}))
        .await
        .unwrap();
    let id = task["task_id"].as_str().unwrap().to_owned();
    env.wait_until(&id, "step two runs", Duration::from_secs(20), |t| {
        TestEnv::step(t, "two")["status"] == "in_progress"
    })
    .await
    .unwrap();

    let (status, cancelled) = env
        .post(
            &format!("/v1/tasks/{id}/cancel"),
            json!({"reason": "customer withdrew"}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    let statuses: Vec<&str> = cancelled["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["complete", "cancelled", "cancelled", "cancelled"]
    );
    assert_eq!(cancelled["execution"]["execution_status"], "cancelled");
    let cancelled_at: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&env.pool)
        .await
        .unwrap();

    // The worker aborts the running step; nothing is dispatched afterwards; the late
    // world cannot revive the task.
    env.workers[0]
        .wait_for_log("aborted its running steps", Duration::from_secs(5))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let (_, later) = env.get(&format!("/v1/tasks/{id}")).await.unwrap();
    assert_eq!(later["status"], "cancelled");
    assert_eq!(later["steps"], cancelled["steps"]);
    let dispatched_after: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM step_transitions WHERE task_id = $1::uuid AND to_status = 'enqueued' AND created_at > $2",
    )
    .bind(&id)
    .bind(cancelled_at)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(dispatched_after, 0);

    let (status, body) = env
        .post(&format!("/v1/tasks/{id}/cancel"), json!({}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _) = env
        .post(&format!("/v1/tasks/{id}/retry"), json!({}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CONFLICT);

    // The history says who did what.
    let (_, history) = env
        .get(&format!("/v1/tasks/{id}/transitions"))
        .await
        .unwrap();
    // The history records each dispatch, but never the token that completes it.
    let dispatched = history["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["reason"] == "dispatched")
        .unwrap();
    assert_eq!(dispatched["metadata"]["attempt"], 1, "{dispatched}");
    assert!(!history.to_string().contains("dispatch_token"), "{history}");
    let last = history["task"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["to_status"], "cancelled");
    assert_eq!(last["reason"], "cancelled_by_operator");
    assert_eq!(last["metadata"]["reason"], "customer withdrew");
    let two: Vec<&Value> = history["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["step"] == "two")
        .collect();
    assert_eq!(two.last().unwrap()["to_status"], "cancelled");
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_failed_task_retried_completes() {
    let mut env = TestEnv::start("retry").await.unwrap();
    env.start_worker_calling_stubs("w1", &["ops"])
        .await
        .unwrap();
    // The partner API is down for three calls, then recovers.
    let stub = HttpStub::start(vec![
        Answer::new(500, "down"),
        Answer::new(500, "down"),
        Answer::new(500, "down"),
        Answer::new(200, "{}"),
    ])
    .await
    .unwrap();
    env.register_template(&format!(
        "namespace: ops\nname: sync\nsteps:\n  - {{name: push, handler: tasker.http, retry_limit: 3, config: {{url: \"{}\"}}, backoff: {{base_seconds: 0.05}}}}\n  - {{name: after, handler: tasker.echo, depends_on: [push]}}\n",
        stub.url
    ))
    .await
    .unwrap();
    let task = env
        .run_task(
            json!({"namespace": "ops", "name": "sync"}),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(task["status"], "error");
    let id = task["task_id"].as_str().unwrap().to_owned();
    assert_eq!(TestEnv::step(&task, "push")["attempts"], 3);
    assert_eq!(
        TestEnv::step(&task, "push")["last_error"]["code"],
        "http_500"
    );
    assert_eq!(task["execution"]["recommended_action"], "handle_failures");

    let (status, retried) = env
        .post(
            &format!("/v1/tasks/{id}/retry"),
            json!({"reason": "partner is back"}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{retried}");
    assert_eq!(retried["status"], "in_progress");
    let done = env
        .wait_for_task(&id, &["complete", "error"], Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done["status"], "complete", "{done:#}");
    assert_eq!(
        TestEnv::step(&done, "push")["attempts"],
        1,
        "a fresh attempt budget"
    );
    assert_eq!(stub.arrivals().len(), 4);
    let reasons = task_history(&env.pool, &id).await;
    assert_eq!(
        reasons,
        [
            "created",
            "first_step_dispatched",
            "blocked_by_failures",
            "retry_requested",
            "all_steps_done"
        ]
    );
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_step_resolved_by_hand_lets_its_dependents_run_with_the_given_results() {
    let mut env = TestEnv::start("resolve").await.unwrap();
    env.start_worker("w1", &["ops"]).await.unwrap();
    env.register_template(
        "namespace: ops\nname: manual\nsteps:\n  - {name: lookup, handler: tasker.fail, config: {kind: permanent, times: 9}}\n  - {name: use, handler: tasker.echo, depends_on: [lookup]}\n",
    )
    .await
    .unwrap();
    let task = env
        .run_task(
            json!({"namespace": "ops", "name": "manual"}),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(task["status"], "error");
    let id = task["task_id"].as_str().unwrap().to_owned();
    let (_, readiness) = env.get(&format!("/v1/tasks/{id}/readiness")).await.unwrap();
    assert_eq!(readiness["steps"][0]["reason"], "failed_permanently");
    assert_eq!(readiness["steps"][1]["reason"], "blocked_by_failed_parent");
    assert_eq!(readiness["steps"][1]["waiting_on"], json!(["lookup"]));

    let (status, body) = env
        .post(&format!("/v1/tasks/{id}/steps/nope/resolve"), json!({}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let (status, step) = env
        .post(
            &format!("/v1/tasks/{id}/steps/lookup/resolve"),
            json!({"results": {"customer": "found by hand"}, "reason": "ticket 42"}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{step}");
    assert_eq!(step["status"], "resolved_manually");
    let done = env
        .wait_for_task(&id, &["complete"], Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        TestEnv::step(&done, "use")["results"]["parents"],
        json!({"lookup": {"customer": "found by hand"}})
    );
    let (status, _) = env
        .post(&format!("/v1/tasks/{id}/steps/lookup/resolve"), json!({}))
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a finished task's steps cannot be resolved"
    );
    env.finish().await.unwrap();
}

#[tokio::test]
async fn readiness_says_why_each_step_is_not_running() {
    let mut env = TestEnv::start("readiness").await.unwrap();
    env.start_worker("w1", &["ops"]).await.unwrap();
    env.register_template(
        r#"
namespace: ops
name: explain
steps:
  - {name: slow, handler: tasker.sleep, config: {ms: 3000}}
  - {name: after_slow, handler: tasker.noop, depends_on: [slow]}
  - {name: flaky, handler: tasker.fail, retry_limit: 3, config: {times: 9}, backoff: {schedule: [60]}}
  - {name: hopeless, handler: tasker.fail, retry_limit: 1, config: {times: 9}}
"#,
    )
    .await
    .unwrap();
    let (_, task) = env
        .create_task(json!({"namespace": "ops", "name": "explain"}))
        .await
        .unwrap();
    let id = task["task_id"].as_str().unwrap().to_owned();
    let task = env
        .wait_until(
            &id,
            "flaky backs off and hopeless fails",
            Duration::from_secs(20),
            |t| {
                TestEnv::step(t, "flaky")["status"] == "waiting_for_retry"
                    && TestEnv::step(t, "hopeless")["status"] == "error"
                    && TestEnv::step(t, "slow")["status"] == "in_progress"
            },
        )
        .await
        .unwrap();
    assert_eq!(task["execution"]["execution_status"], "processing");
    assert_eq!(task["execution"]["health"], "recovering");

    let (status, readiness) = env.get(&format!("/v1/tasks/{id}/readiness")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let by_name = |name: &str| -> Value {
        readiness["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()
            .clone()
    };
    let after = by_name("after_slow");
    assert_eq!(after["reason"], "waiting_on_parents");
    assert_eq!(after["waiting_on"], json!(["slow"]));
    assert_eq!(after["ready"], false);
    assert!(after["message"].as_str().unwrap().contains("slow"));
    let flaky = by_name("flaky");
    assert_eq!(flaky["reason"], "in_backoff");
    assert_eq!(flaky["attempts"], 1);
    let next: DateTime<Utc> =
        DateTime::parse_from_rfc3339(flaky["next_attempt_at"].as_str().unwrap())
            .unwrap()
            .into();
    let wait = next - Utc::now();
    assert!(
        wait > chrono::Duration::seconds(50) && wait <= chrono::Duration::seconds(60),
        "{flaky}"
    );
    let hopeless = by_name("hopeless");
    assert_eq!(hopeless["reason"], "attempts_exhausted");
    assert!(
        hopeless["message"]
            .as_str()
            .unwrap()
            .contains("tasker.fail"),
        "{hopeless}"
    );
    assert_eq!(by_name("slow")["reason"], "running");

    let (status, _) = env
        .post(&format!("/v1/tasks/{id}/cancel"), json!({}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let (_, readiness) = env.get(&format!("/v1/tasks/{id}/readiness")).await.unwrap();
    assert_eq!(readiness["steps"][1]["reason"], "task_cancelled");
    let history = step_history(&env.pool, &id).await;
    assert!(
        history
            .iter()
            .any(|h| h.0 == "flaky" && h.3 == "task_cancelled")
    );
    let (status, _) = env
        .get(&format!("/v1/tasks/{}/readiness", uuid::Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    env.finish().await.unwrap();
}

#[tokio::test]
async fn queued_steps_of_a_cancelled_task_are_not_run() {
    let mut env = TestEnv::start("cancel-queued").await.unwrap();
    env.register_template("namespace: ops\nname: busy\nsteps:\n  - {name: hold, handler: tasker.sleep, config: {ms: 1500}}\n")
        .await
        .unwrap();
    env.register_template(
        "namespace: ops\nname: victim\nsteps:\n  - {name: side_effect, handler: tasker.echo}\n",
    )
    .await
    .unwrap();
    // One worker that runs one step at a time: the victim's step waits in the queue.
    env.start_worker_binary(tasker_tests::binary("tasker-worker"), "single", &["ops"], 1)
        .await
        .unwrap();
    let (_, busy) = env
        .create_task(json!({"namespace": "ops", "name": "busy"}))
        .await
        .unwrap();
    let busy_id = busy["task_id"].as_str().unwrap().to_owned();
    env.wait_until(&busy_id, "hold runs", Duration::from_secs(20), |t| {
        TestEnv::step(t, "hold")["status"] == "in_progress"
    })
    .await
    .unwrap();
    let (_, victim) = env
        .create_task(json!({"namespace": "ops", "name": "victim"}))
        .await
        .unwrap();
    let victim_id = victim["task_id"].as_str().unwrap().to_owned();
    env.wait_until(
        &victim_id,
        "the step is queued",
        Duration::from_secs(20),
        |t| TestEnv::step(t, "side_effect")["status"] == "enqueued",
    )
    .await
    .unwrap();
    let (status, _) = env
        .post(&format!("/v1/tasks/{victim_id}/cancel"), json!({}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);

    env.wait_for_task(&busy_id, &["complete"], Duration::from_secs(20))
        .await
        .unwrap();
    env.workers[0]
        .wait_for_log("skipped: the task was cancelled", Duration::from_secs(10))
        .await
        .unwrap();
    let started: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM step_transitions WHERE task_id = $1::uuid AND reason = 'started'",
    )
    .bind(&victim_id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(started, 0, "the cancelled task's step never ran");
    env.finish().await.unwrap();
}
