//! The sweeper: heals lost work by expiring leases.
//!
//! Re-dispatch is only for messages that may be lost:
//! - a step `enqueued` past its dispatch lease was never confirmed by the broker (the
//!   coordinator died between commit and publish, or the publish failed) and is
//!   dispatched again without spending an attempt. A step whose publish was confirmed has
//!   no lease: it is safe in a durable queue, however long the queue is;
//! - a confirmed step whose queue was deleted or lost: each sweep compares the confirmed
//!   steps that have waited longer than the dispatch lease, per namespace, with the
//!   namespace's queue. A missing queue, or one holding fewer messages than those steps
//!   minus what the workers serving it may hold unacked (twice their concurrency), means
//!   messages are gone: those steps have their lease ended and are dispatched again;
//! - a step `in_progress` past its lease lost its worker and counts as a timed-out
//!   attempt.
//!
//! Workers are told which dispatches were replaced (a `superseded` control message), so
//! a copy still queued somewhere is acked without being run. Tasks left with nothing to
//! run are finished.
//!
//! Running steps' leases are only expired once this coordinator has reached both the
//! database and the broker for a whole heartbeat lease: after an outage, the heartbeats
//! and results that workers sent meanwhile are still in the results queue, and expiring
//! those steps would run them again for nothing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use crate::control::Control;
use crate::link::BrokerLink;
use crate::metrics::{CoordinatorMetrics, Reason};
use crate::publisher::StepPublisher;
use tasker_shared::broker::Topology;
use tasker_shared::store::transitions;

/// Most leases expired per transaction.
const SWEEP_BATCH: i64 = 1_000;

pub(crate) struct Sweeper {
    pool: PgPool,
    metrics: Arc<CoordinatorMetrics>,
    wake_dispatcher: Arc<Notify>,
    wake_events: Arc<Notify>,
    interval: Duration,
    /// Whether the broker is reachable (heartbeats can arrive).
    publisher: Arc<StepPublisher>,
    heartbeat_lease: Duration,
    /// Since when the database and the broker have both been reachable.
    healthy_since: Mutex<Option<Instant>>,
    queues: QueueAudit,
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
        pool: PgPool,
        metrics: Arc<CoordinatorMetrics>,
        (wake_dispatcher, wake_events): (Arc<Notify>, Arc<Notify>),
        interval: Duration,
        publisher: Arc<StepPublisher>,
        heartbeat_lease: Duration,
        queues: QueueAudit,
    ) -> Self {
        Sweeper {
            pool,
            metrics,
            wake_dispatcher,
            wake_events,
            interval,
            publisher,
            heartbeat_lease,
            // At start, heartbeats sent while no coordinator ran may still be queued.
            healthy_since: Mutex::new(None),
            queues,
        }
    }

    /// Expire one batch of leases. Returns how many steps changed.
    pub(crate) async fn sweep_once(&self) -> anyhow::Result<usize> {
        let running = self.heard_workers_lately();
        if self.publisher.connected()
            && let Err(error) = self.audit_queues().await
        {
            tracing::warn!(
                error = format!("{error:#}"),
                "cannot compare the step queues with the database"
            );
        }
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
        since.get_or_insert_with(Instant::now).elapsed() >= self.heartbeat_lease
    }

    fn set_unhealthy(&self) {
        *self.healthy_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Compare confirmed steps that waited longer than the dispatch lease with their
    /// queues, and end the lease of those whose messages are gone (see the module docs).
    /// Returns how many steps were handed back.
    async fn audit_queues(&self) -> anyhow::Result<u64> {
        let queues = &self.queues;
        let waiting = {
            let mut conn = self.pool.acquire().await?;
            transitions::confirmed_waiting(&mut conn, queues.lease_ms).await?
        };
        if waiting.is_empty() {
            return Ok(0);
        }
        let connection = queues.broker.connection();
        let workers = queues.control.recent_workers();
        let mut released = 0;
        for (namespace, confirmed) in waiting {
            let queue = queues.topology.step_queue(&namespace);
            let ready = queues.topology.queue_ready(&connection, &queue).await?;
            let (reason, older_than_ms) = match ready {
                // Every message the queue held is gone, however recent.
                None => ("queue_missing", 0),
                Some(ready) => {
                    let held: i64 = workers
                        .iter()
                        .filter(|w| w.all_namespaces || w.namespaces.contains(&namespace))
                        .map(|w| 2 * i64::from(w.concurrency))
                        .sum();
                    if confirmed <= i64::from(ready) + held {
                        continue;
                    }
                    ("queue_short", queues.lease_ms)
                }
            };
            if ready.is_none() {
                // Declared again, so the steps dispatched again have somewhere to go.
                let channel = connection.create_channel().await?;
                queues
                    .topology
                    .declare_namespace(&channel, &namespace)
                    .await?;
                let _ = channel.close(200, "OK".into()).await;
            }
            let mut conn = self.pool.acquire().await?;
            let n = transitions::release_lost_queue(&mut conn, &namespace, older_than_ms).await?;
            tracing::warn!(%namespace, %queue, reason, confirmed, ready, steps = n,
                "a step queue lost confirmed messages; dispatching those steps again");
            self.metrics
                .lost_messages
                .get_or_create(&Reason {
                    reason: reason.to_owned(),
                })
                .inc_by(n);
            released += n;
        }
        Ok(released)
    }

    /// Tell workers which dispatches were replaced, in messages of at most a thousand.
    async fn announce_superseded(&self, superseded: &[(uuid::Uuid, uuid::Uuid)]) {
        for chunk in superseded.chunks(1_000) {
            if let Err(error) = self.queues.control.superseded(chunk).await {
                tracing::warn!(
                    error = format!("{error:#}"),
                    steps = chunk.len(),
                    "cannot tell workers of superseded dispatches; their copies will run and their results be dropped"
                );
                return;
            }
        }
    }

    async fn expire(&self, running: bool) -> anyhow::Result<usize> {
        let mut tx = self.pool.begin().await?;
        let expired = transitions::expire_leases(&mut tx, SWEEP_BATCH, running).await?;
        let finished = transitions::finish_tasks(&mut tx, &expired.tasks).await?;
        tx.commit().await?;
        self.metrics.finished(&finished);
        for (reason, count) in [
            ("lease_lost", expired.requeued),
            ("lease_expired", expired.timed_out),
        ] {
            if count > 0 {
                self.metrics
                    .leases_expired
                    .get_or_create(&Reason {
                        reason: reason.to_owned(),
                    })
                    .inc_by(count as u64);
            }
        }
        self.announce_superseded(&expired.superseded).await;
        let changed = expired.requeued + expired.timed_out;
        if changed > 0 {
            tracing::info!(
                requeued = expired.requeued,
                timed_out = expired.timed_out,
                tasks_finished = finished.len(),
                "expired leases"
            );
            self.wake_dispatcher.notify_one();
            self.wake_events.notify_one();
        }
        Ok(changed)
    }

    /// Run until `shutdown` turns true.
    pub(crate) async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let span = tracing::info_span!("sweeper");
        async move {
            tracing::info!(interval = ?self.interval, "started");
            loop {
                tokio::select! {
                    _ = shutdown.changed() => break,
                    () = tokio::time::sleep(self.interval) => {}
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
