//! Operator controls: cancel, retry, resolve, and the readiness and history views.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tasker_tests::http_stub::{Answer, HttpStub};
use tasker_tests::{StatusCode, TaskStatus, TestEnv};

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

/// One step as long as `chain`'s step two.
const SENTINEL: &str = r#"
namespace: ops
name: sentinel
steps:
  - {name: only, handler: tasker.sleep, config: {ms: 1500}}
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
    // What the late world could do has happened once a sentinel task, dispatched after
    // the cancel and as long as step two, is complete: a claim after the cancel would
    // have taken this task's next step first, and step two's result, had the abort
    // failed, would have been applied before the sentinel's, published later.
    env.register_template(SENTINEL).await.unwrap();
    let sentinel = env
        .api
        .run_task(
            &json!({"namespace": "ops", "name": "sentinel"}),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(sentinel.status, TaskStatus::Complete, "{sentinel:#?}");
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
async fn a_failed_task_resolved_by_hand_is_closed_and_keeps_its_failure_on_record() {
    let mut env = TestEnv::start("resolve_task").await.unwrap();
    env.start_worker("w1", &["ops"]).await.unwrap();
    env.register_template(
        "namespace: ops\nname: refund\nsteps:\n  - {name: charge, handler: tasker.fail, config: {kind: permanent, times: 9}}\n  - {name: notify, handler: tasker.echo, depends_on: [charge]}\n",
    )
    .await
    .unwrap();
    let task = env
        .run_task(
            json!({"namespace": "ops", "name": "refund"}),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let id = task["task_id"].as_str().unwrap().to_owned();
    assert_eq!(task["status"], "error", "{task:#}");

    // Only a task in error can be resolved: not an unknown one, not twice.
    let (status, body) = env
        .post(
            &format!("/v1/tasks/{}/resolve", uuid::Uuid::now_v7()),
            json!({}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = env
        .post(&format!("/v1/tasks/{id}/resolve"), json!({"reason": 7}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, resolved) = env
        .post(
            &format!("/v1/tasks/{id}/resolve"),
            json!({"reason": "refunded by phone"}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{resolved}");
    assert_eq!(resolved["status"], "resolved_manually");
    assert!(resolved["completed_at"].is_string(), "{resolved:#}");
    // The steps keep their states: the history still says what failed.
    assert_eq!(TestEnv::step(&resolved, "charge")["status"], "error");
    assert_eq!(TestEnv::step(&resolved, "notify")["status"], "pending");
    let (status, body) = env
        .post(&format!("/v1/tasks/{id}/resolve"), json!({}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "invalid_state", "{body}");
    assert_eq!(
        task_history(&env.pool, &id).await,
        [
            "created",
            "first_step_dispatched",
            "blocked_by_failures",
            "resolved_by_operator"
        ]
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

/// Steps no worker serves here: the tasks stay unfinished until cancelled.
const IDLE: &str = r#"
namespace: bulk
name: idle
steps:
  - {name: first, handler: tasker.noop}
  - {name: second-step, handler: tasker.noop, depends_on: [first]}
"#;

const DOOMED: &str = r#"
namespace: bulkfail
name: doomed
steps:
  - {name: x, handler: tasker.fail, config: {kind: permanent}}
  - {name: y, handler: tasker.noop, depends_on: [x]}
"#;

fn ids(body: &Value) -> Vec<String> {
    body["task_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no task_ids in {body}"))
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect()
}

async fn create_tagged(env: &TestEnv, tags: Value) -> String {
    let (status, task) = env
        .create_task(json!({"namespace": "bulk", "name": "idle", "tags": tags}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{task}");
    task["task_id"].as_str().unwrap().to_owned()
}

/// A bulk cancel of `pending` tasks leaves alone a matched task that started before its
/// batch reached it: the filter is checked again under the task's lock.
#[tokio::test]
async fn a_bulk_cancel_by_status_skips_a_task_that_left_that_status() {
    let env = TestEnv::start("bulk-moved").await.unwrap();
    env.register_template(IDLE).await.unwrap();
    // Not to start for a minute: `pending`.
    let (status, task) = env
        .create_task(json!({"namespace": "bulk", "name": "idle", "delay_ms": 60_000}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let task: uuid::Uuid = task["task_id"].as_str().unwrap().parse().unwrap();
    // The test holds the task's row; the bulk cancel matches it, then waits for it.
    let mut holder = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM tasks WHERE task_id = $1 FOR UPDATE")
        .bind(task)
        .execute(&mut *holder)
        .await
        .unwrap();
    let (status, answer) = {
        let cancel = env.post(
            "/v1/tasks/cancel",
            json!({"namespace": "bulk", "status": "pending", "reason": "clear the backlog"}),
        );
        tokio::pin!(cancel);
        tokio::select! {
            answer = &mut cancel => panic!("answered without waiting: {answer:?}"),
            () = tasker_tests::wait_for_lock_waiters(&env.pool, "", 1) => {}
        }
        // Meanwhile the task started.
        sqlx::query("UPDATE tasks SET status = 'in_progress' WHERE task_id = $1")
            .bind(task)
            .execute(&mut *holder)
            .await
            .unwrap();
        holder.commit().await.unwrap();
        cancel.await.unwrap()
    };
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        (answer["matched"].as_u64(), answer["changed"].as_u64()),
        (Some(1), Some(0)),
        "{answer}"
    );
    let status: String = sqlx::query_scalar("SELECT status FROM tasks WHERE task_id = $1")
        .bind(task)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(status, "in_progress");
    env.finish().await.unwrap();
}

/// Bulk cancel and retry: refused filters name every problem, a dry run changes nothing,
/// tags, the time window, status and limit narrow, and each task changes exactly as a
/// single cancel or retry would (history, reason).
#[tokio::test]
async fn bulk_cancel_and_retry_act_on_what_the_filter_matches() {
    let mut env = TestEnv::start("bulk").await.unwrap();
    env.register_template(IDLE).await.unwrap();
    env.register_template(DOOMED).await.unwrap();
    let mut both = Vec::new();
    for _ in 0..3 {
        both.push(create_tagged(&env, json!(["nightly", "eu"])).await);
    }
    let middle: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let mut nightly = Vec::new();
    for _ in 0..2 {
        nightly.push(create_tagged(&env, json!(["nightly"])).await);
    }

    // Refused: an empty filter, and every bad field named at once.
    for action in ["cancel", "retry"] {
        let (status, body) = env
            .post(&format!("/v1/tasks/{action}"), json!({"dry_run": true}))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(crate::detail_paths(&body), [""], "{body}");
    }
    let (status, body) = env
        .post(
            "/v1/tasks/cancel",
            json!({"namespace": "", "status": "complete", "tags": ["ok", 7], "limit": 10001,
                   "created_after": "yesterday", "dry_run": "yes", "bogus": 1}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let mut paths = crate::detail_paths(&body);
    paths.sort();
    assert_eq!(
        paths,
        [
            "bogus",
            "created_after",
            "dry_run",
            "limit",
            "namespace",
            "status",
            "tags/1"
        ],
        "{body}"
    );
    let (status, body) = env
        .post("/v1/tasks/retry", json!({"status": "pending"}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(crate::detail_paths(&body), ["status"], "{body}");

    // Dry runs: tags (all must match), the time window, the limit.
    let (status, body) = env
        .post(
            "/v1/tasks/cancel",
            json!({"tags": ["nightly", "eu"], "dry_run": true}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["matched"], 3, "{body}");
    assert_eq!(body["changed"], 0, "{body}");
    assert_eq!(ids(&body), both, "oldest first");
    let (_, body) = env
        .post(
            "/v1/tasks/cancel",
            json!({"namespace": "bulk", "created_after": middle.to_rfc3339(), "dry_run": true}),
        )
        .await
        .unwrap();
    assert_eq!(ids(&body), nightly, "{body}");
    let (_, body) = env
        .post(
            "/v1/tasks/cancel",
            json!({"tags": ["nightly"], "created_before": middle.to_rfc3339(),
                   "status": "in_progress", "limit": 2, "dry_run": true}),
        )
        .await
        .unwrap();
    assert_eq!(ids(&body), both[..2], "{body}");
    assert_eq!(body["has_more"], true, "{body}");
    for id in both.iter().chain(&nightly) {
        let (_, task) = env.get(&format!("/v1/tasks/{id}")).await.unwrap();
        assert_eq!(task["status"], "in_progress", "a dry run changes nothing");
    }

    // Cancel: the matched tasks, each with the single cancel's history.
    let (status, body) = env
        .post(
            "/v1/tasks/cancel",
            json!({"tags": ["eu", "nightly"], "reason": "bad batch"}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((&body["matched"], &body["changed"]), (&json!(3), &json!(3)));
    assert_eq!(ids(&body), both);
    for id in &both {
        let (_, task) = env.get(&format!("/v1/tasks/{id}")).await.unwrap();
        assert_eq!(task["status"], "cancelled");
        assert!(
            task["steps"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["status"] == "cancelled"),
            "{task}"
        );
        let (_, history) = env
            .get(&format!("/v1/tasks/{id}/transitions"))
            .await
            .unwrap();
        let last = history["task"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["reason"], "cancelled_by_operator");
        assert_eq!(last["metadata"]["reason"], "bad batch");
    }
    for id in &nightly {
        let (_, task) = env.get(&format!("/v1/tasks/{id}")).await.unwrap();
        assert_eq!(task["status"], "in_progress", "not matched, not changed");
    }
    // Finished tasks no longer match.
    let (_, body) = env
        .post("/v1/tasks/cancel", json!({"tags": ["eu"]}))
        .await
        .unwrap();
    assert_eq!((&body["matched"], &body["changed"]), (&json!(0), &json!(0)));

    // Retry: only tasks in error, each as a single retry.
    env.start_worker("w1", &["bulkfail"]).await.unwrap();
    let mut failed = Vec::new();
    for _ in 0..2 {
        let (_, task) = env
            .create_task(json!({"namespace": "bulkfail", "name": "doomed"}))
            .await
            .unwrap();
        let id = task["task_id"].as_str().unwrap().to_owned();
        env.wait_for_task(&id, &["error"], Duration::from_secs(30))
            .await
            .unwrap();
        failed.push(id);
    }
    let (_, body) = env
        .post(
            "/v1/tasks/retry",
            json!({"namespace": "bulk", "dry_run": true}),
        )
        .await
        .unwrap();
    assert_eq!(body["matched"], 0, "no task of `bulk` is in error: {body}");
    let (status, body) = env
        .post(
            "/v1/tasks/retry",
            json!({"namespace": "bulkfail", "status": "error", "reason": "deployed a fix"}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(ids(&body), failed);
    assert_eq!(body["changed"], 2);
    for id in &failed {
        // It runs on, and fails again: x fails every time.
        let history = task_history(&env.pool, id).await;
        assert!(
            history.contains(&"retry_requested".to_owned()),
            "{history:?}"
        );
        env.wait_for_task(id, &["error"], Duration::from_secs(30))
            .await
            .unwrap();
        let x: Vec<String> = step_history(&env.pool, id)
            .await
            .into_iter()
            .filter(|(step, _, _, reason, _)| step == "x" && reason == "retry_requested")
            .map(|(_, _, _, _, metadata)| metadata["reason"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(x, ["deployed a fix"]);
    }
    env.finish().await.unwrap();
}

/// A page of `GET /v1/tasks` carries at most 16 MiB of contexts: it ends early with a
/// cursor, and the next page goes on from there.
#[tokio::test]
async fn a_task_list_page_ends_early_once_its_contexts_pass_16_mib() {
    let env = TestEnv::start("listing-large").await.unwrap();
    env.register_template(IDLE).await.unwrap();
    // Twenty contexts of about 900 KB: 18 fit in one page's 16 MiB.
    let pad = "x".repeat(900_000);
    let mut created = Vec::new();
    for n in 0..20 {
        let task = env
            .api
            .create_task(&json!({"namespace": "bulk", "name": "idle",
                                 "context": {"pad": pad, "n": n}}))
            .await
            .unwrap();
        created.push(task.task_id.to_string());
    }
    let (status, first) = env
        .get("/v1/tasks?namespace=bulk&order=created_at&limit=50")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{first}");
    let listed = crate::listed_ids;
    assert_eq!(listed(&first), created[..18]);
    assert_eq!(first["tasks"][17]["context"]["n"], 17, "contexts whole");
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a cursor past the cut");
    let (status, second) = env
        .get(&format!(
            "/v1/tasks?namespace=bulk&order=created_at&limit=50&cursor={cursor}"
        ))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(listed(&second), created[18..]);
    assert!(second["next_cursor"].is_null(), "{}", second["next_cursor"]);
    // Newest first, the same cut.
    let (_, newest) = env.get("/v1/tasks?namespace=bulk&limit=50").await.unwrap();
    let mut expected: Vec<String> = created[2..].to_vec();
    expected.reverse();
    assert_eq!(listed(&newest), expected);
    env.finish().await.unwrap();
}

/// `GET /v1/tasks` filters by tags and time, pages in both orders, and names bad
/// parameters; both diagrams answer Mermaid.
#[tokio::test]
async fn task_lists_filter_and_page_both_ways_and_diagrams_answer_mermaid() {
    let env = TestEnv::start("listing").await.unwrap();
    env.register_template(IDLE).await.unwrap();
    let mut tagged = Vec::new();
    for i in 0..5 {
        let tags = if i % 2 == 0 {
            json!(["red", "big"])
        } else {
            json!(["red"])
        };
        tagged.push((create_tagged(&env, tags).await, i % 2 == 0));
    }
    let all: Vec<String> = tagged.iter().map(|(id, _)| id.clone()).collect();
    let big: Vec<String> = tagged
        .iter()
        .filter(|(_, big)| *big)
        .map(|(id, _)| id.clone())
        .collect();

    // Every page of a listing, following next_cursor.
    let pages = |query: String| {
        let env = &env;
        async move {
            let mut seen = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let mut path = format!("/v1/tasks?{query}&limit=2");
                if let Some(cursor) = &cursor {
                    path.push_str(&format!("&cursor={cursor}"));
                }
                let (status, body) = env.get(&path).await.unwrap();
                assert_eq!(status, StatusCode::OK, "{path}: {body}");
                let page = body["tasks"].as_array().unwrap();
                assert!(page.len() <= 2);
                seen.extend(
                    page.iter()
                        .map(|t| t["task_id"].as_str().unwrap().to_owned()),
                );
                match body["next_cursor"].as_str() {
                    Some(next) => cursor = Some(next.to_owned()),
                    None => break seen,
                }
            }
        }
    };
    assert_eq!(pages("namespace=bulk&order=created_at".into()).await, all);
    let newest: Vec<String> = all.iter().rev().cloned().collect();
    assert_eq!(pages("namespace=bulk".into()).await, newest);
    assert_eq!(
        pages("namespace=bulk&order=-created_at".into()).await,
        newest
    );
    assert_eq!(
        pages("tag=big&tag=red&order=created_at".into()).await,
        big,
        "all tags must match"
    );
    let (_, second) = env.get(&format!("/v1/tasks/{}", all[1])).await.unwrap();
    let after = second["created_at"].as_str().unwrap().replace('+', "%2B");
    // The first step went out with the task: it is in_progress.
    assert_eq!(second["status"], "in_progress");
    assert_eq!(
        pages(format!(
            "status=in_progress&created_after={after}&order=created_at"
        ))
        .await,
        all[2..]
    );
    assert_eq!(
        pages(format!("created_before={after}&name=idle")).await,
        [all[0].clone()]
    );
    let (status, body) = env
        .get("/v1/tasks?order=sideways&created_after=soon&status=nope&tag=a&colour=red")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let mut paths = crate::detail_paths(&body);
    paths.sort();
    assert_eq!(paths, ["colour", "created_after", "order", "status"]);

    // Diagrams: Mermaid text, a node per step, the task's coloured by status.
    let text = |path: String| {
        let env = &env;
        async move {
            let response = env
                .http
                .get(format!("{}{path}", env.base_url))
                .send()
                .await
                .unwrap();
            let status = response.status();
            let content_type = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_owned();
            (status, content_type, response.text().await.unwrap())
        }
    };
    let (status, content_type, diagram) = text("/v1/templates/bulk/idle/diagram".into()).await;
    assert_eq!(status, StatusCode::OK, "{diagram}");
    assert!(
        content_type.starts_with("text/vnd.mermaid"),
        "{content_type}"
    );
    assert!(diagram.starts_with("flowchart TD\n"), "{diagram}");
    assert!(diagram.contains("    first[\"first\"]\n"), "{diagram}");
    assert!(
        diagram.contains("    step_2[\"second-step\"]\n"),
        "{diagram}"
    );
    assert!(diagram.contains("    first --> step_2\n"), "{diagram}");
    let (_, _, versioned) = text("/v1/templates/bulk/idle/diagram?version=0.1.0".into()).await;
    assert_eq!(versioned, diagram);

    let (status, content_type, diagram) = text(format!("/v1/tasks/{}/diagram", all[0])).await;
    assert_eq!(status, StatusCode::OK, "{diagram}");
    assert!(
        content_type.starts_with("text/vnd.mermaid"),
        "{content_type}"
    );
    assert_eq!(diagram.matches("<br/>").count(), 2, "{diagram}");
    assert!(
        diagram.contains("    first[\"first<br/>")
            && diagram.contains("    step_2[\"second-step<br/>pending\"]:::pending\n"),
        "{diagram}"
    );
    assert!(diagram.contains("    classDef pending "), "{diagram}");
    assert!(diagram.contains("    first --> step_2\n"), "{diagram}");

    for path in [
        "/v1/templates/bulk/nothing/diagram".to_owned(),
        "/v1/templates/bulk/idle/diagram?version=9.9.9".to_owned(),
        format!("/v1/tasks/{}/diagram", uuid::Uuid::now_v7()),
    ] {
        let (status, body) = env.get(&path).await.unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    let (status, _) = env.get("/v1/tasks/not-a-uuid/diagram").await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    env.finish().await.unwrap();
}

/// A step that waits for a signal: the task waits, no worker needed.
const WAITER: &str = "namespace: ops\nname: waiter\nsteps:\n  - {name: hold, handler: tasker.wait, config: {signal: go}}\n";

#[tokio::test]
async fn a_cancel_waiting_on_a_result_also_cancels_the_steps_that_result_added() {
    let env = TestEnv::start("cancel-added").await.unwrap();
    let (status, body) = env.register_template(WAITER).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let task = env
        .api
        .create_task(&json!({"namespace": "ops", "name": "waiter"}))
        .await
        .unwrap();
    let id = task.task_id.to_string();
    crate::until_reason(&env, task.task_id, "hold", "waiting_for_signal").await;

    // What a result that expands a `for_each` does: it holds the task's step and adds
    // steps (the instances), ready to claim, in one transaction.
    let mut result = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM steps WHERE task_id = $1 FOR UPDATE")
        .bind(task.task_id)
        .execute(&mut *result)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO steps SELECT (jsonb_populate_record(NULL::steps, to_jsonb(s) || \
           jsonb_build_object('step_id', gen_random_uuid(), 'name', 'added', \
             'handler', 'tasker.noop', 'remaining_parents', 0, 'condition', NULL, \
             'wait_signal', NULL, 'config', '{}'::jsonb))).* \
         FROM steps s WHERE s.task_id = $1",
    )
    .bind(task.task_id)
    .execute(&mut *result)
    .await
    .unwrap();

    // The cancel waits for that transaction.
    let cancel = {
        let api = env.http.clone();
        let url = format!("{}/v1/tasks/{id}/cancel", env.base_url);
        tokio::spawn(async move { api.post(url).json(&json!({})).send().await })
    };
    tasker_tests::wait_for_lock_waiters(&env.pool, "cancelled", 1).await;
    result.commit().await.unwrap();
    let answer = cancel.await.unwrap().unwrap();
    assert_eq!(answer.status(), StatusCode::OK);

    // Nothing of a cancelled task is left to run.
    let statuses: Vec<(String, String)> =
        sqlx::query_as("SELECT name, status FROM steps WHERE task_id = $1 ORDER BY name")
            .bind(task.task_id)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        statuses,
        [
            ("added".to_owned(), "cancelled".to_owned()),
            ("hold".to_owned(), "cancelled".to_owned())
        ]
    );
    env.finish().await.unwrap();
}

#[tokio::test]
async fn an_operator_action_chosen_as_a_deadlock_victim_is_tried_again() {
    let mut env = TestEnv::start("operator-deadlock").await.unwrap();
    let (status, body) = env.register_template(DOOMED).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    env.start_worker("w", &["bulkfail"]).await.unwrap();
    let task = env
        .api
        .create_task(&json!({"namespace": "bulkfail", "name": "doomed"}))
        .await
        .unwrap();
    let id = task.task_id.to_string();
    env.wait_for_task(&id, &["error"], Duration::from_secs(30))
        .await
        .unwrap();

    // A transaction that holds the step, then wants the task, as a result batch does;
    // the resolve holds the task, then wants the step.
    let mut other = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM steps WHERE task_id = $1 FOR UPDATE")
        .bind(task.task_id)
        .execute(&mut *other)
        .await
        .unwrap();
    let resolve = {
        let http = env.http.clone();
        let url = format!("{}/v1/tasks/{id}/steps/x/resolve", env.base_url);
        tokio::spawn(async move { http.post(url).json(&json!({})).send().await })
    };
    // The resolve waits for the step.
    tasker_tests::wait_for_lock_waiters(&env.pool, "AND name = $2 FOR UPDATE", 1).await;
    // The cycle: PostgreSQL fails one side (the resolve, waiting longest, finds it).
    let _ = sqlx::query("SELECT 1 FROM tasks WHERE task_id = $1 FOR UPDATE")
        .bind(task.task_id)
        .execute(&mut *other)
        .await;
    other.rollback().await.unwrap();
    let answer = resolve.await.unwrap().unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    env.finish().await.unwrap();
}
