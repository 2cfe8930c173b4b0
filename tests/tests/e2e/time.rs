//! Tasks that run later (`run_at`, `delay_ms`) and tasks that must end in time (a
//! template's `timeout`, a creation's `deadline`).

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use serde_json::{Value, json};
use tasker_tests::{StepStatus, TaskStatus, TestEnv};

const GREET: &str = "namespace: later\nname: greet\nsteps:\n  - {name: hello, handler: tasker.noop}\n  - {name: bye, handler: tasker.noop, depends_on: [hello]}\n";
const SLOW: &str = "namespace: later\nname: slow\nsteps:\n  - {name: first, handler: tasker.noop}\n  - {name: nap, handler: tasker.sleep, depends_on: [first], config: {ms: 4000}}\n";
const SLOW_WITH_TIMEOUT: &str = "namespace: later\nname: slow_timeout\ntimeout: 1s\nsteps:\n  - {name: first, handler: tasker.noop}\n  - {name: nap, handler: tasker.sleep, depends_on: [first], config: {ms: 4000}}\n";

#[tokio::test]
async fn a_delayed_task_waits_says_so_and_then_runs() {
    let mut env = TestEnv::start("time-delay").await.unwrap();
    let (status, body) = env.register_template(GREET).await.unwrap();
    assert_eq!(status, 201, "{body}");
    env.start_worker("later", &["later"]).await.unwrap();

    let task = env
        .api
        .create_task(&json!({"namespace": "later", "name": "greet", "delay_ms": 2000}))
        .await
        .unwrap();
    let run_at = task.run_at.expect("run_at");
    assert!(run_at > task.created_at + TimeDelta::milliseconds(1900));
    assert_eq!(task.status, TaskStatus::Pending);
    assert_eq!(task.step("hello").status, StepStatus::Pending);
    assert_eq!(task.step("hello").next_attempt_at, Some(run_at));

    let readiness: Value = env
        .http
        .get(format!(
            "{}/v1/tasks/{}/readiness",
            env.base_url, task.task_id
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let hello = &readiness["steps"][0];
    assert_eq!(hello["reason"], "scheduled", "{readiness}");
    assert!(
        hello["message"]
            .as_str()
            .unwrap()
            .starts_with("scheduled: runs at "),
        "{hello}"
    );

    let done = env
        .api
        .wait_for_task(
            task.task_id,
            &[TaskStatus::Complete],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let started = done.step("hello").started_at.expect("started");
    assert!(started >= run_at, "started {started}, due {run_at}");

    // A time already past runs at once.
    let past = (Utc::now() - TimeDelta::minutes(5)).to_rfc3339();
    let task = env
        .api
        .create_task(&json!({"namespace": "later", "name": "greet", "run_at": past}))
        .await
        .unwrap();
    assert_eq!(task.status, TaskStatus::InProgress);
    env.api
        .wait_for_task(
            task.task_id,
            &[TaskStatus::Complete],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_task_past_its_deadline_ends_in_error_and_a_retry_runs_it_again() {
    let mut env = TestEnv::start("time-deadline").await.unwrap();
    for template in [SLOW, SLOW_WITH_TIMEOUT] {
        let (status, body) = env.register_template(template).await.unwrap();
        assert_eq!(status, 201, "{body}");
    }
    let (_connection, mut events) = tasker_tests::subscribe_events(&env.prefix, "task.failed")
        .await
        .unwrap();
    env.start_worker("later", &["later"]).await.unwrap();

    // One ends by its template's timeout, the other by its creation's deadline; both
    // while their 4-second step runs.
    let by_timeout = env
        .api
        .create_task(&json!({"namespace": "later", "name": "slow_timeout"}))
        .await
        .unwrap();
    let deadline = Utc::now() + TimeDelta::milliseconds(1500);
    let by_deadline = env
        .api
        .create_task(&json!({"namespace": "later", "name": "slow",
                              "deadline": deadline.to_rfc3339()}))
        .await
        .unwrap();
    assert!(by_timeout.deadline_at.is_some());
    assert_eq!(
        by_deadline.deadline_at.map(|at| at.timestamp_millis()),
        Some(deadline.timestamp_millis())
    );
    let mut failed = Vec::new();
    for task in [&by_timeout, &by_deadline] {
        let ended = env
            .api
            .wait_for_task(task.task_id, &[TaskStatus::Error], Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(ended.step("first").status, StepStatus::Complete);
        assert_eq!(ended.step("nap").status, StepStatus::Cancelled);
        // Within the sweep interval (500 ms here), well before the step would have ended.
        let late = ended.completed_at.unwrap() - ended.deadline_at.unwrap();
        assert!(
            late < TimeDelta::seconds(2),
            "ended {late} after its deadline"
        );
        let history = crate::task_history(&env.pool, task.task_id).await;
        assert_eq!(
            history.last().map(String::as_str),
            Some("deadline_exceeded")
        );
        let steps = crate::step_history(&env.pool, task.task_id).await;
        let (_, _, to, reason, _) = steps.last().unwrap();
        assert_eq!(
            (to.as_str(), reason.as_str()),
            ("cancelled", "deadline_exceeded")
        );
        failed.push(task.task_id);
    }
    for _ in 0..2 {
        let delivery = tokio::time::timeout(
            Duration::from_secs(30),
            futures::StreamExt::next(&mut events),
        )
        .await
        .expect("a task.failed event")
        .unwrap()
        .unwrap();
        let event: Value = serde_json::from_slice(&delivery.data).unwrap();
        assert_eq!(event["reason"], "deadline_exceeded", "{event}");
        let id: uuid::Uuid = serde_json::from_value(event["task_id"].clone()).unwrap();
        assert!(failed.contains(&id), "{event}");
    }

    // A retry gives the cancelled step back and lifts the deadline: it runs to the end.
    let response = env
        .http
        .post(format!(
            "{}/v1/tasks/{}/retry",
            env.base_url, by_deadline.task_id
        ))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let retried: Value = response.json().await.unwrap();
    assert_eq!(retried["deadline_at"], Value::Null, "{retried}");
    let done = env
        .api
        .wait_for_task(
            by_deadline.task_id,
            &[TaskStatus::Complete],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(done.step("nap").status, StepStatus::Complete);
    env.finish().await.unwrap();
}

#[tokio::test]
async fn bad_times_are_refused_naming_the_field() {
    let env = TestEnv::start("time-bad").await.unwrap();
    let (status, body) = env
        .register_template("namespace: later\nname: bad\ntimeout: 30x\nsteps:\n  - {name: a, handler: tasker.noop}\n")
        .await
        .unwrap();
    assert_eq!(status, 422, "{body}");
    let detail = &body["error"]["details"][0];
    assert_eq!(detail["path"], "timeout", "{body}");
    assert_eq!(detail["code"], "invalid_value", "{body}");

    let (status, body) = env.register_template(GREET).await.unwrap();
    assert_eq!(status, 201, "{body}");
    let past = (Utc::now() - TimeDelta::minutes(1)).to_rfc3339();
    let soon = (Utc::now() + TimeDelta::minutes(10)).to_rfc3339();
    let later = (Utc::now() + TimeDelta::minutes(20)).to_rfc3339();
    for (request, paths) in [
        (json!({"run_at": soon, "delay_ms": 1000}), vec!["delay_ms"]),
        (
            json!({"run_at": "tomorrow", "delay_ms": -1}),
            vec!["run_at", "delay_ms"],
        ),
        (json!({"deadline": past}), vec!["deadline"]),
        (json!({"run_at": later, "deadline": soon}), vec!["deadline"]),
        (json!({"delay_ms": 40_000_000_000_i64}), vec!["delay_ms"]),
    ] {
        let mut body = json!({"namespace": "later", "name": "greet"});
        for (key, value) in request.as_object().unwrap() {
            body[key] = value.clone();
        }
        let (status, answer) = env.create_task(body.clone()).await.unwrap();
        assert_eq!(status, 422, "{body} → {answer}");
        assert_eq!(answer["error"]["code"], "invalid_request");
        let found = crate::detail_paths(&answer);
        assert_eq!(found, paths, "{body} → {answer}");
    }
    assert_eq!(crate::task_count(&env.pool).await, 0);
    env.finish().await.unwrap();
}

#[tokio::test]
async fn resolving_a_failed_step_of_a_task_past_its_deadline_runs_what_the_deadline_cancelled() {
    let mut env = TestEnv::start("time-deadline-resolve").await.unwrap();
    let (status, body) = env
        .register_template("namespace: later\nname: half\nsteps:\n  - {name: boom, handler: tasker.fail, retry_limit: 1, config: {kind: permanent}}\n  - {name: nap, handler: tasker.sleep, config: {ms: 3000}}\n")
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    env.start_worker("later", &["later"]).await.unwrap();
    let deadline = Utc::now() + TimeDelta::milliseconds(1000);
    let task = env
        .api
        .create_task(&json!({"namespace": "later", "name": "half",
                              "deadline": deadline.to_rfc3339()}))
        .await
        .unwrap();
    let ended = env
        .api
        .wait_for_task(task.task_id, &[TaskStatus::Error], Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(ended.step("boom").status, StepStatus::Error);
    assert_eq!(ended.step("nap").status, StepStatus::Cancelled);

    // Resolving `boom` runs the task on: `nap` again, without the deadline.
    let (status, body) = env
        .post(
            &format!("/v1/tasks/{}/steps/boom/resolve", task.task_id),
            json!({"results": {"ok": true}}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let done = env
        .api
        .wait_for_task(
            task.task_id,
            &[TaskStatus::Complete],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(done.deadline_at, None);
    assert_eq!(done.step("nap").status, StepStatus::Complete);
    let reasons: Vec<String> = crate::step_history(&env.pool, task.task_id)
        .await
        .into_iter()
        .filter(|(name, ..)| name == "nap")
        .map(|(_, _, _, reason, _)| reason)
        .collect();
    assert!(
        reasons.ends_with(&[
            "deadline_exceeded".to_owned(),
            "step_resolved".to_owned(),
            "dispatched".to_owned(),
            "started".to_owned(),
            "succeeded".to_owned()
        ]),
        "{reasons:?}"
    );
    env.finish().await.unwrap();
}
