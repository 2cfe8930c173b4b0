//! A typed client of the coordinator's API (docs/api.md): the task and step objects as
//! structs, so a test reads `task.step("b").attempts` rather than indexing JSON. Tests
//! that check the JSON itself (field names, error bodies) use `TestEnv::get` and friends.

use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use tasker_shared::states::{StepStatus, TaskStatus};
use tokio::sync::watch;
use uuid::Uuid;

/// A task (docs/api.md, "Objects").
#[derive(Debug, Clone, Deserialize)]
pub struct Task {
    pub task_id: Uuid,
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub status: TaskStatus,
    pub priority: i16,
    pub context: Value,
    pub initiator: Option<String>,
    pub source_system: Option<String>,
    pub reason: Option<String>,
    pub tags: Value,
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub run_at: Option<DateTime<Utc>>,
    pub deadline_at: Option<DateTime<Utc>>,
    /// Empty in list pages.
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Absent from the answer to a create.
    pub execution: Option<Value>,
}

impl Task {
    /// The step named `name`.
    ///
    /// # Panics
    ///
    /// When the task has no such step.
    pub fn step(&self, name: &str) -> &Step {
        self.steps
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no step {name} in {self:#?}"))
    }

    /// Whether nothing more happens to it without an operator.
    pub fn finished(&self) -> bool {
        self.status.is_finished()
    }
}

/// A step of a task.
#[derive(Debug, Clone, Deserialize)]
pub struct Step {
    pub step_id: Uuid,
    pub name: String,
    pub handler: String,
    pub status: StepStatus,
    pub attempts: i32,
    pub retry_limit: i32,
    pub deferrals: i32,
    pub retryable: bool,
    pub timeout_ms: i64,
    pub depends_on: Vec<String>,
    pub results: Option<Value>,
    pub last_error: Option<StepError>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    /// A `for_each` step: its list's length, once evaluated.
    #[serde(default)]
    pub instances: Option<i32>,
    /// An instance: its `for_each` step.
    #[serde(default)]
    pub instance_of: Option<String>,
    /// An instance: its element's index.
    #[serde(default)]
    pub index: Option<i32>,
}

/// A step's `last_error`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct StepError {
    /// `retryable`, `permanent`, or `timeout`.
    pub kind: String,
    pub message: String,
    pub code: Option<String>,
}

/// The client of one coordinator.
#[derive(Clone)]
pub struct Api {
    base_url: String,
    http: reqwest::Client,
    /// The coordinator's log, shown when a wait times out.
    log: Option<watch::Receiver<Vec<String>>>,
}

impl Api {
    pub fn new(base_url: impl Into<String>) -> Self {
        Api {
            base_url: base_url.into(),
            http: crate::http_client(),
            log: None,
        }
    }

    /// The same client, showing `log` (if any) when a wait times out.
    pub(crate) fn with_log(mut self, log: Option<watch::Receiver<Vec<String>>>) -> Self {
        self.log = log;
        self
    }

    /// `POST /v1/tasks`: the task created. Any answer but 201 is an error with its body
    /// (a test of idempotency keys, which answer 200, uses `TestEnv::create_task`).
    pub async fn create_task(&self, body: &Value) -> anyhow::Result<Task> {
        let response = self
            .http
            .post(format!("{}/v1/tasks", self.base_url))
            .json(body)
            .send()
            .await?;
        parse(response, &[StatusCode::CREATED]).await
    }

    /// `GET /v1/tasks/{task_id}`.
    pub async fn task(&self, task_id: Uuid) -> anyhow::Result<Task> {
        let response = self
            .http
            .get(format!("{}/v1/tasks/{task_id}", self.base_url))
            .send()
            .await?;
        parse(response, &[StatusCode::OK]).await
    }

    /// Poll the task until `done` holds for it; `what` says what is awaited.
    pub async fn wait_until(
        &self,
        task_id: Uuid,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Task) -> bool,
    ) -> anyhow::Result<Task> {
        poll_until(
            &format!("task {task_id}: {what}"),
            timeout,
            self.log.as_ref(),
            || self.task(task_id),
            done,
            |task| format!("{task:#?}"),
        )
        .await
    }

    /// Poll the task until its status is one of `statuses`.
    pub async fn wait_for_task(
        &self,
        task_id: Uuid,
        statuses: &[TaskStatus],
        timeout: Duration,
    ) -> anyhow::Result<Task> {
        self.wait_until(task_id, &format!("one of {statuses:?}"), timeout, |task| {
            statuses.contains(&task.status)
        })
        .await
    }

    /// Create a task and wait until it is finished (`complete`, `error`, `cancelled`…).
    pub async fn run_task(&self, body: &Value, timeout: Duration) -> anyhow::Result<Task> {
        let task = self.create_task(body).await?;
        self.wait_until(task.task_id, "finishing", timeout, Task::finished)
            .await
    }
}

/// The body of `response` as a `T` when its status is one of `expected`.
async fn parse<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    expected: &[StatusCode],
) -> anyhow::Result<T> {
    let status = response.status();
    let url = response.url().to_string();
    let text = response.text().await?;
    if !expected.contains(&status) {
        bail!("{url} answered {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("{url} answered {text}"))
}

/// Call `fetch` every 25 ms until `done` holds for its answer. After `timeout`, fail
/// naming `what`, with the last answer (as `show` writes it) and the coordinator's log
/// when there is one.
pub(crate) async fn poll_until<T, F>(
    what: &str,
    timeout: Duration,
    log: Option<&watch::Receiver<Vec<String>>>,
    mut fetch: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
    show: impl Fn(&T) -> String,
) -> anyhow::Result<T>
where
    F: Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let answer = fetch().await?;
        if done(&answer) {
            return Ok(answer);
        }
        if tokio::time::Instant::now() > deadline {
            let log = log
                .map(|lines| format!("\ncoordinator log:\n{}", lines.borrow().join("\n")))
                .unwrap_or_default();
            bail!(
                "{what} did not happen in {timeout:?}:\n{}{log}",
                show(&answer)
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
