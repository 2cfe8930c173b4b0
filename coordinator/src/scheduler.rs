//! The scheduler: creates the tasks of schedules whose fire time came.
//!
//! Every coordinator runs one. It sleeps until the earliest `next_fire_at` (at most
//! [`IDLE`], to see schedules other coordinators wrote; this coordinator's API wakes it),
//! then, one schedule per transaction, locks a due schedule, skipping those another
//! coordinator holds, and for each fire time due (the [`plan`] of its `catch_up`)
//! creates a task with the idempotency key `schedule:<name>:<fire time>` (skipping or
//! cancelling a previous task that still runs, as its `overlap` says), records the
//! fires and moves `next_fire_at` past now. A coordinator that dies mid-way leaves the
//! row to the next one, whose creations find the tasks already made: one task per fire
//! time. A transaction per schedule keeps a failure to that schedule (the fires of those
//! before it stay recorded with the tasks they made) and holds no lock or history id
//! across other schedules' creations.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::json;
use sqlx::Connection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::http::AppState;
use crate::metrics::{CoordinatorMetrics, ScheduleLabel, ScheduleReason};
use crate::operations::{self, Effects};
use crate::service::Service;
use tasker_shared::schedule::{Schedule, plan};
use tasker_shared::states::{Overlap, TaskStatus};
use tasker_shared::store::schedules::{self, FireOutcome, ScheduleRecord, idempotency_key};
use tasker_shared::store::tasks::{Created, Creation, NewTask};
use tasker_shared::template::Problem;

/// Most schedules fired in one round (each in a transaction of its own).
const BATCH: usize = 100;
/// The longest sleep: how soon a schedule another coordinator wrote is seen.
pub(crate) const IDLE: Duration = Duration::from_secs(5);
/// The pause when due schedules are all held by another coordinator.
const HELD_ELSEWHERE: Duration = Duration::from_millis(50);

pub(crate) struct Scheduler {
    pub(crate) state: AppState,
    /// How late a fire time may be and still count as on time.
    pub(crate) grace: TimeDelta,
    /// Woken when this coordinator's API changes a schedule.
    pub(crate) wake: Arc<Notify>,
    /// Lifecycle events are on: fires the events relay has not published are kept past
    /// the last hundred.
    pub(crate) keep_unrelayed: bool,
}

impl Service for Scheduler {
    const NAME: &'static str = "scheduler";

    async fn run(self, stop: CancellationToken) {
        let span = tracing::info_span!("scheduler");
        async move {
            tracing::info!("started");
            loop {
                let sleep = match self.step().await {
                    Ok(sleep) => sleep,
                    Err(error) => {
                        self.state.metrics.database_errors.inc();
                        tracing::warn!(
                            error = format!("{error:#}"),
                            "scheduling failed; retrying shortly"
                        );
                        Duration::from_secs(1)
                    }
                };
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(sleep) => {}
                }
            }
            tracing::info!("stopped");
        }
        .instrument(span)
        .await
    }
}

impl Scheduler {
    /// Fire what is due; returns how long to sleep.
    async fn step(&self) -> anyhow::Result<Duration> {
        // The database's clock, which decides what is due, decides when too: a
        // coordinator's clock ahead of it would find every fire late.
        let due = self
            .state
            .db
            .run(async |conn| schedules::next_due(conn).await)
            .await?;
        let Some((next, now)) = due else {
            return Ok(IDLE);
        };
        if next > now {
            return Ok((next - now).to_std().unwrap_or_default().min(IDLE));
        }
        Ok(match self.fire_due().await? {
            0 => HELD_ELSEWHERE,
            _ => Duration::ZERO,
        })
    }

    /// Fire the due schedules, one transaction each; returns how many there were. One
    /// that fails is left for the next round, and the others are fired meanwhile (the
    /// one failing, due first, would otherwise hold back every one behind it).
    async fn fire_due(&self) -> anyhow::Result<usize> {
        let mut fired = 0;
        let mut failed: Vec<String> = Vec::new();
        let mut first_error = None;
        while fired + failed.len() < BATCH {
            match self.fire_one(&failed).await {
                Ok(Some(_)) => fired += 1,
                Ok(None) => break,
                // Nothing locked: the database itself failed.
                Err((None, error)) => return Err(error),
                Err((Some(name), error)) => {
                    tracing::warn!(schedule = %name, error = format!("{error:#}"),
                        "firing a schedule failed; trying it again shortly");
                    failed.push(name);
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) if fired == 0 => Err(error),
            _ => Ok(fired + failed.len()),
        }
    }

    /// Lock one due schedule (not one of `except`) and fire it; its name, or `None` when
    /// none is due that another coordinator does not hold. A failure names the schedule
    /// when one was locked. The whole fire, its tasks' creation and first publishes
    /// included, is bounded by the database's patience: the schedule's row stays locked
    /// until the fire commits, and a fire abandoned is fired again into the tasks it
    /// made, found by their idempotency keys.
    async fn fire_one(
        &self,
        except: &[String],
    ) -> Result<Option<String>, (Option<String>, anyhow::Error)> {
        let mut locked = None;
        let fired = self
            .state
            .db
            .run(async |conn| {
                let mut tx = conn.begin().await?;
                let Some(record) = schedules::lock_due(&mut tx, 1, except).await?.pop() else {
                    return anyhow::Ok(false);
                };
                locked = Some(record.fields.name.clone());
                self.fire_locked(tx, record).await?;
                Ok(true)
            })
            .await;
        match fired {
            Ok(true) => Ok(locked),
            Ok(false) => Ok(None),
            Err(error) => Err((locked, error)),
        }
    }

    /// Fire a locked schedule, record its fires and commit.
    async fn fire_locked(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        record: ScheduleRecord,
    ) -> anyhow::Result<()> {
        // Counted once the fires are committed: a schedule tried again counts once.
        let mut counts = Vec::new();
        // The database's clock, as in `step`, read once the schedule is locked (at or
        // after the `now()` that found it due).
        let now = schedules::database_now(&mut tx).await?;
        match Schedule::parse(&record.fields.cron, &record.fields.timezone) {
            Ok(schedule) => {
                let from = record.next_fire_at.unwrap_or(now);
                let times = schedule.due(from, now);
                let fires = self
                    .fire(&mut tx, &record, &times, now, &mut counts)
                    .await?;
                schedules::record_fires(
                    &mut tx,
                    &record.fields.name,
                    &fires,
                    schedule.next_after(now),
                    self.keep_unrelayed,
                )
                .await?;
            }
            Err(problems) => {
                // Checked when written; a schedule that no longer parses stops.
                tracing::error!(schedule = %record.fields.name, ?problems, "schedule cannot be read; it stops");
                schedules::record_fires(
                    &mut tx,
                    &record.fields.name,
                    &[],
                    None,
                    self.keep_unrelayed,
                )
                .await?;
            }
        }
        tx.commit().await?;
        let metrics = &self.state.metrics;
        for count in counts {
            let schedule = match &count {
                Count::Fired { schedule, .. } | Count::Skipped { schedule, .. } => schedule,
            };
            metrics
                .schedules_counted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(schedule.clone());
            match count {
                Count::Fired { schedule, lateness } => {
                    metrics
                        .schedule_fires
                        .get_or_create(&ScheduleLabel { schedule })
                        .inc();
                    metrics.schedule_lateness.observe(lateness);
                }
                Count::Skipped { schedule, reason } => {
                    metrics
                        .schedule_skips
                        .get_or_create(&ScheduleReason {
                            schedule,
                            reason: reason.to_owned(),
                        })
                        .inc();
                }
            }
        }
        Ok(())
    }

    /// Fire a locked schedule's due `times`, as its `catch_up` and `overlap` say.
    async fn fire(
        &self,
        tx: &mut sqlx::PgConnection,
        record: &ScheduleRecord,
        times: &[DateTime<Utc>],
        now: DateTime<Utc>,
        counts: &mut Vec<Count>,
    ) -> anyhow::Result<Vec<(DateTime<Utc>, FireOutcome)>> {
        let clock = std::time::Instant::now();
        let since = |now: DateTime<Utc>, at: DateTime<Utc>| {
            (now - at).as_seconds_f64().max(0.0) + clock.elapsed().as_secs_f64()
        };
        let mut previous = match record.fields.overlap {
            Overlap::Allow => None,
            _ => schedules::previous_task(&mut *tx, &record.fields.name).await?,
        };
        let planned = plan(times, now, self.grace, record.fields.catch_up);
        // A missed time may have its task already, made by a fire that did not commit.
        let missed: Vec<DateTime<Utc>> = planned
            .iter()
            .filter(|(_, runs)| !runs)
            .map(|(at, _)| *at)
            .collect();
        let made = schedules::tasks_fired(
            &mut *tx,
            (&record.fields.namespace, &record.fields.template),
            &record.fields.name,
            &missed,
        )
        .await?;
        let mut fires = Vec::with_capacity(times.len());
        for (at, runs) in planned {
            if let Some(&(task, status)) = made.get(&at) {
                counts.push(Count::Fired {
                    schedule: record.fields.name.clone(),
                    lateness: since(now, at),
                });
                previous = Some((task, status));
                fires.push((at, FireOutcome::Fired(task)));
                continue;
            }
            if !runs {
                counts.push(skipped(record, at, SKIP_MISSED));
                fires.push((at, FireOutcome::Missed));
                continue;
            }
            if let Some((task, _)) = previous.filter(|(_, status)| !status.is_finished()) {
                match record.fields.overlap {
                    Overlap::Skip => {
                        counts.push(skipped(record, at, SKIP_OVERLAP));
                        fires.push((at, FireOutcome::Skipped));
                        continue;
                    }
                    Overlap::CancelPrevious => self.cancel(record, task).await,
                    Overlap::Allow => {}
                }
            }
            // A database or overload error leaves the whole batch to the next try (the
            // tasks made meanwhile are found again by their keys); a refusal is for good.
            match self.create(record, at).await? {
                Ok(task) => {
                    counts.push(Count::Fired {
                        schedule: record.fields.name.clone(),
                        lateness: since(now, at),
                    });
                    tracing::info!(schedule = %record.fields.name, fire_at = %at, task_id = %task, "schedule fired");
                    previous = Some((task, TaskStatus::Pending));
                    fires.push((at, FireOutcome::Fired(task)));
                }
                Err(refused) => {
                    tracing::warn!(schedule = %record.fields.name, fire_at = %at, error = %refused,
                        "schedule fired no task");
                    counts.push(skipped(record, at, SKIP_FAILED));
                    fires.push((at, FireOutcome::Failed));
                }
            }
        }
        Ok(fires)
    }

    /// Cancel the previous fire's task (`overlap: cancel_previous`).
    async fn cancel(&self, record: &ScheduleRecord, task: Uuid) {
        let reason = format!(
            "schedule {} fired again (overlap: cancel_previous)",
            record.fields.name
        );
        match operations::cancel_task(
            self.state.db.pool(),
            task,
            Some(&reason),
            self.state.publisher.lease_ms(),
        )
        .await
        {
            Ok((_, effects)) => effects.apply(&self.state).await,
            // Finished meanwhile: nothing to cancel.
            Err(error) => {
                tracing::debug!(schedule = %record.fields.name, %task, %error, "previous task not cancelled")
            }
        }
    }

    /// Create the task of `record` for the fire time `at` (or find the one created
    /// before, by its idempotency key). The inner error is a refusal that trying again
    /// would not change (the template gone, the context refused); the outer one is not.
    async fn create(
        &self,
        record: &ScheduleRecord,
        at: DateTime<Utc>,
    ) -> anyhow::Result<Result<Uuid, String>> {
        let state = &self.state;
        let new = Arc::new(NewTask {
            context: record.fields.context.clone(),
            initiator: Some(format!("schedule:{}", record.fields.name)),
            reason: Some(format!(
                "schedule {} at {}",
                record.fields.name,
                at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            )),
            tags: json!([format!("schedule:{}", record.fields.name)]),
            idempotency_key: Some(idempotency_key(&record.fields.name, at)),
            ..NewTask::default()
        });
        let claim = state
            .publisher
            .connected()
            .then(|| state.publisher.lease_ms());
        let mut checked = true;
        loop {
            let resolved = if checked {
                state
                    .templates
                    .resolve(
                        state.db.pool(),
                        &record.fields.namespace,
                        &record.fields.template,
                        record.fields.version.as_deref(),
                    )
                    .await?
            } else {
                state
                    .templates
                    .reload(
                        state.db.pool(),
                        &record.fields.namespace,
                        &record.fields.template,
                        record.fields.version.as_deref(),
                    )
                    .await?
            };
            let Some(resolved) = resolved else {
                return Ok(Err(format!(
                    "no template {}/{}{}",
                    record.fields.namespace,
                    record.fields.template,
                    record
                        .fields
                        .version
                        .as_deref()
                        .map(|v| format!(" {v}"))
                        .unwrap_or_default()
                )));
            };
            let template = resolved.template;
            if let Err(problems) = template.definition.validate_context(&new.context) {
                return Ok(Err(format!(
                    "the context breaks the template's schema: {}",
                    Problem::listed(&problems)
                )));
            }
            let versions_known = resolved.versions_known.filter(|_| checked);
            let creation = match Creation::new(template.clone(), new.clone(), claim, versions_known)
            {
                Ok(creation) => creation,
                Err(problems) => {
                    return Ok(Err(format!(
                        "the template refused the task: {}",
                        Problem::listed(&problems)
                    )));
                }
            };
            match state.creator.create(creation).await? {
                Created::TemplateChanged if checked => checked = false,
                Created::TemplateChanged => anyhow::bail!("the template's versions kept changing"),
                Created::Existing(task) => return Ok(Ok(task.task_id)),
                Created::New(task, _, dispatches) => {
                    let leaves_work = template.definition.first_steps_leave_work();
                    let task_id = task.task_id;
                    Effects::created(&task, dispatches, leaves_work)
                        .apply(state)
                        .await;
                    return Ok(Ok(task_id));
                }
            }
        }
    }
}

/// A fire's metrics, counted after its transaction committed.
enum Count {
    /// A task created, this late after its fire time (seconds).
    Fired { schedule: String, lateness: f64 },
    /// A fire time that created none, and why (`missed`, `overlap`, `failed`).
    Skipped {
        schedule: String,
        reason: &'static str,
    },
}

/// Why a fire time created no task (`tasker_schedule_skips_total{reason}`).
const SKIP_MISSED: &str = "missed";
const SKIP_OVERLAP: &str = "overlap";
const SKIP_FAILED: &str = "failed";

/// Forget the metric series of the deleted schedule `name`: schedules made and deleted
/// by the thousand (one per customer) must not grow `/metrics` until a restart. The
/// coordinator that deletes one forgets it at once; the others at their gauges' next
/// refresh ([`forget_deleted_schedules`]).
pub(crate) fn forget_schedule(metrics: &CoordinatorMetrics, name: &str) {
    metrics
        .schedules_counted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(name);
    metrics.schedule_fires.remove(&ScheduleLabel {
        schedule: name.to_owned(),
    });
    for reason in [SKIP_MISSED, SKIP_OVERLAP, SKIP_FAILED] {
        metrics.schedule_skips.remove(&ScheduleReason {
            schedule: name.to_owned(),
            reason: reason.to_owned(),
        });
    }
}

/// Log a fire time that created no task, and its count.
fn skipped(record: &ScheduleRecord, at: DateTime<Utc>, reason: &'static str) -> Count {
    tracing::info!(schedule = %record.fields.name, fire_at = %at, reason, "schedule skipped a fire time");
    Count::Skipped {
        schedule: record.fields.name.clone(),
        reason,
    }
}

/// Forget the series of the schedules counted here that no longer exist (deleted through
/// another coordinator, or by one whose fire committed after the delete was seen).
pub(crate) async fn forget_deleted_schedules(
    conn: &mut sqlx::PgConnection,
    metrics: &CoordinatorMetrics,
) -> sqlx::Result<()> {
    let counted: Vec<String> = metrics
        .schedules_counted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .cloned()
        .collect();
    if counted.is_empty() {
        return Ok(());
    }
    let existing: std::collections::HashSet<String> =
        sqlx::query_scalar("SELECT name FROM schedules WHERE name = ANY($1)")
            .bind(&counted)
            .fetch_all(conn)
            .await?
            .into_iter()
            .collect();
    for name in counted.iter().filter(|name| !existing.contains(*name)) {
        forget_schedule(metrics, name);
    }
    Ok(())
}
