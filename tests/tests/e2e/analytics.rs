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
    env.finish().await.unwrap();
}
