//! The gauges loop: every `interval`, refreshes the gauges that describe work in flight
//! (unfinished tasks and steps by status, the ready backlog) and the depth and consumers
//! of every Tasker queue. Reads only unfinished rows, so its cost does not grow with
//! history.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::link::BrokerLink;
use crate::metrics::{CoordinatorMetrics, Namespace, Queue, QueueDepth, Reason, Status};
use crate::service::Service;
use tasker_shared::broker::Topology;
use tasker_shared::db::Database;
use tasker_shared::store::{inspect, templates};

/// Why a step may be held (`tasker_steps_held{reason}`).
const HELD_REASONS: &[&str] = &["concurrency_limited", "rate_limited"];

pub(crate) struct Gauges {
    db: Database,
    /// Each queue is read on a channel of its own, with a passive declaration: one that
    /// is missing is not created (unbound) by reading it, and a channel the broker
    /// closes takes nothing else with it.
    broker: Arc<BrokerLink>,
    topology: Topology,
    metrics: Arc<CoordinatorMetrics>,
    interval: Duration,
}

impl Gauges {
    pub(crate) fn new(
        db: Database,
        broker: Arc<BrokerLink>,
        topology: Topology,
        metrics: Arc<CoordinatorMetrics>,
        interval: Duration,
    ) -> Self {
        Gauges {
            db,
            broker,
            topology,
            metrics,
            interval,
        }
    }

    /// Drop the gauges by status, namespace and queue, rather than export old values as
    /// today's: several coordinators are read with `max`, and one that cannot look (its
    /// broker session or database lost) must not hide what the others see (a queue
    /// without consumers, say).
    fn forget(&self) {
        self.metrics.tasks_by_status.clear();
        self.metrics.steps_by_status.clear();
        self.metrics.steps_held.clear();
        self.metrics.oldest_ready.clear();
        self.metrics.queue_messages.clear();
        self.metrics.queue_consumers.clear();
        self.metrics
            .queue_depths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Refresh every gauge once.
    pub(crate) async fn refresh_once(&self) -> anyhow::Result<()> {
        let metrics = &self.metrics;
        let (work, namespaces) = self
            .db
            .run(async |conn| {
                let work = inspect::work_in_flight(conn).await?;
                crate::scheduler::forget_deleted_schedules(conn, metrics).await?;
                let namespaces = templates::namespaces(conn).await?;
                Ok::<_, sqlx::Error>((work, namespaces))
            })
            .await?;
        for status in ["pending", "in_progress"] {
            let count = work
                .tasks
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |(_, n)| *n);
            self.metrics
                .tasks_by_status
                .get_or_create(&Status {
                    status: status.to_owned(),
                })
                .set(count);
        }
        for status in ["pending", "enqueued", "in_progress", "waiting_for_retry"] {
            let count = work
                .steps
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |(_, n)| *n);
            self.metrics
                .steps_by_status
                .get_or_create(&Status {
                    status: status.to_owned(),
                })
                .set(count);
        }
        self.metrics.ready_backlog.set(work.ready_backlog);
        for reason in HELD_REASONS {
            let count = work
                .held
                .iter()
                .find(|(r, _)| r == reason)
                .map_or(0, |(_, n)| *n);
            self.metrics
                .steps_held
                .get_or_create(&Reason {
                    reason: (*reason).to_owned(),
                })
                .set(count);
        }

        // Every namespace has the gauge: 0 where nothing waits.
        for namespace in &namespaces {
            let oldest = work
                .ready_by_namespace
                .iter()
                .find(|(n, _, _)| n == namespace)
                .map_or(0.0, |(_, _, seconds)| seconds.max(0.0));
            self.metrics
                .oldest_ready
                .get_or_create(&Namespace {
                    namespace: namespace.clone(),
                })
                .set(oldest);
        }
        let mut queues: Vec<(String, &'static str)> = namespaces
            .iter()
            .map(|namespace| (self.topology.step_queue(namespace), "steps"))
            .collect();
        queues.push((self.topology.results_queue(), "results"));
        queues.push((self.topology.dead_letter_queue(), "dead_letter"));
        let mut depths = Vec::with_capacity(queues.len());
        let connection = self.broker.connection();
        for (queue, kind) in queues {
            let (messages, consumers) = self
                .topology
                .queue_counts(&connection, &queue)
                .await
                .inspect_err(|_| {
                    self.metrics.broker_errors.inc();
                })?
                // Missing (deleted by hand): nothing in it, nobody on it. The sweeper
                // dispatches again what it held; a worker declares it again.
                .unwrap_or_default();
            depths.push(QueueDepth {
                queue: queue.clone(),
                kind,
                messages,
                consumers,
            });
            let label = Queue { queue };
            self.metrics
                .queue_messages
                .get_or_create(&label)
                .set(i64::from(messages));
            self.metrics
                .queue_consumers
                .get_or_create(&label)
                .set(i64::from(consumers));
        }
        *self
            .metrics
            .queue_depths
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = depths;
        Ok(())
    }
}

impl Service for Gauges {
    const NAME: &'static str = "gauges";

    /// Run until `stop` is cancelled.
    async fn run(self, stop: CancellationToken) {
        let span = tracing::info_span!("gauges");
        async move {
            loop {
                if let Err(error) = self.refresh_once().await {
                    tracing::warn!(error = format!("{error:#}"), "cannot refresh the gauges");
                    self.forget();
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(self.interval) => {}
                }
            }
            // Stopped with its broker session: nothing refreshes them until the next.
            self.forget();
        }
        .instrument(span)
        .await
    }
}
