//! Analytics from the stored tasks and steps: per template, per step, and a template's
//! critical path, over a time window.
//!
//! Task ids are UUIDv7, so a window of creation times is a range of ids: every query
//! reads `tasks_by_template` (namespace, name, task id) over that range only, then each
//! task's steps by `steps_by_task`. The figures come from the newest [`MAX_CONSIDERED`]
//! tasks of a template in the window (the answer says how many it considered, and how
//! many the window holds), and the steps' from at most [`MAX_STEPS_CONSIDERED`] of their
//! steps, so a call's cost is bounded whatever the window holds. A window is half open:
//! a task created at `until` counts in the window that starts there, not in this one.
//! Percentiles are exact (`percentile_cont` over those rows), not estimates.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::template::TemplateDefinition;

/// The most tasks of one template whose figures a call reads: the newest of the window.
pub const MAX_CONSIDERED: i64 = 5_000;
/// The most step rows a call about a template's steps reads, from its newest tasks on: a
/// fan-out's instances are steps, and 5,000 tasks of 10,000 instances each would be 50
/// million rows.
pub const MAX_STEPS_CONSIDERED: i64 = 100_000;

/// The 50th, 95th and 99th percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Percentiles {
    fn of(values: Option<Vec<Option<f64>>>) -> Option<Self> {
        let values = values?;
        match values.as_slice() {
            [Some(p50), Some(p95), Some(p99)] => Some(Percentiles {
                p50: round(*p50),
                p95: round(*p95),
                p99: round(*p99),
            }),
            _ => None,
        }
    }
}

/// One template's tasks in a window.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TemplateStats {
    /// Namespace.
    pub namespace: String,
    /// Template name (every version).
    pub name: String,
    /// Tasks created in the window.
    pub tasks: i64,
    /// The newest of them that the other figures come from (all of them, up to 5,000).
    pub considered: i64,
    /// Since when: the creation time of the oldest task considered.
    pub considered_since: Option<DateTime<Utc>>,
    /// Of those considered, complete.
    pub complete: i64,
    /// In error.
    pub error: i64,
    /// Cancelled.
    pub cancelled: i64,
    /// Creation to completion of the complete ones (none when there is none).
    pub duration_ms: Option<Percentiles>,
    /// Tasks considered that finished (complete or error) per minute, from the oldest
    /// considered to the end of the window.
    pub throughput_per_min: f64,
}

/// One step of a template in a window.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StepStats {
    /// The step's name (a fan-out's instances count for it).
    pub step: String,
    /// Steps that ran (at least one attempt).
    pub runs: i64,
    /// Attempts per step that ran.
    pub mean_attempts: Option<f64>,
    /// Of the finished ones, the share in `error`.
    pub error_rate: Option<f64>,
    /// Of those that ran, the share that needed more than one attempt.
    pub retry_rate: Option<f64>,
    /// The last attempt's start to completion, of the complete ones.
    pub run_ms: Option<Percentiles>,
    /// Ready to started (ready: its parents were done, or its backoff was over).
    pub wait_ms: Option<Percentiles>,
    /// Mean ready to done of the complete ones.
    #[serde(skip)]
    pub mean_done_ms: Option<f64>,
    #[serde(skip)]
    position: i32,
}

/// One step of a critical path.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PathStep {
    /// The step.
    pub step: String,
    /// Its mean time from ready to done, in milliseconds.
    pub mean_ms: f64,
    /// Its share of the path's total.
    pub share: f64,
}

/// The window of creation times as a range of UUIDv7 task ids: from the first id of
/// `since`'s millisecond (included) to the first of `until`'s (excluded), so that windows
/// placed end to end count each task once.
pub fn id_range(since: DateTime<Utc>, until: DateTime<Utc>) -> (Uuid, Uuid) {
    let floor = |ms: i64| {
        let ms = ms.max(0) as u64;
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        Uuid::from_bytes(bytes)
    };
    (
        floor(since.timestamp_millis()),
        floor(until.timestamp_millis()),
    )
}

/// Per template of `namespace` (every namespace when `None`), the tasks created from
/// `since` to `until`.
pub async fn templates(
    pool: &PgPool,
    namespace: Option<&str>,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> sqlx::Result<Vec<TemplateStats>> {
    let (from, to) = id_range(since, until);
    type Row = (
        String,
        String,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        Option<Uuid>,
        Option<Vec<Option<f64>>>,
    );
    let rows: Vec<Row> = sqlx::query_as(include_str!("../../sql/analytics/templates.sql"))
        .bind(namespace)
        .bind(from)
        .bind(to)
        .bind(MAX_CONSIDERED)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(
            |(
                namespace,
                name,
                tasks,
                considered,
                complete,
                error,
                cancelled,
                finished,
                oldest,
                duration,
            )| {
                // All of the window, or from the oldest task considered on.
                let from = match oldest.and_then(created_at) {
                    Some(at) if considered < tasks => at.max(since),
                    _ => since,
                };
                let minutes = ((until - from).num_milliseconds() as f64 / 60_000.0).max(1.0 / 60.0);
                TemplateStats {
                    namespace,
                    name,
                    tasks,
                    considered,
                    considered_since: Some(from),
                    complete,
                    error,
                    cancelled,
                    duration_ms: Percentiles::of(duration),
                    throughput_per_min: round4(finished as f64 / minutes),
                }
            },
        )
        .collect())
}

/// Per step of template `namespace`/`name`, over its tasks created from `since` to
/// `until`, in template order.
pub async fn steps(
    pool: &PgPool,
    namespace: &str,
    name: &str,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> sqlx::Result<Vec<StepStats>> {
    let (from, to) = id_range(since, until);
    type Row = (
        String,
        i32,
        i64,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<Vec<Option<f64>>>,
        Option<Vec<Option<f64>>>,
        Option<f64>,
    );
    let rows: Vec<Row> = sqlx::query_as(include_str!("../../sql/analytics/steps.sql"))
        .bind(namespace)
        .bind(name)
        .bind(from)
        .bind(to)
        .bind(MAX_CONSIDERED)
        .bind(MAX_STEPS_CONSIDERED)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(
            |(step, position, runs, attempts, error_rate, retry_rate, run, wait, done)| StepStats {
                step,
                runs,
                mean_attempts: attempts.map(round),
                error_rate: error_rate.map(round4),
                retry_rate: retry_rate.map(round4),
                run_ms: Percentiles::of(run),
                wait_ms: Percentiles::of(wait),
                mean_done_ms: done,
                position,
            },
        )
        .collect())
}

/// The critical path of `definition` given its steps' figures: the chain of steps, from
/// a first step to a last, with the largest sum of mean ready-to-done times (a step with
/// no complete run counts 0). Returns the path and its total.
pub fn critical_path(definition: &TemplateDefinition, stats: &[StepStats]) -> (Vec<PathStep>, f64) {
    let mean = |name: &str| {
        stats
            .iter()
            .find(|s| s.step == name)
            .and_then(|s| s.mean_done_ms)
            .unwrap_or(0.0)
    };
    let parents = definition.parent_indices();
    let steps = &definition.steps;
    // Longest path ending at each step, parents first.
    let mut best: Vec<(f64, Option<usize>)> = vec![(0.0, None); steps.len()];
    let index: std::collections::HashMap<&str, usize> = steps
        .iter()
        .enumerate()
        .map(|(i, step)| (step.name.as_str(), i))
        .collect();
    for step in definition.topological_order() {
        let i = index[step.name.as_str()];
        let (from, via) = parents[i]
            .iter()
            .map(|&p| (best[p].0, Some(p)))
            .fold((0.0, None), |a, b| if b.0 > a.0 { b } else { a });
        best[i] = (from + mean(&steps[i].name), via);
    }
    let Some(end) = (0..steps.len()).max_by(|&a, &b| best[a].0.total_cmp(&best[b].0)) else {
        return (Vec::new(), 0.0);
    };
    let total = best[end].0;
    let mut path = Vec::new();
    let mut at = Some(end);
    while let Some(i) = at {
        let ms = mean(&steps[i].name);
        path.push(PathStep {
            step: steps[i].name.clone(),
            mean_ms: round(ms),
            share: if total > 0.0 { round4(ms / total) } else { 0.0 },
        });
        at = best[i].1;
    }
    path.reverse();
    (path, round(total))
}

/// The creation time a UUIDv7 carries (its first 48 bits, in milliseconds).
fn created_at(id: Uuid) -> Option<DateTime<Utc>> {
    let bytes = id.as_bytes();
    let mut ms = [0u8; 8];
    ms[2..].copy_from_slice(&bytes[..6]);
    DateTime::from_timestamp_millis(i64::from_be_bytes(ms))
}

fn round(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

fn round4(value: f64) -> f64 {
    (value * 10_000.0).round() / 10_000.0
}

impl StepStats {
    /// Where the step is in its template (for ordering).
    pub fn position(&self) -> i32 {
        self.position
    }
}
