//! The result processor: applies workers' results and started notices in batches.
//!
//! One consumer on the results queue. It takes the first delivery, then whatever else the
//! prefetch buffer already holds (up to the batch size), and in **one transaction**:
//! marks started steps `in_progress`, applies results (fenced by dispatch token) and
//! claims the dependents they made ready in the same statement, reads those dependents'
//! messages, and finishes tasks that can finish. After the commit it acks the whole batch
//! with one `multiple` ack and hands the claimed steps to the publisher, which publishes
//! them while the next batch is applied. A crash before
//! the ack redelivers the batch; the fence makes re-applying it a no-op. A crash before
//! the publish leaves the claimed steps `enqueued` until the sweeper heals them.
//! Undecodable messages go to the dead-letter queue with the reason.

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use sqlx::PgPool;
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use crate::metrics::CoordinatorMetrics;
use crate::publisher::StepPublisher;
use tasker_shared::broker::{TRACEPARENT_HEADER, Topology, header_str};
use tasker_shared::messages::{RunningStep, StepResult, WorkerMessage};
use tasker_shared::store::transitions::{self, LeasePolicy, Started};

pub(crate) struct ResultProcessor {
    pool: PgPool,
    publisher: Arc<StepPublisher>,
    metrics: Arc<CoordinatorMetrics>,
    /// Woken when a retry is scheduled, so the dispatcher sleeps until it is due.
    wake_dispatcher: Arc<Notify>,
    /// Woken after every commit: there are transitions to publish as events.
    wake_events: Arc<Notify>,
    channel: Channel,
    confirm_channel: Channel,
    topology: Topology,
    batch_size: i64,
    lease_ms: i64,
    lease: LeasePolicy,
}

/// What one batch did, for logs and tests.
#[derive(Debug, Default)]
pub(crate) struct BatchReport {
    pub(crate) results_applied: usize,
    pub(crate) results_stale: usize,
    pub(crate) started: usize,
    pub(crate) heartbeats: u64,
    pub(crate) dispatched: usize,
    pub(crate) tasks_finished: usize,
    pub(crate) dead_lettered: usize,
}

pub(crate) struct ResultProcessorConfig {
    pub(crate) topology: Topology,
    pub(crate) batch_size: i64,
    pub(crate) lease_ms: i64,
    pub(crate) lease: LeasePolicy,
}

impl ResultProcessor {
    pub(crate) fn new(
        pool: PgPool,
        publisher: Arc<StepPublisher>,
        metrics: Arc<CoordinatorMetrics>,
        (wake_dispatcher, wake_events): (Arc<Notify>, Arc<Notify>),
        channel: Channel,
        confirm_channel: Channel,
        config: ResultProcessorConfig,
    ) -> Self {
        ResultProcessor {
            pool,
            publisher,
            metrics,
            wake_dispatcher,
            wake_events,
            channel,
            confirm_channel,
            topology: config.topology,
            batch_size: config.batch_size,
            lease_ms: config.lease_ms,
            lease: config.lease,
        }
    }

    async fn consume(&self) -> lapin::Result<Consumer> {
        // Enough prefetch for two batches: one being applied, the next arriving.
        let prefetch = u16::try_from(self.batch_size * 2).unwrap_or(u16::MAX);
        self.channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        self.channel
            .basic_consume(
                self.topology.results_queue().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    /// Apply one batch of deliveries; the caller acks them after this returns `Ok`.
    pub(crate) async fn apply_batch(&self, deliveries: &[Delivery]) -> anyhow::Result<BatchReport> {
        let mut report = BatchReport::default();
        let mut results: Vec<StepResult> = Vec::new();
        let mut started: Vec<Started> = Vec::new();
        let mut running: Vec<RunningStep> = Vec::new();
        // One `apply_result` span per result, a child of the worker's `execute_step`,
        // open until the batch commits.
        let mut spans = Vec::new();
        for delivery in deliveries {
            match WorkerMessage::decode(&delivery.data) {
                Ok(WorkerMessage::Result(result)) => {
                    let span = tracing::debug_span!("apply_result", task_id = %result.task_id,
                        step_id = %result.step_id, outcome = ?result.outcome,
                        trace_id = tracing::field::Empty);
                    let traceparent = header_str(&delivery.properties, TRACEPARENT_HEADER);
                    tasker_shared::telemetry::adopt(&span, traceparent.as_deref());
                    spans.push(span);
                    results.push(result);
                }
                Ok(WorkerMessage::Started(batch)) => {
                    started.extend(batch.steps.into_iter().map(|step| Started {
                        worker_id: batch.worker_id.clone(),
                        step,
                    }));
                }
                Ok(WorkerMessage::Heartbeat(batch)) => running.extend(batch.steps),
                Err(error) => {
                    tracing::warn!(%error, "poison message on the results queue; dead-lettering it");
                    self.topology
                        .dead_letter(
                            &self.confirm_channel,
                            &delivery.data,
                            &self.topology.results_queue(),
                            &error.to_string(),
                        )
                        .await?;
                    report.dead_lettered += 1;
                    self.metrics.dead_lettered.inc();
                }
            }
        }

        let mut tx = self.pool.begin().await?;
        let result_steps: Vec<uuid::Uuid> = results.iter().map(|r| r.step_id).collect();
        let mut steps: Vec<uuid::Uuid> = started
            .iter()
            .map(|s| s.step.step_id)
            .chain(running.iter().map(|r| r.step_id))
            .chain(result_steps.iter().copied())
            .collect();
        steps.sort_unstable();
        steps.dedup();
        transitions::lock_batch(&mut tx, &steps, &result_steps).await?;
        for latency in transitions::mark_started(&mut tx, &started, self.lease).await? {
            self.metrics.queue_latency.observe(latency);
            report.started += 1;
        }
        report.heartbeats = transitions::heartbeat(&mut tx, &running, self.lease).await?;
        let applied = transitions::apply_results(&mut tx, &results, self.lease_ms).await?;
        report.results_applied = applied.applied;
        report.results_stale = applied.stale;
        let claimed = transitions::dispatches_for(&mut tx, &applied.claimed).await?;
        let finished = transitions::finish_tasks(&mut tx, &applied.may_finish(&claimed)).await?;
        tx.commit().await?;
        drop(spans);
        self.wake_events.notify_one();
        self.metrics
            .result_batch_size
            .observe(deliveries.len() as f64);
        self.metrics.applied(&applied);
        self.metrics.finished(&finished);
        report.dispatched = claimed.len();
        report.tasks_finished = finished.len();
        if applied.retries_scheduled > 0 {
            self.wake_dispatcher.notify_one();
        }
        if applied.stale > 0 {
            tracing::info!(
                stale = applied.stale,
                "dropped stale results (dispatch token not current)"
            );
        }
        for task in &finished {
            tracing::info!(task_id = %task.task_id, status = %task.status, "task finished");
        }
        if !claimed.is_empty() {
            // In the background: the batch is acked, and the next one applied, while the
            // broker confirms these.
            self.publisher.dispatch(claimed, self.metrics.clone()).await;
        }
        Ok(report)
    }

    /// Run until `shutdown` turns true.
    pub(crate) async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let span = tracing::info_span!("result_processor");
        async move {
            let mut consumer = match self.consume().await {
                Ok(consumer) => consumer,
                Err(error) => {
                    tracing::error!(%error, "cannot consume the results queue");
                    return;
                }
            };
            tracing::info!(queue = %self.topology.results_queue(), "started");
            loop {
                let first = tokio::select! {
                    _ = shutdown.changed() => break,
                    next = consumer.next() => next,
                };
                let Some(first) = first else { break };
                let mut deliveries = Vec::new();
                match first {
                    Ok(delivery) => deliveries.push(delivery),
                    Err(error) => {
                        tracing::error!(%error, "results consumer failed");
                        break;
                    }
                }
                // Take what is already buffered, without waiting.
                while (deliveries.len() as i64) < self.batch_size {
                    match consumer.next().now_or_never() {
                        Some(Some(Ok(delivery))) => deliveries.push(delivery),
                        _ => break,
                    }
                }
                self.finish_batch(&deliveries).await;
            }
            tracing::info!("stopped");
        }
        .instrument(span)
        .await
    }

    async fn finish_batch(&self, deliveries: &[Delivery]) {
        let Some(last) = deliveries.last() else {
            return;
        };
        let multiple = BasicAckOptions { multiple: true };
        match self.apply_batch(deliveries).await {
            Ok(report) => {
                tracing::debug!(?report, "batch applied");
                if let Err(error) = last.acker.ack(multiple).await {
                    self.metrics.broker_errors.inc();
                    tracing::warn!(%error, "ack failed; the batch will be redelivered and fenced");
                }
            }
            Err(error) => {
                self.metrics.database_errors.inc();
                tracing::warn!(
                    error = format!("{error:#}"),
                    size = deliveries.len(),
                    "applying results failed; requeueing the batch"
                );
                let requeue = BasicNackOptions {
                    multiple: true,
                    requeue: true,
                };
                if let Err(error) = last.acker.nack(requeue).await {
                    self.metrics.broker_errors.inc();
                    tracing::warn!(%error, "nack failed");
                }
                // Give the database a moment before the redelivered batch comes back.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
