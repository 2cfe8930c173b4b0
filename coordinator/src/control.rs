//! The control loop: tells workers which namespaces exist.
//!
//! Workers started without `TASKER_NAMESPACES` serve every namespace. They learn the
//! namespaces from `namespaces` broadcasts on the control exchange, which a coordinator
//! sends at start, whenever a template brings a new namespace, in answer to a worker's
//! `hello`, and every [`ANNOUNCE_AGAIN`]: an announcement lost (RabbitMQ away when the
//! template was registered, the coordinator stopped or its request given up on between
//! storing it and announcing) is made good within that.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use futures::StreamExt;
use lapin::Channel;
use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use tasker_shared::db::Database;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::link::BrokerLink;
use crate::metrics::CoordinatorMetrics;
use crate::service::Service;
use tasker_shared::broker::{Topology, persistent, subscribe_private};
use tasker_shared::messages::{ControlMessage, RunningStep, valid_worker_id};
use tasker_shared::store::templates;

/// How long a broadcast may wait for the broker.
const BROADCAST_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// How often the namespaces are announced again, whether or not one is new.
const ANNOUNCE_AGAIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Dispatches named per `superseded` message (docs/protocol.md).
const SUPERSEDED_PER_MESSAGE: usize = 1_000;
/// The longest status interval believed: a worker's own word sets how long it counts as
/// alive (its steps' leases wait for it), and one that says "for ever" must not be.
const MAX_STATUS_INTERVAL_MS: u64 = 600_000;
/// Most workers remembered; past it, the one heard from longest ago is forgotten (ids
/// are the workers' own: a flood of made-up ones must not grow the coordinator).
const MAX_WORKERS_KEPT: usize = 10_000;

#[derive(Clone)]
pub(crate) struct Control {
    db: Database,
    /// The broker connection, to leave the repeated announcements out during an alarm.
    broker: Arc<BrokerLink>,
    /// The channel of the current broker connection, shared by every clone and replaced
    /// after a reconnect. A std RwLock: held only to clone or swap the handle.
    channel: Arc<RwLock<Channel>>,
    topology: Topology,
    workers: Arc<Mutex<HashMap<String, WorkerSeen>>>,
    metrics: Arc<CoordinatorMetrics>,
}

/// A worker as last heard of.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct WorkerSeen {
    pub(crate) worker_id: String,
    pub(crate) namespaces: Vec<String>,
    pub(crate) all_namespaces: bool,
    pub(crate) concurrency: u16,
    pub(crate) in_flight: usize,
    pub(crate) last_seen: chrono::DateTime<chrono::Utc>,
    #[serde(skip)]
    interval_ms: u64,
}

impl Control {
    pub(crate) fn new(
        db: Database,
        (broker, channel): (Arc<BrokerLink>, Channel),
        topology: Topology,
        metrics: Arc<CoordinatorMetrics>,
    ) -> Self {
        Control {
            db,
            broker,
            channel: Arc::new(RwLock::new(channel)),
            topology,
            workers: Arc::default(),
            metrics,
        }
    }

    /// Use `channel` from now on (a new connection after the old one was lost).
    pub(crate) fn use_channel(&self, channel: Channel) {
        *self.channel.write().unwrap_or_else(|p| p.into_inner()) = channel;
    }

    fn channel(&self) -> Channel {
        self.channel
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Workers heard from within three of their status intervals, by id.
    pub(crate) fn recent_workers(&self) -> Vec<WorkerSeen> {
        let now = chrono::Utc::now();
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        workers.retain(|_, w| {
            let silent = (now - w.last_seen).num_milliseconds().max(0) as u64;
            // Forget workers silent for long; list only those heard from recently.
            silent < w.interval_ms.saturating_mul(30).max(300_000)
        });
        let mut recent: Vec<WorkerSeen> = workers
            .values()
            .filter(|w| {
                ((now - w.last_seen).num_milliseconds().max(0) as u64)
                    < w.interval_ms.saturating_mul(3)
            })
            .cloned()
            .collect();
        recent.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        recent
    }

    /// Broadcast every namespace that has a template.
    pub(crate) async fn announce_namespaces(&self) -> anyhow::Result<()> {
        let namespaces = self
            .db
            .run(async |conn| templates::namespaces(conn).await)
            .await?;
        self.broadcast(&ControlMessage::Namespaces { namespaces })
            .await
    }

    /// Tell every worker to abort what it runs for `task_id`.
    pub(crate) async fn cancel_task(&self, task_id: uuid::Uuid) -> anyhow::Result<()> {
        self.broadcast(&ControlMessage::CancelTask { task_id })
            .await
    }

    /// Tell every worker that these dispatches (step id, dispatch token) are no longer
    /// wanted, at most [`SUPERSEDED_PER_MESSAGE`] per message.
    pub(crate) async fn superseded(
        &self,
        dispatches: &[(uuid::Uuid, uuid::Uuid)],
    ) -> anyhow::Result<()> {
        for chunk in dispatches.chunks(SUPERSEDED_PER_MESSAGE) {
            let dispatches = chunk
                .iter()
                .map(|&(step_id, dispatch_token)| RunningStep {
                    step_id,
                    dispatch_token,
                })
                .collect();
            self.broadcast(&ControlMessage::Superseded { dispatches })
                .await?;
        }
        Ok(())
    }

    /// Publish `message` to every worker, giving up after [`BROADCAST_PATIENCE`]: a
    /// broadcast is advisory (workers fence stale work by its dispatch token anyway),
    /// and its callers (an API request, the scheduler holding a schedule's lock, the
    /// sweeper) must not wait on a broker that has stopped reading, as it does under a
    /// memory or disk alarm.
    async fn broadcast(&self, message: &ControlMessage) -> anyhow::Result<()> {
        let body = serde_json::to_vec(message)?;
        let channel = self.channel();
        let published = async {
            channel
                .basic_publish(
                    self.topology.control_exchange().into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &body,
                    self.topology.signed(&body, persistent()),
                )
                .await?
                .await?;
            anyhow::Ok(())
        };
        tokio::time::timeout(BROADCAST_PATIENCE, published)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the broker took more than {BROADCAST_PATIENCE:?} to take a control message"
                )
            })?
    }
}

impl Service for Control {
    const NAME: &'static str = "control";

    /// Answer hellos until `stop` is cancelled.
    async fn run(self, stop: CancellationToken) {
        let span = tracing::info_span!("control");
        async move {
            let mut consumer = match self.subscribe().await {
                Ok(consumer) => consumer,
                Err(error) => {
                    tracing::error!(%error, "cannot subscribe to the control exchange");
                    return;
                }
            };
            if let Err(error) = self.announce_namespaces().await {
                tracing::warn!(error = format!("{error:#}"), "cannot announce namespaces");
            }
            let mut again = tokio::time::interval_at(
                tokio::time::Instant::now() + ANNOUNCE_AGAIN,
                ANNOUNCE_AGAIN,
            );
            again.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let next = tokio::select! {
                    () = stop.cancelled() => break,
                    // Not while RabbitMQ blocks publishers: a publish would block the
                    // connection, acks included, until the alarm lifts.
                    _ = again.tick(), if !self.broker.blocked() => {
                        if let Err(error) = self.announce_namespaces().await {
                            tracing::warn!(error = format!("{error:#}"), "cannot announce namespaces");
                        }
                        continue;
                    }
                    next = consumer.next() => next,
                };
                let Some(Ok(delivery)) = next else { break };
                // Control messages are advisory: acked on receipt (the queue is auto-ack).
                if let Err(error) = self.topology.verify(&delivery.data, &delivery.properties) {
                    self.metrics.control_dropped.inc();
                    tracing::warn!(%error, "control message dropped");
                    continue;
                }
                match serde_json::from_slice::<ControlMessage>(&delivery.data) {
                    Ok(ControlMessage::Hello { worker_id }) => {
                        tracing::debug!(%worker_id, "worker said hello");
                        if let Err(error) = self.announce_namespaces().await {
                            tracing::warn!(
                                error = format!("{error:#}"),
                                "cannot announce namespaces"
                            );
                        }
                    }
                    Ok(ControlMessage::WorkerStatus {
                        worker_id,
                        namespaces,
                        ..
                    }) if !valid_worker_id(&worker_id)
                        || !namespaces.iter().all(|n| valid_worker_id(n)) =>
                    {
                        // Shown by /health/status: nothing but plain ids gets there.
                        self.metrics.control_dropped.inc();
                        tracing::warn!(
                            worker_id = %worker_id.escape_default(),
                            "worker status with an invalid worker id or namespace; dropped"
                        );
                    }
                    Ok(ControlMessage::WorkerStatus {
                        worker_id,
                        namespaces,
                        all_namespaces,
                        concurrency,
                        in_flight,
                        interval_ms,
                    }) => {
                        let seen = WorkerSeen {
                            worker_id: worker_id.clone(),
                            namespaces,
                            all_namespaces,
                            concurrency,
                            in_flight,
                            last_seen: chrono::Utc::now(),
                            interval_ms,
                        };
                        remember(
                            &mut self.workers.lock().unwrap_or_else(|p| p.into_inner()),
                            seen,
                        );
                    }
                    Ok(_) => {}
                    // Advisory and fanned out to every process: dropped and logged, not
                    // dead-lettered (each receiver would file its own copy) nor retried.
                    Err(error) => {
                        self.metrics.control_dropped.inc();
                        tracing::warn!(
                            %error,
                            bytes = delivery.data.len(),
                            "dropped an undecodable control message"
                        );
                    }
                }
            }
        }
        .instrument(span)
        .await
    }
}

impl Control {
    async fn subscribe(&self) -> lapin::Result<lapin::Consumer> {
        // A private, server-named queue that disappears with this process.
        subscribe_private(
            &self.channel(),
            &self.topology.control_exchange(),
            "",
            FieldTable::default(),
        )
        .await
    }
}

/// Keep `seen`, its interval at most [`MAX_STATUS_INTERVAL_MS`]; past
/// [`MAX_WORKERS_KEPT`] workers, forget the one heard from longest ago.
fn remember(workers: &mut HashMap<String, WorkerSeen>, mut seen: WorkerSeen) {
    seen.interval_ms = seen.interval_ms.min(MAX_STATUS_INTERVAL_MS);
    if workers.len() >= MAX_WORKERS_KEPT && !workers.contains_key(&seen.worker_id) {
        let oldest = workers
            .values()
            .min_by_key(|w| w.last_seen)
            .map(|w| w.worker_id.clone());
        if let Some(oldest) = oldest {
            workers.remove(&oldest);
        }
    }
    workers.insert(seen.worker_id.clone(), seen);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(id: usize, interval_ms: u64, ago_s: i64) -> WorkerSeen {
        WorkerSeen {
            worker_id: format!("w{id}"),
            namespaces: Vec::new(),
            all_namespaces: true,
            concurrency: 1,
            in_flight: 0,
            last_seen: chrono::Utc::now() - chrono::TimeDelta::seconds(ago_s),
            interval_ms,
        }
    }

    #[test]
    fn a_workers_word_on_its_interval_and_the_number_of_workers_are_bounded() {
        let mut workers = HashMap::new();
        remember(&mut workers, seen(0, u64::MAX, 0));
        assert_eq!(workers["w0"].interval_ms, MAX_STATUS_INTERVAL_MS);
        for id in 1..MAX_WORKERS_KEPT {
            remember(&mut workers, seen(id, 1_000, 10));
        }
        // w1 was heard from as long ago as the others but w0 more recently; one more
        // worker makes room by forgetting one of those heard from longest ago.
        remember(&mut workers, seen(MAX_WORKERS_KEPT, 1_000, 0));
        assert_eq!(workers.len(), MAX_WORKERS_KEPT);
        assert!(
            workers.contains_key("w0") && workers.contains_key(&format!("w{MAX_WORKERS_KEPT}"))
        );
        // A worker already known is updated, not counted again.
        remember(&mut workers, seen(0, 1_000, 0));
        assert_eq!(workers.len(), MAX_WORKERS_KEPT);
    }
}
