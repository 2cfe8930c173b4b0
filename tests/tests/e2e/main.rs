//! End-to-end tests: the coordinator (in the test process unless a test needs it as a
//! process), `tasker-worker` processes, real PostgreSQL, real RabbitMQ. Each test has its
//! own database and queue prefix (see `tasker_tests::TestEnv`).

mod analytics;
mod auth;
mod batches;
mod child_tasks;
mod conditions;
mod console;
mod coordinators;
mod creation;
mod dags;
mod failures;
mod fan_out;
mod flow_control;
mod hostile;
mod observability;
mod operator;
mod poison;
mod queues;
mod reconnect;
mod redispatch;
mod retention;
mod schedules;
mod settings;
mod signing;
mod tasker_engine;
mod templates;
mod time;
mod triggers;
mod validation;
mod waits;
mod workers;

use std::collections::HashMap;
use std::fmt::Display;

use serde_json::Value;
use sqlx::PgPool;

/// Step transitions of a task: (step name, from, to, reason, metadata), in order.
pub(crate) async fn step_history(
    pool: &PgPool,
    task_id: impl Display,
) -> Vec<(String, Option<String>, String, String, Value)> {
    sqlx::query_as(
        "SELECT s.name, t.from_status, t.to_status, t.reason, t.metadata
         FROM step_transitions t JOIN steps s USING (step_id)
         WHERE t.task_id = $1::uuid ORDER BY t.transition_id",
    )
    .bind(task_id.to_string())
    .fetch_all(pool)
    .await
    .expect("step history")
}

/// A task's readiness (`GET /v1/tasks/{id}/readiness`).
pub(crate) async fn readiness(env: &tasker_tests::TestEnv, task_id: uuid::Uuid) -> Value {
    env.get(&format!("/v1/tasks/{task_id}/readiness"))
        .await
        .unwrap()
        .1
}

/// Wait (up to a minute) until the step `name` of the task has readiness `reason`.
pub(crate) async fn until_reason(
    env: &tasker_tests::TestEnv,
    task_id: uuid::Uuid,
    name: &str,
    reason: &str,
) -> Value {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let r = readiness(env, task_id).await;
        if let Some(step) = r["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name && s["reason"] == reason)
        {
            return step.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never {reason}: {r}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The task once it finished (`complete`, `error` or `cancelled`), within `timeout`.
/// The ids of the tasks of a `GET /v1/tasks` page, in its order.
pub(crate) fn listed_ids(page: &Value) -> Vec<String> {
    page["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task_id"].as_str().unwrap().to_owned())
        .collect()
}

pub(crate) async fn finished(
    env: &tasker_tests::TestEnv,
    task_id: uuid::Uuid,
    timeout: std::time::Duration,
) -> tasker_tests::Task {
    use tasker_tests::TaskStatus;
    env.api
        .wait_for_task(
            task_id,
            &[
                TaskStatus::Complete,
                TaskStatus::Error,
                TaskStatus::Cancelled,
            ],
            timeout,
        )
        .await
        .unwrap()
}

/// Create two tasks with `body` and wait (up to a minute each) until both completed:
/// when the first one's last step ended, and the second one.
pub(crate) async fn two_in_a_row(
    env: &tasker_tests::TestEnv,
    body: &Value,
) -> (chrono::DateTime<chrono::Utc>, tasker_tests::Task) {
    let minute = std::time::Duration::from_secs(60);
    let first = env.api.create_task(body).await.unwrap();
    let second = env.api.create_task(body).await.unwrap();
    let first = finished(env, first.task_id, minute).await;
    let second = finished(env, second.task_id, minute).await;
    for task in [&first, &second] {
        assert_eq!(task.status, tasker_tests::TaskStatus::Complete, "{task:?}");
    }
    let first_end = first
        .steps
        .iter()
        .filter_map(|s| s.completed_at)
        .max()
        .unwrap();
    (first_end, second)
}

/// The (path, code) of each problem an error answer lists.
pub(crate) fn problems(body: &Value) -> Vec<(&str, &str)> {
    body["error"]["details"]
        .as_array()
        .unwrap_or_else(|| panic!("no details in {body}"))
        .iter()
        .map(|p| (p["path"].as_str().unwrap(), p["code"].as_str().unwrap()))
        .collect()
}

/// The path of each problem an error answer lists, in its order.
pub(crate) fn detail_paths(body: &Value) -> Vec<String> {
    body["error"]["details"]
        .as_array()
        .unwrap_or_else(|| panic!("no details in {body}"))
        .iter()
        .map(|d| {
            d["path"]
                .as_str()
                .unwrap_or_else(|| panic!("a problem without a path in {body}"))
                .to_owned()
        })
        .collect()
}

/// How many tasks the database holds.
pub(crate) async fn task_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(pool)
        .await
        .expect("task count")
}

/// The reasons of a task's own transitions, in order.
pub(crate) async fn task_history(pool: &PgPool, task_id: impl Display) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT reason FROM task_transitions WHERE task_id = $1::uuid ORDER BY transition_id",
    )
    .bind(task_id.to_string())
    .fetch_all(pool)
    .await
    .expect("task history")
}

/// The steps of a task JSON by name.
pub(crate) fn steps_by_name(task: &Value) -> HashMap<String, Value> {
    task["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_owned(), s.clone()))
        .collect()
}
