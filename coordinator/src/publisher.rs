//! Publishing claimed steps to RabbitMQ, after the claim committed.
//!
//! Publishes a whole batch, then awaits all of its confirms together (one broker round
//! trip per batch, not per step). A step whose publish is refused or unroutable stays
//! `enqueued` with its lease ended at once (`release_unpublished`), so the next sweep
//! dispatches it again without spending an attempt.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use futures::future::join_all;
use lapin::Channel;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::types::{AMQPValue, FieldTable};
use sqlx::PgPool;
use tasker_shared::broker::TRACEPARENT_HEADER;
use tasker_shared::broker::{Topology, persistent};
use tasker_shared::store::transitions::{self, Dispatch};
use tasker_shared::telemetry;
use tokio::sync::Semaphore;

use crate::metrics::CoordinatorMetrics;

/// Claimed batches published at once by [`StepPublisher::dispatch`].
const PUBLISHING_BATCHES: u32 = 4;

/// Publishes step messages on one confirm-mode channel.
pub(crate) struct StepPublisher {
    pool: PgPool,
    /// The channel of the current broker connection; replaced after a reconnect. A std
    /// RwLock: held only to clone or swap the handle, never across an await.
    channel: RwLock<Channel>,
    topology: Topology,
    /// Also the message TTL: a copy that waited in its queue past the lease is dropped by
    /// the broker, because by then the step has been (or is about to be) dispatched again.
    lease_ms: i64,
    /// Namespaces whose queue this process has declared. A std Mutex: held only to look
    /// up or insert, never across an await.
    declared: Mutex<HashSet<String>>,
    /// Permits for batches being published in the background.
    publishing: Arc<Semaphore>,
}

/// What happened to a published batch.
#[derive(Debug, Default)]
pub(crate) struct Published {
    pub(crate) confirmed: usize,
    pub(crate) failed: usize,
    /// (step id, dispatch token) of each step the broker did not take, for
    /// [`transitions::release_unpublished`](tasker_shared::store::transitions::release_unpublished).
    pub(crate) unpublished: Vec<(uuid::Uuid, uuid::Uuid)>,
}

impl StepPublisher {
    pub(crate) fn new(pool: PgPool, channel: Channel, topology: Topology, lease_ms: i64) -> Self {
        StepPublisher {
            pool,
            channel: RwLock::new(channel),
            topology,
            lease_ms,
            declared: Mutex::new(HashSet::new()),
            publishing: Arc::new(Semaphore::new(PUBLISHING_BATCHES as usize)),
        }
    }

    /// Publish on `channel` from now on (a new connection after the old one was lost), and
    /// declare namespaces again on it.
    pub(crate) fn use_channel(&self, channel: Channel) {
        *self.channel.write().unwrap_or_else(|p| p.into_inner()) = channel;
        self.declared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
    }

    /// Whether the broker can take messages now (the channel's connection is up).
    pub(crate) fn connected(&self) -> bool {
        self.channel().status().connected()
    }

    fn channel(&self) -> Channel {
        self.channel
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Make sure a namespace's queue exists and is bound, so its steps are never dropped
    /// by the exchange for want of a queue.
    pub(crate) async fn ensure_namespace(&self, namespace: &str) -> lapin::Result<()> {
        if self.is_declared(namespace) {
            return Ok(());
        }
        self.topology
            .declare_namespace(&self.channel(), namespace)
            .await?;
        self.declared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(namespace.to_owned());
        Ok(())
    }

    fn is_declared(&self, namespace: &str) -> bool {
        self.declared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(namespace)
    }

    /// Publish a claimed batch in the background, so the caller goes on with its next
    /// batch while the broker confirms this one (a persistent message is confirmed only
    /// once the broker wrote it to disk: tens of milliseconds under load). At most
    /// [`PUBLISHING_BATCHES`] are in flight; beyond that this waits for one to finish.
    /// The steps are already `enqueued` in the database, so a crash before the publish
    /// loses nothing: the sweeper dispatches them again when their lease expires.
    pub(crate) async fn dispatch(
        self: &Arc<Self>,
        claimed: Vec<Dispatch>,
        metrics: Arc<CoordinatorMetrics>,
    ) {
        let Ok(permit) = self.publishing.clone().acquire_owned().await else {
            return;
        };
        let publisher = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let published = publisher.publish(&claimed).await;
            metrics.dispatched(&claimed, published.failed, started.elapsed());
            drop(permit);
        });
    }

    /// Wait until every batch handed to [`dispatch`](Self::dispatch) is published.
    pub(crate) async fn flush(&self) {
        let _ = self.publishing.acquire_many(PUBLISHING_BATCHES).await;
    }

    /// Publish every message and wait for the broker to confirm them all. Each gets a
    /// `dispatch_step` span, a child of its task's trace, whose context travels in the
    /// message's `traceparent` header to the worker.
    pub(crate) async fn publish(&self, dispatches: &[Dispatch]) -> Published {
        let published = self.publish_all(dispatches).await;
        if !published.unpublished.is_empty() {
            self.release(&published.unpublished).await;
        }
        published
    }

    /// Hand steps the broker did not take back to the sweeper.
    async fn release(&self, unpublished: &[(uuid::Uuid, uuid::Uuid)]) {
        let released = async {
            let mut conn = self.pool.acquire().await?;
            transitions::release_unpublished(&mut conn, unpublished).await
        };
        if let Err(error) = released.await {
            tracing::warn!(%error, steps = unpublished.len(),
                "cannot release unpublished steps; they wait for their lease to expire");
        }
    }

    async fn publish_all(&self, dispatches: &[Dispatch]) -> Published {
        let mut report = Published::default();
        let mut confirms = Vec::with_capacity(dispatches.len());
        let mut spans = Vec::with_capacity(dispatches.len());
        for dispatch in dispatches {
            let message = &dispatch.message;
            let span = tracing::debug_span!("dispatch_step", task_id = %message.task_id,
                step_id = %message.step_id, step = %message.step_name, attempt = message.attempt,
                trace_id = tracing::field::Empty);
            telemetry::adopt(&span, dispatch.trace_parent.as_deref());
            let traceparent = telemetry::traceparent(&span);
            spans.push(span);
            match self.publish_one(message, traceparent).await {
                Ok(confirm) => confirms.push((message, confirm)),
                Err(error) => {
                    report.failed += 1;
                    report
                        .unpublished
                        .push((message.step_id, message.dispatch_token));
                    tracing::warn!(%error, step_id = %message.step_id, task_id = %message.task_id,
                        "publishing a step failed; the sweeper will dispatch it again");
                }
            }
        }
        let outcomes = join_all(confirms.into_iter().map(|(message, confirm)| async move {
            (message, tasker_shared::broker::await_confirm(confirm).await)
        }))
        .await;
        for (message, outcome) in outcomes {
            match outcome {
                Ok(confirmation) => {
                    let acked = confirmation.is_ack();
                    // A mandatory message the broker could not route comes back with an ack.
                    let returned = confirmation.take_message().is_some();
                    if acked && !returned {
                        report.confirmed += 1;
                    } else {
                        report.failed += 1;
                        report
                            .unpublished
                            .push((message.step_id, message.dispatch_token));
                        tracing::warn!(step_id = %message.step_id, namespace = %message.namespace,
                            "the broker refused or could not route a step; it will be dispatched again when its lease expires");
                    }
                }
                Err(error) => {
                    report.failed += 1;
                    report
                        .unpublished
                        .push((message.step_id, message.dispatch_token));
                    tracing::warn!(%error, step_id = %message.step_id, "no confirm for a step");
                }
            }
        }
        report
    }

    async fn publish_one(
        &self,
        message: &tasker_shared::messages::StepMessage,
        traceparent: Option<String>,
    ) -> anyhow::Result<lapin::PublisherConfirm> {
        self.ensure_namespace(&message.namespace).await?;
        let body = serde_json::to_vec(message)?;
        let mut properties = persistent()
            .with_message_id(ShortString::from(message.dispatch_token.to_string()))
            .with_expiration(ShortString::from(self.lease_ms.max(1).to_string()));
        if let Some(traceparent) = traceparent {
            let mut headers = FieldTable::default();
            headers.insert(
                TRACEPARENT_HEADER.into(),
                AMQPValue::LongString(traceparent.into()),
            );
            properties = properties.with_headers(headers);
        }
        Ok(self
            .channel()
            .basic_publish(
                self.topology.steps_exchange().into(),
                message.namespace.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            )
            .await?)
    }
}
