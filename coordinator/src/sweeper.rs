//! The sweeper: heals lost work by expiring leases.
//!
//! Re-dispatch is only for messages that may be lost:
//! - a step `enqueued` past its dispatch lease was never confirmed by the broker (the
//!   coordinator died between commit and publish, or the publish failed) and is
//!   dispatched again without spending an attempt. A step whose publish was confirmed has
//!   no lease: it is safe in a durable queue, however long the queue is;
//! - a confirmed step whose queue was deleted or lost: each sweep interval compares the
//!   messages that carry the confirmed steps which have waited longer than the dispatch
//!   lease, per namespace, with the namespace's queue ([`lost_in_queue`]). Steps that
//!   travelled together (a batch) need one message; the database records which message
//!   each confirmed step travelled in. A missing queue means every confirmed step of it
//!   is gone. A queue holding fewer messages than those, with what workers may hold, at
//!   two checks in a row, means the oldest of those messages are gone. Their steps have
//!   their lease ended and are dispatched again;
//! - a step `in_progress` past its lease lost its worker and counts as a timed-out
//!   attempt: retried after its backoff, or `error` if that was its last attempt, and
//!   counted in `tasker_step_retries_scheduled_total` or `tasker_steps_finished_total`
//!   as a worker's reported failure would be. Unless its worker is still heard from on
//!   the control exchange and the step is within its timeout plus the lease grace: then
//!   only its heartbeats are late, behind results not yet applied.
//!
//! Each interval it also ends the tasks past their deadline (`error`, reason
//! `deadline_exceeded`, their unfinished steps cancelled) and tells workers that their
//! queued and running dispatches are superseded (a worker aborts such a run), and fails
//! the `tasker.wait` steps past their timeout (`wait_timeout`). And it takes up what a
//! claim that cancelled a task as the oldest of its template's concurrency key
//! (`on_limit: cancel_oldest`) left: the `tasker.task` step that started that task, if a
//! child, is judged, and the task's own unfinished children are cancelled
//! (`parent_cancelled`); one read when there is none.
//!
//! Workers are told which dispatches were replaced (a `superseded` control message), so
//! a copy still queued somewhere is acked without being run, and a run of it is aborted.
//! Tasks left with nothing to run are finished.
//!
//! Running steps' leases are only expired once this coordinator has reached both the
//! database and the broker for a whole heartbeat lease: after an outage, the heartbeats
//! and results that workers sent meanwhile are still in the results queue, and expiring
//! those steps would run them again for nothing. Each interval begins with a probe, a
//! message the broker must confirm ([`StepPublisher::takes_messages`]): while the broker
//! takes nothing (a memory or disk alarm blocks publishers) the sweeper does nothing, and
//! counts the block as an outage: workers' heartbeats and results, and this
//! coordinator's step messages, wait in their clients until it lifts, and arrive then.
//! No lease expires, queued steps' included, until an interval and a heartbeat lease
//! after the probe was last refused: the steps published during the alarm are confirmed
//! once it clears, and their leases lifted seconds later.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::Connection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::control::Control;
use crate::link::BrokerLink;
use crate::metrics::{CoordinatorMetrics, Namespace, count_reason};
use crate::publisher::StepPublisher;
use crate::service::Service;
use tasker_shared::broker::Topology;
use tasker_shared::db::Database;
use tasker_shared::states::TaskStatus;
use tasker_shared::store::transitions::{self, ExpiredTask, FinishedTask, LeasePolicy};

/// Most leases expired per transaction.
const SWEEP_BATCH: i64 = 1_000;

pub(crate) struct Sweeper {
    db: Database,
    metrics: Arc<CoordinatorMetrics>,
    wake_dispatcher: Arc<Notify>,
    wake_events: Arc<Notify>,
    interval: Duration,
    /// Whether the broker is reachable (heartbeats can arrive).
    publisher: Arc<StepPublisher>,
    /// The heartbeat lease, and the grace added to a step's timeout: past both, a running
    /// step's lease expires even while its worker is heard from.
    lease: LeasePolicy,
    /// Since when the database and the broker have both been reachable.
    healthy_since: Mutex<Option<Instant>>,
    /// Until when no lease expires at all, queued steps' included: a heartbeat lease
    /// after the broker last took no message (a memory or disk alarm). The steps
    /// published during the alarm are confirmed once it clears, and their leases lifted
    /// seconds after; until then they look unconfirmed.
    quiet_until: Mutex<Option<Instant>>,
    queues: QueueAudit,
    /// The shortfalls the previous queue audit found: one is acted on only when the next
    /// audit finds it again. A std Mutex: held only to take or put back, never across an
    /// await.
    short: Mutex<Shortfalls>,
}

/// What the sweeper needs to check the step queues and tell workers of superseded
/// dispatches.
pub(crate) struct QueueAudit {
    pub(crate) control: Control,
    pub(crate) broker: Arc<BrokerLink>,
    pub(crate) topology: Topology,
    /// The dispatch lease: confirmed steps that waited longer are compared with their
    /// queue.
    pub(crate) lease_ms: i64,
}

impl Sweeper {
    pub(crate) fn new(
        db: Database,
        metrics: Arc<CoordinatorMetrics>,
        (wake_dispatcher, wake_events): (Arc<Notify>, Arc<Notify>),
        interval: Duration,
        publisher: Arc<StepPublisher>,
        lease: LeasePolicy,
        queues: QueueAudit,
    ) -> Self {
        Sweeper {
            db,
            metrics,
            wake_dispatcher,
            wake_events,
            interval,
            publisher,
            lease,
            // At start, heartbeats sent while no coordinator ran may still be queued.
            healthy_since: Mutex::new(None),
            quiet_until: Mutex::new(None),
            queues,
            short: Mutex::default(),
        }
    }

    /// Expire one batch of leases. Returns how many steps changed.
    pub(crate) async fn sweep_once(&self) -> anyhow::Result<usize> {
        let running = self.heard_workers_lately();
        let swept = self.expire(running).await;
        if swept.is_err() {
            self.set_unhealthy();
        }
        swept
    }

    /// Whether the database and the broker have both been reachable for a heartbeat
    /// lease, so a running step whose lease expired really lost its worker.
    fn heard_workers_lately(&self) -> bool {
        let mut since = self.healthy_since.lock().unwrap_or_else(|p| p.into_inner());
        if !self.publisher.connected() {
            *since = None;
            return false;
        }
        since.get_or_insert_with(Instant::now).elapsed() >= self.heartbeat_lease()
    }

    fn set_unhealthy(&self) {
        *self.healthy_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The broker refused the probe: an outage, and no lease expires for a heartbeat
    /// lease after the next interval.
    fn broker_refused(&self) {
        self.set_unhealthy();
        *self.quiet_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + self.interval + self.heartbeat_lease());
    }

    fn heartbeat_lease(&self) -> Duration {
        Duration::from_millis(self.lease.heartbeat_lease_ms.max(0) as u64)
    }

    /// Compare the messages of confirmed steps that waited longer than the dispatch lease
    /// with their queues, and end the lease of those whose messages are gone (see
    /// [`lost_in_queue`]).
    /// Returns how many steps were handed back.
    async fn audit_queues(&self) -> anyhow::Result<u64> {
        let queues = &self.queues;
        // Put back only by an audit that ran to its end: one that stops early (nothing
        // waits, or an error) leaves none, and the next needs two checks in a row again.
        let mut short = std::mem::take(&mut *self.short.lock().unwrap_or_else(|p| p.into_inner()));
        let waiting = self
            .db
            .run(async |conn| transitions::confirmed_waiting(conn, queues.lease_ms).await)
            .await?;
        if waiting.is_empty() {
            return Ok(0);
        }
        let connection = queues.broker.connection();
        let results = queues
            .topology
            .queue_counts(&connection, &queues.topology.results_queue())
            .await?;
        let workers = queues.control.recent_workers();
        let mut released = 0;
        for (namespace, confirmed) in waiting {
            let queue = queues.topology.step_queue(&namespace);
            let step_queue = queues.topology.queue_counts(&connection, &queue).await?;
            let held_by_workers: u64 = workers
                .iter()
                .filter(|w| w.all_namespaces || w.namespaces.contains(&namespace))
                .map(|w| 2 * u64::from(w.concurrency))
                .sum();
            let found = lost_in_queue(QueueCheck {
                confirmed: u64::try_from(confirmed).unwrap_or(0),
                step_queue,
                held_by_workers,
                results_ready: results.map_or(0, |(ready, _)| ready),
            });
            let Some(lost) = short.confirm(&namespace, found) else {
                continue;
            };
            let older_than_ms = match lost {
                Lost::Missing => {
                    // Declared again, so the steps dispatched again have somewhere to go.
                    let channel = connection.create_channel().await?;
                    queues
                        .topology
                        .declare_namespace(&channel, &namespace)
                        .await?;
                    let _ = channel.close(200, "OK".into()).await;
                    // Every message the queue held is gone, however recent.
                    0
                }
                Lost::Short(_) => queues.lease_ms,
            };
            let limit = match lost {
                Lost::Missing => None,
                Lost::Short(n) => Some(i64::try_from(n).unwrap_or(i64::MAX)),
            };
            let n = self
                .db
                .run(async |conn| {
                    transitions::release_lost_queue(conn, &namespace, older_than_ms, limit).await
                })
                .await?;
            tracing::warn!(%namespace, %queue, reason = lost.reason(), messages = confirmed,
                ?step_queue, steps = n,
                "a step queue lost confirmed messages; dispatching those steps again");
            count_reason(&self.metrics.lost_messages, lost.reason(), n);
            released += n;
        }
        short.end_audit();
        *self.short.lock().unwrap_or_else(|p| p.into_inner()) = short;
        Ok(released)
    }

    /// Tell workers which dispatches were replaced, in messages of at most a thousand.
    async fn announce_superseded(&self, superseded: &[(uuid::Uuid, uuid::Uuid)]) {
        if let Err(error) = self.queues.control.superseded(superseded).await {
            tracing::warn!(
                error = format!("{error:#}"),
                steps = superseded.len(),
                "cannot tell workers of superseded dispatches; their copies will run and their results be dropped"
            );
        }
    }

    async fn expire(&self, running: bool) -> anyhow::Result<usize> {
        // Workers heard from on the control exchange: their running steps' heartbeats may
        // only be late, behind results the coordinators have not applied yet.
        let alive: Vec<String> = self
            .queues
            .control
            .recent_workers()
            .into_iter()
            .map(|worker| worker.worker_id)
            .collect();
        let quiet = self
            .quiet_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| Instant::now() < until);
        let lease_ms = self.queues.lease_ms;
        let grace_ms = self.lease.grace_ms;
        let (late, expired, waits, mut finished) = self
            .db
            .run(async |conn| {
                let mut tx = conn.begin().await?;
                let late = transitions::expire_deadlines(&mut tx, SWEEP_BATCH).await?;
                let expired = if quiet {
                    transitions::ExpiredLeases::default()
                } else {
                    transitions::expire_leases(&mut tx, SWEEP_BATCH, running, (&alive, grace_ms))
                        .await?
                };
                let waits = transitions::expire_waits(&mut tx, SWEEP_BATCH).await?;
                let mut tasks = expired.tasks.clone();
                tasks.extend(&waits);
                // The steps that started children ended here are judged here too.
                let late_children: Vec<uuid::Uuid> = late.iter().map(|task| task.task_id).collect();
                let finished =
                    transitions::finish_and_judge(&mut tx, &tasks, &late_children, Some(lease_ms))
                        .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>((late, expired, waits, finished))
            })
            .await?;
        if !finished.claimed.is_empty() {
            self.publisher
                .dispatch(std::mem::take(&mut finished.claimed), self.metrics.clone())
                .await;
        }
        let finished = finished.tasks;
        self.ended_late(&late).await;
        self.metrics.workers_lost(&expired.lost_workers);
        self.metrics.finished(&finished);
        for (reason, count) in [
            ("lease_lost", expired.requeued.len()),
            ("lease_expired", expired.timed_out),
        ] {
            if count > 0 {
                count_reason(&self.metrics.leases_expired, reason, count as u64);
            }
        }
        let changed = expired.requeued.len() + expired.timed_out + late.len() + waits.len();
        if changed > 0 {
            tracing::info!(
                requeued = expired.requeued.len(),
                timed_out = expired.timed_out,
                tasks_finished = finished.len(),
                "expired leases"
            );
            self.wake_dispatcher.notify_one();
            self.wake_events.notify_one();
        }
        // After the wake: the new dispatches need not wait for this broadcast.
        self.announce_superseded(&expired.requeued).await;
        Ok(changed)
    }
}

impl Sweeper {
    /// What a claim that cancelled a task as the oldest of its template's concurrency key
    /// left undone: cancel its unfinished child tasks ([`transitions::cancel_orphans`]),
    /// and judge the `tasker.task` step that started it, if it is a child
    /// ([`transitions::children_unheard`]); publish what that claims.
    async fn hand_back_children(&self) -> anyhow::Result<()> {
        let lease_ms = self.queues.lease_ms;
        let handed = self
            .db
            .run(async |conn| {
                if !transitions::claims_left_children(conn).await? {
                    return Ok::<_, sqlx::Error>(None);
                }
                let mut tx = conn.begin().await?;
                let orphans = transitions::cancel_orphans(&mut tx, SWEEP_BATCH, lease_ms).await?;
                let unheard = transitions::children_unheard(&mut tx, SWEEP_BATCH, lease_ms).await?;
                tx.commit().await?;
                Ok(Some((orphans, unheard)))
            })
            .await?;
        let Some((orphans, (children, mut finished))) = handed else {
            return Ok(());
        };
        for task_id in &orphans {
            if let Err(error) = self.queues.control.cancel_task(*task_id).await {
                tracing::warn!(%task_id, error = format!("{error:#}"),
                    "cannot tell workers about the cancel");
            }
        }
        if children.is_empty() {
            if !orphans.is_empty() {
                // Their concurrency slots were freed: tasks waiting for them may start.
                self.wake_dispatcher.notify_one();
                self.wake_events.notify_one();
            }
            return Ok(());
        }
        tracing::info!(
            children = children.len(),
            "handed ended child tasks back to the steps that started them"
        );
        if !finished.claimed.is_empty() {
            self.publisher
                .dispatch(std::mem::take(&mut finished.claimed), self.metrics.clone())
                .await;
        }
        self.metrics.finished(&finished.tasks);
        self.wake_dispatcher.notify_one();
        self.wake_events.notify_one();
        Ok(())
    }

    /// Count and announce the tasks [`transitions::expire_deadlines`] ended.
    async fn ended_late(&self, expired: &[ExpiredTask]) {
        if expired.is_empty() {
            return;
        }
        let finished: Vec<FinishedTask> = expired
            .iter()
            .map(|task| FinishedTask {
                task_id: task.task_id,
                namespace: task.namespace.clone(),
                status: TaskStatus::Error,
                limited: task.limited,
                has_parent: false,
                name: task.name.clone(),
                seconds: task.seconds,
            })
            .collect();
        self.metrics.finished(&finished);
        for task in expired {
            self.metrics
                .deadlines_exceeded
                .get_or_create(&Namespace {
                    namespace: task.namespace.clone(),
                })
                .inc();
        }
        tracing::info!(tasks = expired.len(), "ended tasks past their deadline");
        // Their queued and running dispatches are superseded: a worker aborts a run and
        // drops a copy it receives later, as for a lost lease. (A task's cancel would make
        // workers drop the task for good, and a retry may run it again.)
        let dispatches: Vec<(uuid::Uuid, uuid::Uuid)> = expired
            .iter()
            .flat_map(|task| task.running.iter().copied())
            .collect();
        self.announce_superseded(&dispatches).await;
    }
}

impl Service for Sweeper {
    const NAME: &'static str = "sweeper";

    /// Run until `stop` is cancelled.
    async fn run(self, stop: CancellationToken) {
        let span = tracing::info_span!("sweeper");
        async move {
            tracing::info!(interval = ?self.interval, "started");
            let mut blocked = false;
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(self.interval) => {}
                }
                if self.publisher.connected() && !self.publisher.takes_messages().await {
                    if !std::mem::replace(&mut blocked, true) {
                        tracing::warn!(
                            "RabbitMQ takes no message from this coordinator (blocked by a \
                             memory or disk alarm?): no lease expires until it has taken \
                             messages again for a heartbeat lease"
                        );
                    }
                    self.broker_refused();
                    continue;
                }
                if std::mem::take(&mut blocked) {
                    tracing::info!("RabbitMQ takes messages again");
                }
                // Once per interval, not per batch: its comparison needs the batches of
                // the previous interval to have been dispatched again.
                if self.publisher.connected()
                    && let Err(error) = self.audit_queues().await
                {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "cannot compare the step queues with the database"
                    );
                }
                if let Err(error) = self.hand_back_children().await {
                    self.metrics.database_errors.inc();
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "cannot hand ended child tasks back to their steps; retrying next interval"
                    );
                }
                loop {
                    match self.sweep_once().await {
                        Ok(n) if (n as i64) < SWEEP_BATCH => break,
                        Ok(_) => continue,
                        Err(error) => {
                            self.metrics.database_errors.inc();
                            tracing::warn!(
                                error = format!("{error:#}"),
                                "sweep failed; retrying next interval"
                            );
                            break;
                        }
                    }
                }
            }
            tracing::info!("stopped");
        }
        .instrument(span)
        .await
    }
}

/// What [`lost_in_queue`] weighs for one namespace.
#[derive(Debug, Clone, Copy)]
struct QueueCheck {
    /// The messages that carry the confirmed steps still `enqueued` after the dispatch
    /// lease (a step alone, or a batch of steps).
    confirmed: u64,
    /// The step queue's (ready messages, consumers), or `None` when it does not exist.
    step_queue: Option<(u32, u32)>,
    /// The messages the workers serving the namespace may hold unacked: twice their
    /// concurrency.
    held_by_workers: u64,
    /// Results (and started notices) waiting in the results queue.
    results_ready: u32,
}

/// Which of a namespace's confirmed steps have lost their message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lost {
    /// The queue does not exist: every confirmed step of the namespace.
    Missing,
    /// The queue holds too few messages: this many of the oldest messages of confirmed
    /// steps.
    Short(u64),
}

impl Lost {
    fn reason(self) -> &'static str {
        match self {
            Lost::Missing => "queue_missing",
            Lost::Short(_) => "queue_short",
        }
    }
}

/// Decide whether confirmed steps lost their messages, at one check. A step the
/// database still shows `enqueued` may legitimately be elsewhere than its queue: held
/// unacked by a worker (running, or waiting for a handler slot), or already answered,
/// with its result (which also records its start) waiting in the results queue or being
/// applied. So a queue is short only while no result waits, and only by more than the
/// workers may hold; results being applied at this check are ruled out by the next
/// ([`Shortfalls`]).
fn lost_in_queue(check: QueueCheck) -> Option<Lost> {
    let Some((ready, _)) = check.step_queue else {
        return Some(Lost::Missing);
    };
    if check.results_ready > 0 {
        return None;
    }
    let elsewhere = u64::from(ready) + check.held_by_workers;
    (check.confirmed > elsewhere).then(|| Lost::Short(check.confirmed - elsewhere))
}

/// A shortfall is acted on when two audits in a row find it (the smaller of the two): a
/// step whose result a coordinator is applying at the first check, or whose started
/// notice is on its way, is not lost, and is no longer `enqueued` at the next.
#[derive(Default)]
struct Shortfalls {
    /// Per namespace, the shortfall the previous audit found.
    previous: HashMap<String, u64>,
    /// Those this audit found for the first time.
    found: HashMap<String, u64>,
}

impl Shortfalls {
    /// What a check of `namespace` that found `found` confirms.
    fn confirm(&mut self, namespace: &str, found: Option<Lost>) -> Option<Lost> {
        let before = self.previous.remove(namespace);
        match (found, before) {
            (Some(Lost::Short(now)), Some(before)) => Some(Lost::Short(now.min(before))),
            (Some(Lost::Short(now)), None) => {
                self.found.insert(namespace.to_owned(), now);
                None
            }
            (other, _) => other,
        }
    }

    /// The audit is over: what it found first is what the next one confirms, and a
    /// namespace it did not check starts again from one check.
    fn end_audit(&mut self) {
        self.previous = std::mem::take(&mut self.found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(confirmed: u64, step_queue: Option<(u32, u32)>, results_ready: u32) -> QueueCheck {
        QueueCheck {
            confirmed,
            step_queue,
            held_by_workers: 32,
            results_ready,
        }
    }

    #[test]
    fn a_missing_queue_lost_every_confirmed_step() {
        assert_eq!(lost_in_queue(check(5, None, 0)), Some(Lost::Missing));
        assert_eq!(lost_in_queue(check(5, None, 900)), Some(Lost::Missing));
    }

    #[test]
    fn messages_in_the_queue_or_held_by_workers_are_not_lost() {
        assert_eq!(lost_in_queue(check(100, Some((100, 2)), 0)), None);
        assert_eq!(lost_in_queue(check(132, Some((100, 2)), 0)), None);
        // Counted in messages, whatever each carries: one more than the queue and the
        // workers can hold is one lost.
        assert_eq!(
            lost_in_queue(check(133, Some((100, 2)), 0)),
            Some(Lost::Short(1))
        );
    }

    #[test]
    fn while_results_wait_the_database_is_behind_and_nothing_is_judged_lost() {
        // A burst: the step queue drained, thousands of results not yet applied.
        assert_eq!(lost_in_queue(check(4_885, Some((0, 3)), 2_000)), None);
    }

    #[test]
    fn a_short_queue_lost_the_oldest_messages_beyond_what_workers_may_hold() {
        // 1,000 messages of waiting steps; the queue, recreated, holds 10 newer ones.
        assert_eq!(
            lost_in_queue(check(1_000, Some((10, 2)), 0)),
            Some(Lost::Short(1_000 - 10 - 32))
        );
        // Recreated empty, with no worker holding anything: every one of them.
        let none_held = QueueCheck {
            held_by_workers: 0,
            ..check(7, Some((0, 0)), 0)
        };
        assert_eq!(lost_in_queue(none_held), Some(Lost::Short(7)));
    }

    #[test]
    fn a_shortfall_counts_when_two_audits_in_a_row_find_it() {
        let mut short = Shortfalls::default();
        let mut audit = |found: Option<Lost>| {
            let confirmed = short.confirm("a", found);
            short.end_audit();
            confirmed
        };
        assert_eq!(audit(Some(Lost::Short(50))), None);
        assert_eq!(
            audit(Some(Lost::Short(40))),
            Some(Lost::Short(40)),
            "the smaller of the two"
        );
        // A shortfall that is gone at the next check is forgotten.
        assert_eq!(audit(Some(Lost::Short(9))), None);
        assert_eq!(audit(None), None);
        assert_eq!(audit(Some(Lost::Short(9))), None);
        // A missing queue needs no second look.
        assert_eq!(short.confirm("b", Some(Lost::Missing)), Some(Lost::Missing));
    }

    #[test]
    fn a_shortfall_is_forgotten_by_an_audit_that_does_not_check_its_namespace() {
        let mut short = Shortfalls::default();
        assert_eq!(short.confirm("a", Some(Lost::Short(5))), None);
        assert_eq!(short.confirm("b", Some(Lost::Short(5))), None);
        short.end_audit();
        // Nothing of `a` waits at this audit: only `b` is checked.
        assert_eq!(
            short.confirm("b", Some(Lost::Short(3))),
            Some(Lost::Short(3))
        );
        short.end_audit();
        assert_eq!(
            short.confirm("a", Some(Lost::Short(5))),
            None,
            "one check, not two"
        );
    }
}
