//! Analytics from the stored tasks and steps: per template, per step, the critical path.

use std::time::Duration;

use serde_json::json;
use tasker_tests::{TaskStatus, TestEnv};

/// `slow` sleeps on one branch of a diamond; `flaky` fails once then succeeds.
const SHOP: &str = r#"namespace: stats
name: shop
steps:
  - {name: start, handler: tasker.noop}
  - {name: slow, handler: tasker.sleep, depends_on: [start], config: {ms: 400}}
  - {name: flaky, handler: tasker.fail, depends_on: [start], config: {times: 1}, backoff: {schedule: [0.05]}}
  - {name: end, handler: tasker.noop, depends_on: [slow, flaky]}
"#;

#[tokio::test]
async fn analytics_find_the_slow_step_and_the_retried_one() {
    let mut env = TestEnv::start("analytics").await.unwrap();
    env.register_template(SHOP).await.unwrap();
    env.register_template(
        "namespace: stats\nname: idle\nsteps:\n  - {name: a, handler: tasker.noop}\n",
    )
    .await
    .unwrap();
    env.start_worker("w", &["stats"]).await.unwrap();
    for _ in 0..3 {
        let task = env
            .api
            .create_task(&json!({"namespace": "stats", "name": "shop"}))
            .await
            .unwrap();
        let done = crate::finished(&env, task.task_id, Duration::from_secs(60)).await;
        assert_eq!(done.status, TaskStatus::Complete);
    }

    // The dashboards' histogram of task durations, by template (counted just after each
    // task's commit).
    tasker_tests::wait_for_metric(
        &env.metrics_url(),
        r#"tasker_task_duration_seconds_count{namespace="stats",template="shop",status="complete"}"#,
        3.0,
    )
    .await;
    let (status, body) = env
        .get("/v1/analytics/templates?namespace=stats")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let templates = body["templates"].as_array().unwrap();
    assert_eq!(
        templates.len(),
        1,
        "a template without tasks is left out: {body}"
    );
    let shop = &templates[0];
    assert_eq!(
        (
            shop["name"].clone(),
            shop["tasks"].clone(),
            shop["complete"].clone()
        ),
        (json!("shop"), json!(3), json!(3))
    );
    assert!(
        shop["duration_ms"]["p50"].as_f64().unwrap() >= 400.0,
        "{body}"
    );
    assert!(shop["throughput_per_min"].as_f64().unwrap() > 0.0, "{body}");

    let (status, body) = env
        .get("/v1/analytics/steps?namespace=stats&name=shop")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let steps = body["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(names, ["start", "slow", "flaky", "end"], "template order");
    let slow = &steps[1];
    assert_eq!(slow["runs"], 3);
    assert!(slow["run_ms"]["p50"].as_f64().unwrap() >= 400.0, "{body}");
    assert_eq!(slow["retry_rate"], 0.0);
    let flaky = &steps[2];
    assert_eq!(flaky["mean_attempts"], 2.0, "{body}");
    assert_eq!(flaky["retry_rate"], 1.0, "{body}");
    assert_eq!(flaky["error_rate"], 0.0, "{body}");

    // The critical path goes through the slow branch, which takes most of it.
    let (status, body) = env
        .get("/v1/analytics/bottlenecks?namespace=stats&name=shop")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let path: Vec<&str> = body["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(path, ["start", "slow", "end"], "{body}");
    assert!(body["path"][1]["share"].as_f64().unwrap() > 0.5, "{body}");

    // A window before these tasks holds none; bad parameters are named.
    let (_, body) = env
        .get("/v1/analytics/templates?since=2020-01-01T00:00:00Z&until=2020-01-02T00:00:00Z")
        .await
        .unwrap();
    assert_eq!(body["templates"], json!([]), "{body}");
    let (status, body) = env
        .get("/v1/analytics/steps?namespace=stats&since=yesterday&colour=red")
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    let mut paths = crate::detail_paths(&body);
    paths.sort();
    assert_eq!(paths, ["colour", "name", "since"], "{body}");
    let (status, _) = env
        .get("/v1/analytics/templates?since=2026-01-01T00:00:00Z&until=2026-03-01T00:00:00Z")
        .await
        .unwrap();
    assert_eq!(status, 400, "more than 31 days");
    let (status, body) = env
        .get(&format!(
            "/v1/analytics/templates?namespace={}",
            "n".repeat(129)
        ))
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["details"][0]["path"], "namespace", "{body}");
    let (status, body) = env
        .get("/v1/analytics/bottlenecks?namespace=stats&name=nowhere")
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");
    // A time that cannot be read is the one problem named: no default stands in for it.
    let (status, body) = env
        .get("/v1/analytics/templates?since=2099-01-01T00:00:00Z&until=soon")
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert_eq!(crate::detail_paths(&body), ["until"], "{body}");

    // Windows placed end to end count each task once, the one created at their meeting
    // point included: a window holds its `since`, not its `until`.
    let (_, page) = env
        .get("/v1/tasks?namespace=stats&name=shop&limit=1")
        .await
        .unwrap();
    let newest = uuid::Uuid::parse_str(page["tasks"][0]["task_id"].as_str().unwrap()).unwrap();
    // A UUIDv7 task id holds its creation's millisecond.
    let (seconds, nanos) = newest.get_timestamp().unwrap().to_unix();
    let created = chrono::DateTime::from_timestamp_millis(
        (seconds * 1_000 + u64::from(nanos) / 1_000_000) as i64,
    )
    .unwrap();
    let count = |since: chrono::DateTime<chrono::Utc>, until: chrono::DateTime<chrono::Utc>| {
        let env = &env;
        async move {
            let path = format!(
                "/v1/analytics/templates?namespace=stats&since={}&until={}",
                since.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
                until.format("%Y-%m-%dT%H:%M:%S%.3fZ")
            );
            let (status, body) = env.get(&path).await.unwrap();
            assert_eq!(status, 200, "{body}");
            body["templates"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["name"] == "shop")
                .map_or(0, |t| t["tasks"].as_i64().unwrap())
        }
    };
    let hour = chrono::TimeDelta::hours(1);
    let before = count(created - hour, created).await;
    let after = count(created, created + hour).await;
    assert_eq!(
        (before, after),
        (2, 1),
        "the newest task counts in the later window only"
    );
    env.finish().await.unwrap();
}

/// A fan-out's instances count for their step, and the steps' figures stay bounded by
/// how many step rows are read.
#[tokio::test]
async fn a_fan_outs_instances_count_for_their_step() {
    let mut env = TestEnv::start("analytics-fan-out").await.unwrap();
    env.register_template(
        "namespace: stats\nname: fan\nsteps:\n  - {name: each, handler: tasker.noop, for_each: context.items}\n  - {name: after, handler: tasker.noop, depends_on: [each]}\n",
    )
    .await
    .unwrap();
    env.start_worker("w", &["stats"]).await.unwrap();
    for _ in 0..2 {
        let task = env
            .api
            .create_task(&json!({"namespace": "stats", "name": "fan", "context": {"items": [1, 2, 3, 4, 5]}}))
            .await
            .unwrap();
        let done = crate::finished(&env, task.task_id, Duration::from_secs(60)).await;
        assert_eq!(done.status, TaskStatus::Complete);
    }
    let (status, body) = env
        .get("/v1/analytics/steps?namespace=stats&name=fan")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let runs: Vec<(&str, i64)> = body["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_str().unwrap(), s["runs"].as_i64().unwrap()))
        .collect();
    assert_eq!(runs, [("each", 10), ("after", 2)], "{body}");
    env.finish().await.unwrap();
}
