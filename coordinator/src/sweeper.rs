//! The sweeper: heals lost work by expiring leases.
//!
//! A step `enqueued` past its lease was never started (lost message, or a coordinator
//! that died between commit and publish) and is dispatched again without spending an
//! attempt; a step `in_progress` past its lease lost its worker and counts as a timed-out
//! attempt. Tasks left with nothing to run are finished.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use crate::metrics::{CoordinatorMetrics, Reason};
use tasker_shared::store::transitions;

/// Most leases expired per transaction.
const SWEEP_BATCH: i64 = 1_000;

pub(crate) struct Sweeper {
    pool: PgPool,
    metrics: Arc<CoordinatorMetrics>,
    wake_dispatcher: Arc<Notify>,
    wake_events: Arc<Notify>,
    interval: Duration,
}

impl Sweeper {
    pub(crate) fn new(
        pool: PgPool,
        metrics: Arc<CoordinatorMetrics>,
        wake_dispatcher: Arc<Notify>,
        wake_events: Arc<Notify>,
        interval: Duration,
    ) -> Self {
        Sweeper {
            pool,
            metrics,
            wake_dispatcher,
            wake_events,
            interval,
        }
    }

    /// Expire one batch of leases. Returns how many steps changed.
    pub(crate) async fn sweep_once(&self) -> anyhow::Result<usize> {
        let mut tx = self.pool.begin().await?;
        let expired = transitions::expire_leases(&mut tx, SWEEP_BATCH).await?;
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
