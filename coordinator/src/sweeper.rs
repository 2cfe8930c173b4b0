//! The sweeper: heals lost work by expiring leases.
//!
//! A step `enqueued` past its lease was never started (lost message, or a coordinator
//! that died between commit and publish) and is dispatched again without spending an
//! attempt; a step `in_progress` past its lease lost its worker and counts as a timed-out
//! attempt. Tasks left with nothing to run are finished.
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

use crate::metrics::{CoordinatorMetrics, Reason};
use crate::publisher::StepPublisher;
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
}

impl Sweeper {
    pub(crate) fn new(
        pool: PgPool,
        metrics: Arc<CoordinatorMetrics>,
        wake_dispatcher: Arc<Notify>,
        wake_events: Arc<Notify>,
        interval: Duration,
        publisher: Arc<StepPublisher>,
        heartbeat_lease: Duration,
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
        since.get_or_insert_with(Instant::now).elapsed() >= self.heartbeat_lease
    }

    fn set_unhealthy(&self) {
        *self.healthy_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
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
