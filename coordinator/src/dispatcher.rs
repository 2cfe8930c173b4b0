//! The dispatcher: claims ready steps in batches and publishes them.
//!
//! Woken at once when this coordinator creates a task it could not dispatch at once,
//! retries one, or schedules a retry, and by the sweeper; between wakes it sleeps until
//! the next step in backoff is due (at most `poll_interval`, the safety net for work
//! another coordinator left). New work mostly does not wait for it: a task's first steps
//! are claimed by the statement that creates the task, and dependents of finished steps
//! by the result processor, in its own transaction; all three claim through the same SQL
//! function (`transitions::claim`).
//!
//! Steps held by a limit are not in its scan of ready steps. The same claim offers the
//! rate-held steps whose slot came (their slot times count as due times) and the first
//! steps of tasks waiting for their template's concurrency where the key has room (a
//! finishing task of such a template wakes it); and at most every [`HELD_SWEEP`], the
//! held steps of every concurrency key with a free slot: results release their own
//! keys' held steps, this catches slots freed otherwise (an expired lease, a cancel).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::CoordinatorMetrics;
use crate::publisher::StepPublisher;
use crate::service::Service;
use tasker_shared::db::Database;
use tasker_shared::store::transitions;

/// How soon to claim again when a step in backoff is already due but the last claim did
/// not take it.
const DUE_RECHECK: Duration = Duration::from_millis(10);

/// How often the held steps of every concurrency key with room are offered again.
const HELD_SWEEP: Duration = Duration::from_secs(1);

/// The dispatcher's settings.
#[derive(Debug, Clone)]
pub(crate) struct DispatcherConfig {
    /// Most steps claimed per transaction.
    pub(crate) batch_size: i64,
    /// Lease on a claimed step before it counts as lost.
    pub(crate) lease_ms: i64,
    /// How often to look for expired backoffs when nothing wakes it.
    pub(crate) poll_interval: Duration,
}

pub(crate) struct Dispatcher {
    db: Database,
    publisher: Arc<StepPublisher>,
    metrics: Arc<CoordinatorMetrics>,
    wake: Arc<Notify>,
    wake_events: Arc<Notify>,
    config: DispatcherConfig,
}

impl Dispatcher {
    pub(crate) fn new(
        db: Database,
        publisher: Arc<StepPublisher>,
        metrics: Arc<CoordinatorMetrics>,
        wake: Arc<Notify>,
        wake_events: Arc<Notify>,
        config: DispatcherConfig,
    ) -> Self {
        Dispatcher {
            db,
            publisher,
            metrics,
            wake,
            wake_events,
            config,
        }
    }

    /// Claim one batch (with `every_key`, also the held steps of every concurrency key
    /// with room), commit, publish it. Returns how many steps were dispatched.
    pub(crate) async fn dispatch_once(&self, every_key: bool) -> anyhow::Result<usize> {
        // Without a broker nothing claimed could be published: leave the steps ready until
        // the coordinator has reconnected (which wakes this loop).
        if !self.publisher.connected() {
            return Ok(0);
        }
        // One statement, so no explicit transaction: one round trip per batch (and a
        // transaction of its own when steps with a condition are to be judged).
        let (batch_size, lease_ms) = (self.config.batch_size, self.config.lease_ms);
        let claim = self
            .db
            .run(async |conn| transitions::claim_ready(conn, batch_size, lease_ms, every_key).await)
            .await?;
        // Tasks whose last steps were judged here (skipped by `when`, a fan-out gathered).
        self.metrics.finished(&claim.finished);
        let messages = claim.dispatches;
        if messages.is_empty() {
            return Ok(0);
        }
        self.wake_events.notify_one();
        let claimed = messages.len();
        tracing::debug!(claimed, "dispatching");
        self.publisher
            .dispatch(messages, self.metrics.clone())
            .await;
        Ok(claimed)
    }

    /// How long to sleep: until the next step in backoff is due, at most `poll_interval`.
    async fn idle_for(&self) -> Duration {
        // Nothing can be published: wait for the reconnect, which wakes this loop.
        if !self.publisher.connected() {
            return self.config.poll_interval;
        }
        match self.db.run(transitions::next_due).await {
            // Already due: it fell due after the last claim looked, or another coordinator
            // holds it for a moment. Look again shortly, not at the next poll.
            Ok(Some(at)) => (at - chrono::Utc::now())
                .to_std()
                .unwrap_or(DUE_RECHECK)
                .min(self.config.poll_interval),
            Ok(None) => self.config.poll_interval,
            Err(error) => {
                tracing::warn!(%error, "cannot read the next due time");
                self.config.poll_interval
            }
        }
    }
}

impl Service for Dispatcher {
    const NAME: &'static str = "dispatcher";

    /// Run until `stop` is cancelled.
    async fn run(self, stop: CancellationToken) {
        let span = tracing::info_span!("dispatcher");
        async move {
            tracing::info!("started");
            let mut last_sweep = tokio::time::Instant::now();
            loop {
                // Drain: keep claiming while batches come back full.
                let mut every_key = last_sweep.elapsed() >= HELD_SWEEP;
                if every_key {
                    last_sweep = tokio::time::Instant::now();
                }
                loop {
                    match self.dispatch_once(every_key).await {
                        Ok(n) if (n as i64) < self.config.batch_size => break,
                        Ok(_) => every_key = false,
                        Err(error) => {
                            self.metrics.database_errors.inc();
                            tracing::warn!(
                                error = format!("{error:#}"),
                                "dispatch failed; retrying shortly"
                            );
                            break;
                        }
                    }
                }
                let idle = self.idle_for().await;
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(idle) => {}
                }
            }
            tracing::info!("stopped");
        }
        .instrument(span)
        .await
    }
}
