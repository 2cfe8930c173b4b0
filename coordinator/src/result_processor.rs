//! The result processor: applies workers' results and started notices in batches.
//!
//! A consumer of the results queue (a coordinator runs `TASKER_RESULT_CONSUMERS` of them,
//! each on its own channel, in descending consumer priority: the broker hands a lower
//! one messages only while the higher ones have their prefetch full). It takes the
//! first delivery, then whatever else the prefetch buffer already holds (until the
//! messages name the batch size's worth of steps: a `results` batch or a notice names
//! many), and in **one transaction**:
//! marks started steps `in_progress`, applies results (fenced by dispatch token, decided
//! by `decision::decide`), claims the dependents they made ready with their messages
//! (`transitions::claim_children`), and finishes tasks that can finish. After the commit
//! it acks the batch (one `multiple` ack) and hands the claimed steps to the publisher,
//! which publishes them while the next batch is applied. Messages whose steps another
//! coordinator is applying at that moment (its rows are locked) are not waited for: they
//! stay unacked and join the next batch ([`transitions::lock_batch`]). A crash before
//! the ack redelivers the batch; the fence makes re-applying it a no-op. A crash before
//! the publish leaves the claimed steps `enqueued` until the sweeper heals them.
//! Undecodable messages go to the dead-letter queue with the reason; so does a message
//! PostgreSQL refuses for its data, found by applying the refused batch one message at a
//! time ([`ResultProcessor::apply_one_by_one`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer};
use sqlx::Connection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::control::Control;
use crate::metrics::CoordinatorMetrics;
use crate::publisher::StepPublisher;
use crate::service::Service;
use tasker_shared::broker::{self as broker, TRACEPARENT_HEADER, Topology, header_str};
use tasker_shared::db::Database;
use tasker_shared::messages::{
    BatchedResult, Outcome, ResultBatch, RunningStep, SCHEMA_VERSION, StepResult, WorkerMessage,
    steps_of,
};
use tasker_shared::store::transitions::{self, HeldStep, LeasePolicy, Started};

pub(crate) struct ResultProcessor {
    db: Database,
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
    priority: i32,
    /// Tells workers to abort the runs withdrawn from them.
    control: Control,
    /// Hashes of the bodies this processor copied to the dead-letter queue lately, newest
    /// last: a poison message its batch handed back (the database away, say) comes again
    /// at every try, and is copied once.
    copied: std::sync::Mutex<std::collections::VecDeque<u64>>,
}

/// How many dead-lettered bodies are remembered.
const COPIES_REMEMBERED: usize = 1_024;

/// What one batch did, for logs and tests.
#[derive(Debug, Default)]
pub(crate) struct BatchReport {
    pub(crate) results_applied: usize,
    pub(crate) results_stale: usize,
    pub(crate) started: usize,
    pub(crate) heartbeats: u64,
    /// Runs reported by notices or heartbeats whose step was cancelled or dispatched
    /// again: their workers are told to abort them.
    pub(crate) withdrawn: usize,
    pub(crate) dispatched: usize,
    pub(crate) tasks_finished: usize,
    pub(crate) dead_lettered: usize,
    /// Deliveries not applied because another transaction held their steps.
    pub(crate) held: usize,
}

/// A delivery of the results queue and what it says.
pub(crate) struct Received {
    delivery: Delivery,
    /// The worker's message, or why the delivery is poison.
    message: Result<WorkerMessage, String>,
}

impl Received {
    /// Its share of a batch: the steps it names (at least one).
    fn weight(&self) -> usize {
        self.message
            .as_ref()
            .map_or(1, |message| message.step_count().max(1))
    }
}

/// What [`ResultProcessor::apply_batch`] did with a batch.
pub(crate) struct Applied {
    pub(crate) report: BatchReport,
    /// The deliveries applied or dead-lettered: the caller acks them.
    pub(crate) deliveries: Vec<Delivery>,
    /// The deliveries whose steps another transaction held: the caller keeps them,
    /// unacked, for the next batch. A notice keeps only its held steps; the rest of it
    /// was applied.
    pub(crate) held: Vec<Received>,
}

/// Why [`ResultProcessor::apply_batch`] applied nothing of a batch.
pub(crate) struct Refused {
    error: anyhow::Error,
    /// When PostgreSQL refused one of the batch's statements for the data it was given
    /// ([`refused_for_data`]), the deliveries those statements carried: one of them is
    /// likely poison the decoder let through, and the caller applies them one by one.
    /// Empty for any other failure: the whole batch is handed back to the queue.
    suspects: Vec<Delivery>,
    /// With suspects: the poison deliveries the batch dead-lettered already, to ack.
    dead_lettered: Vec<Delivery>,
    /// With suspects: the deliveries held back (another transaction held their steps).
    held: Vec<Received>,
}

impl Refused {
    /// A failure the whole batch is handed back for.
    fn whole(error: impl Into<anyhow::Error>) -> Self {
        Refused {
            error: error.into(),
            suspects: Vec::new(),
            dead_lettered: Vec::new(),
            held: Vec::new(),
        }
    }
}

impl From<sqlx::Error> for Refused {
    fn from(error: sqlx::Error) -> Self {
        Refused::whole(error)
    }
}

/// Whether PostgreSQL refused a statement for the data it was given: SQLSTATE class 22
/// ("data exception": a character it cannot store, a time or number out of range…) or
/// 54000 (a value past a limit, such as the largest `jsonb`). Anything else (a lost
/// connection, a lock timeout, a deadlock) may pass on a second try.
fn refused_for_data(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(cause.downcast_ref::<sqlx::Error>(),
                 Some(sqlx::Error::Database(db))
                     if db.code().is_some_and(|code| code.starts_with("22") || code == "54000"))
    })
}

pub(crate) struct ResultProcessorConfig {
    pub(crate) topology: Topology,
    pub(crate) batch_size: i64,
    pub(crate) lease_ms: i64,
    pub(crate) lease: LeasePolicy,
    /// The consumer's priority (RabbitMQ's `x-priority`): the broker delivers to a
    /// lower one only while every higher one has its prefetch full.
    pub(crate) priority: i32,
    pub(crate) control: Control,
}

impl ResultProcessor {
    pub(crate) fn new(
        db: Database,
        publisher: Arc<StepPublisher>,
        metrics: Arc<CoordinatorMetrics>,
        (wake_dispatcher, wake_events): (Arc<Notify>, Arc<Notify>),
        channel: Channel,
        confirm_channel: Channel,
        config: ResultProcessorConfig,
    ) -> Self {
        ResultProcessor {
            db,
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
            priority: config.priority,
            control: config.control,
            copied: std::sync::Mutex::default(),
        }
    }

    async fn consume(&self) -> lapin::Result<Consumer> {
        // Enough prefetch for two batches: one being applied, the next arriving.
        let prefetch = u16::try_from(self.batch_size * 2).unwrap_or(u16::MAX);
        self.channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let mut arguments = FieldTable::default();
        arguments.insert("x-priority".into(), AMQPValue::LongInt(self.priority));
        self.channel
            .basic_consume(
                self.topology.results_queue().into(),
                "".into(),
                BasicConsumeOptions::default(),
                arguments,
            )
            .await
    }

    /// Apply one batch of deliveries. Returns the deliveries applied (dead-lettered ones
    /// included), for the caller to ack, and those held back for a later batch.
    pub(crate) async fn apply_batch(&self, batch: Vec<Received>) -> Result<Applied, Refused> {
        let mut report = BatchReport::default();
        let mut dead_lettered: Vec<Delivery> = Vec::new();
        let mut messages: Vec<(Delivery, WorkerMessage)> = Vec::with_capacity(batch.len());
        for received in batch {
            match received.message {
                Ok(message) => messages.push((received.delivery, message)),
                Err(error) => {
                    self.dead_letter(&received.delivery, &error)
                        .await
                        .map_err(Refused::whole)?;
                    report.dead_lettered += 1;
                    dead_lettered.push(received.delivery);
                }
            }
        }

        let mut held_back: Vec<Received> = Vec::new();
        let mut deliveries: Vec<Delivery> = Vec::with_capacity(messages.len());
        let mut results: Vec<StepResult> = Vec::new();
        let mut started: Vec<Started> = Vec::new();
        let mut running: Vec<RunningStep> = Vec::new();
        let mut withdrawn = Vec::new();
        // One `apply_result` span per result, a child of the worker's `execute_step`,
        // open until the batch commits.
        let mut spans = Vec::new();
        // One bounded piece of work, from the transaction's start to its commit: a
        // database that stops answering hands the whole batch back to the queue.
        let (mut applied, finished) = self
            .db
            .run(async |conn| {
                let mut tx = conn
                    .begin_with(tasker_shared::db::BEGIN_PLANNED_BY_KEY)
                    .await?;
                let mut steps: Vec<uuid::Uuid> = messages
                    .iter()
                    .flat_map(|(_, message)| message.steps())
                    .collect();
                steps.sort_unstable();
                steps.dedup();
                let result_steps: Vec<uuid::Uuid> = messages
                    .iter()
                    .flat_map(|(_, message)| message.result_steps())
                    .collect();
                let held: HashMap<uuid::Uuid, HeldStep> =
                    transitions::lock_batch(&mut tx, &steps, &result_steps)
                        .await
                        .map_err(Refused::whole)?
                        .into_iter()
                        .map(|step| (step.step_id, step))
                        .collect();
                // A message with a result for a held step waits for a later batch (a batch of
                // results waits whole: its delivery is acked once). A started notice is split:
                // the steps nobody holds are applied now, a held step that has moved on is left
                // out, and only the held steps that may still run wait, in what is left of the
                // notice; its delivery is acked once they are applied. A heartbeat applies to the
                // steps nobody holds and leaves the held ones out: the worker's next one names
                // them again, and heartbeats kept waiting would pile up, one per worker and
                // interval, in the consumer's prefetch. So one step held for long (an operator's
                // open transaction, a stalled coordinator) holds back neither the leases of the
                // many others a worker's heartbeat names nor the results queue.
                //
                // Whether a step of a started notice waits (`Some(true)`), is applied now
                // (`None`), or is left out (`Some(false)`).
                let wait = |step_id: &uuid::Uuid| held.get(step_id).map(HeldStep::may_still_run);
                for (delivery, message) in messages {
                    let rest = match message {
                        WorkerMessage::Result(result) => {
                            if held.contains_key(&result.step_id) {
                                Some(WorkerMessage::Result(result))
                            } else {
                                let traceparent = header_str(&delivery.properties, TRACEPARENT_HEADER);
                                spans.push(apply_span(&result, traceparent.as_deref()));
                                results.push(result);
                                None
                            }
                        }
                        WorkerMessage::Results(batch) => {
                            if batch
                                .results
                                .iter()
                                .any(|r| held.contains_key(&r.result.step_id))
                            {
                                Some(WorkerMessage::Results(batch))
                            } else {
                                for batched in batch.results {
                                    spans.push(apply_span(&batched.result, batched.traceparent.as_deref()));
                                    results.push(batched.result);
                                }
                                None
                            }
                        }
                        WorkerMessage::Started(mut batch) => {
                            let (later, now): (Vec<_>, Vec<_>) = std::mem::take(&mut batch.steps)
                                .into_iter()
                                .filter(|step| wait(&step.step_id) != Some(false))
                                .partition(|step| wait(&step.step_id).is_some());
                            started.extend(now.into_iter().map(|step| Started {
                                worker_id: batch.worker_id.clone(),
                                step,
                            }));
                            batch.steps = later;
                            (!batch.steps.is_empty()).then_some(WorkerMessage::Started(batch))
                        }
                        WorkerMessage::Heartbeat(batch) => {
                            running.extend(
                                batch
                                    .steps
                                    .into_iter()
                                    .filter(|step| !held.contains_key(&step.step_id)),
                            );
                            None
                        }
                    };
                    match rest {
                        Some(message) => held_back.push(Received {
                            delivery,
                            message: Ok(message),
                        }),
                        None => deliveries.push(delivery),
                    }
                }
                let written = async {
                    let marked = transitions::mark_started(&mut tx, &started, self.lease).await?;
                    for started in marked.latencies {
                        self.metrics
                            .queue_latency
                            .get_or_create(&CoordinatorMetrics::namespace(&started.namespace))
                            .observe(started.latency);
                        report.started += 1;
                    }
                    let heartbeats = transitions::heartbeat(&mut tx, &running, self.lease).await?;
                    report.heartbeats = heartbeats.extended;
                    withdrawn = marked.withdrawn;
                    withdrawn.extend(heartbeats.withdrawn);
                    // Runs lost to a crash loop fail their steps, and their workers are told.
                    let applied = if marked.lost.is_empty() {
                        transitions::apply_results(&mut tx, &results, self.lease_ms).await?
                    } else {
                        let mut with_lost = results.clone();
                        for run in &marked.lost {
                            tracing::warn!(step_id = %run.step_id, task_id = %run.task_id,
                                attempts = run.attempts,
                                "a redelivered step was started again and again without an answer: failing it");
                            with_lost.push(lost_run_result(run));
                            withdrawn.push(RunningStep {
                                step_id: run.step_id,
                                dispatch_token: run.dispatch_token,
                            });
                        }
                        transitions::apply_results(&mut tx, &with_lost, self.lease_ms).await?
                    };
                    let finished =
                        transitions::finish_tasks(&mut tx, &applied.may_finish(), Some(self.lease_ms))
                            .await?;
                    tx.commit().await?;
                    Ok::<_, sqlx::Error>((applied, finished))
                }
                .await;
                written.map_err(|error| {
                    let error = anyhow::Error::from(error);
                    if !refused_for_data(&error) {
                        return Refused::whole(error);
                    }
                    // A split notice's held part goes back whole: its other steps were
                    // not applied either.
                    Refused {
                        error,
                        suspects: std::mem::take(&mut deliveries),
                        dead_lettered: std::mem::take(&mut dead_lettered),
                        held: std::mem::take(&mut held_back)
                            .into_iter()
                            .map(|held| self.receive(held.delivery))
                            .collect(),
                    }
                })
            })
            .await?;
        deliveries.extend(dead_lettered);
        report.results_applied = applied.applied;
        report.results_stale = applied.stale;
        let mut claimed = std::mem::take(&mut applied.claimed);
        claimed.extend(finished.claimed);
        let finished_children = finished.more_ready;
        let finished = finished.tasks;
        drop(spans);
        self.publisher.settled(
            started
                .iter()
                .map(|started| (started.step.step_id, started.step.dispatch_token))
                .chain(
                    results
                        .iter()
                        .map(|result| (result.step_id, result.dispatch_token)),
                ),
        );
        self.wake_events.notify_one();
        self.metrics
            .result_batch_size
            .observe(deliveries.len() as f64);
        self.metrics.results_held.inc_by(held_back.len() as u64);
        self.metrics.applied(&applied);
        self.metrics.finished(&finished);
        report.dispatched = claimed.len();
        report.tasks_finished = finished.len();
        report.withdrawn = withdrawn.len();
        self.withdraw(withdrawn);
        // A retry falls due later; a finished task of a limited template may let a
        // waiting one start; a fan-out's instances past the first batch wait ready: the
        // dispatcher offers those.
        if applied.retries_scheduled > 0
            || applied.more_ready
            || finished_children
            || finished.iter().any(|task| task.limited)
        {
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
        report.held = held_back.len();
        Ok(Applied {
            report,
            deliveries,
            held: held_back,
        })
    }
}

impl ResultProcessor {
    /// Tell workers to abort `runs` (committed as no longer wanted), in the background:
    /// the broadcast is advisory (the fence drops their results), and the batch is not
    /// to wait for the broker.
    fn withdraw(&self, runs: Vec<RunningStep>) {
        // A run named by a notice and a heartbeat of the same batch, once.
        let mut runs: Vec<(uuid::Uuid, uuid::Uuid)> = runs
            .into_iter()
            .map(|run| (run.step_id, run.dispatch_token))
            .collect();
        runs.sort_unstable();
        runs.dedup();
        if runs.is_empty() {
            return;
        }
        tracing::info!(
            runs = runs.len(),
            "telling workers to abort runs whose step was cancelled or dispatched again"
        );
        let (control, metrics) = (self.control.clone(), self.metrics.clone());
        tokio::spawn(async move {
            if let Err(error) = control.superseded(&runs).await {
                tracing::warn!(
                    error = format!("{error:#}"),
                    runs = runs.len(),
                    "cannot tell workers to abort withdrawn runs; they run on, their results dropped"
                );
            } else {
                metrics.runs_withdrawn.inc_by(runs.len() as u64);
            }
        });
    }
}

impl Service for ResultProcessor {
    const NAME: &'static str = "result_processor";

    /// Run until `stop` is cancelled.
    async fn run(self, stop: CancellationToken) {
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
            // Deliveries a batch held back (another coordinator was applying their
            // steps): they lead the next batch.
            let mut held: Vec<Received> = Vec::new();
            let mut held_wait = HELD_RETRY;
            loop {
                let mut batch = std::mem::take(&mut held);
                // Wait for the transaction that holds their steps (usually the other
                // coordinator's batch, a few milliseconds) rather than poll for it.
                let next = if batch.is_empty() {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        next = consumer.next() => Some(next),
                    }
                } else if self.wait_for_holders(&batch).await {
                    // Free now: retry at once, with whatever is already buffered.
                    None
                } else {
                    // Still held after the wait: try again a little later, or with
                    // the next delivery.
                    tokio::select! {
                        () = stop.cancelled() => break,
                        next = consumer.next() => Some(next),
                        () = tokio::time::sleep(held_wait) => None,
                    }
                };
                match next {
                    None => {}
                    Some(None) => break,
                    Some(Some(Ok(delivery))) => batch.push(self.receive(delivery)),
                    Some(Some(Err(error))) => {
                        tracing::error!(%error, "results consumer failed");
                        break;
                    }
                }
                // Take what is already buffered, without waiting, up to the batch size
                // in steps (a message of results or notices names many).
                let mut weight: usize = batch.iter().map(Received::weight).sum();
                while (weight as i64) < self.batch_size {
                    match consumer.next().now_or_never() {
                        Some(Some(Ok(delivery))) => {
                            let received = self.receive(delivery);
                            weight += received.weight();
                            batch.push(received);
                        }
                        _ => break,
                    }
                }
                let size = batch.len();
                held = self.finish_batch(batch).await;
                // A row held for longer than a batch (an operator's open transaction, a
                // stalled coordinator) is retried less and less often, not spun on.
                held_wait = if held.len() < size {
                    HELD_RETRY
                } else {
                    (held_wait * 2).min(HELD_RETRY_MAX)
                };
            }
            tracing::info!("stopped");
        }
        .instrument(span)
        .await
    }
}

impl ResultProcessor {
    /// A delivery with what it says.
    fn receive(&self, delivery: Delivery) -> Received {
        let message = self.decode(&delivery);
        Received { delivery, message }
    }

    /// What a delivery on the results queue says: a worker's message, or, for a step
    /// message a step queue dead-lettered (quorum queues route those here), the failed
    /// attempt it stands for. `Err` says why it is poison.
    fn decode(&self, delivery: &Delivery) -> Result<WorkerMessage, String> {
        if let Err(error) = self.topology.verify(&delivery.data, &delivery.properties) {
            return Err(format!(
                "{}: {error}",
                tasker_shared::signing::BAD_SIGNATURE
            ));
        }
        match self.topology.dead_lettered_step(&delivery.properties) {
            Some(reason) => undeliverable(
                &delivery.data,
                broker::carries_step_batch(&delivery.properties),
                &reason,
            ),
            None => WorkerMessage::decode(&delivery.data).map_err(|e| e.to_string()),
        }
    }

    /// Copy a poison delivery to the dead-letter queue with `reason`, and count it.
    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> anyhow::Result<()> {
        let hash = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            delivery.data.hash(&mut hasher);
            hasher.finish()
        };
        let copies = || self.copied.lock().unwrap_or_else(|p| p.into_inner());
        if delivery.redelivered && copies().contains(&hash) {
            tracing::debug!("poison message handed back with its batch; copied already");
            return Ok(());
        }
        tracing::warn!(%reason, "poison message on the results queue; dead-lettering it");
        self.topology
            .dead_letter(
                &self.confirm_channel,
                None,
                &delivery.data,
                &self.topology.results_queue(),
                reason,
            )
            .await?;
        self.metrics.dead_lettered.inc();
        let mut copies = copies();
        if copies.len() >= COPIES_REMEMBERED {
            copies.pop_front();
        }
        copies.push_back(hash);
        Ok(())
    }

    /// Wait, in a transaction of its own, until the steps of held-back deliveries come
    /// free, for at most [`HELD_WAIT`]. Returns whether they did; a failure counts as
    /// not (the next batch holds them again).
    async fn wait_for_holders(&self, held: &[Received]) -> bool {
        let messages = held.iter().filter_map(|r| r.message.as_ref().ok());
        let steps: Vec<uuid::Uuid> = messages.clone().flat_map(WorkerMessage::steps).collect();
        let results: Vec<uuid::Uuid> = messages.flat_map(WorkerMessage::result_steps).collect();
        let wait = self.db.run(async |conn| {
            let mut tx = conn.begin().await?;
            let free = transitions::wait_for_steps(&mut tx, &steps, &results, HELD_WAIT).await?;
            tx.rollback().await?;
            Ok::<_, sqlx::Error>(free)
        });
        match wait.await {
            Ok(free) => free,
            Err(error) => {
                tracing::warn!(%error, "waiting for held steps failed");
                false
            }
        }
    }

    /// Apply and acknowledge a batch; returns the deliveries it held back, unacked.
    async fn finish_batch(&self, batch: Vec<Received>) -> Vec<Received> {
        let Some(last) = batch.iter().max_by_key(|r| r.delivery.delivery_tag) else {
            return Vec::new();
        };
        let last = last.delivery.acker.clone();
        let size = batch.len();
        match self.apply_batch(batch).await {
            Ok(applied) => {
                tracing::debug!(report = ?applied.report, "batch applied");
                if let Err(error) = ack(&applied.deliveries, &applied.held).await {
                    self.metrics.broker_errors.inc();
                    tracing::warn!(%error, "ack failed; the batch will be redelivered and applied again as a no-op (results fenced, notices matched by start time)");
                }
                applied.held
            }
            Err(refused) if !refused.suspects.is_empty() => {
                self.metrics.database_errors.inc();
                self.apply_one_by_one(refused).await
            }
            Err(Refused { error, .. }) => {
                self.metrics.database_errors.inc();
                tracing::warn!(
                    error = format!("{error:#}"),
                    size,
                    "applying results failed; requeueing the batch"
                );
                let requeue = BasicNackOptions {
                    multiple: true,
                    requeue: true,
                };
                if let Err(error) = last.nack(requeue).await {
                    self.metrics.broker_errors.inc();
                    tracing::warn!(%error, "nack failed");
                }
                // Give the database a moment before the redelivered batch comes back.
                tokio::time::sleep(Duration::from_millis(500)).await;
                Vec::new()
            }
        }
    }

    /// Apply the deliveries of a batch PostgreSQL refused for its data one at a time, and
    /// dead-letter those it refuses alone, with its error as the reason: otherwise such
    /// a message would come back at the head of every batch and stop every result
    /// behind it. When it refuses every one of several alone, or on a failure of
    /// another kind, they go back to the queue instead. Returns the deliveries held
    /// back meanwhile, for the next batch.
    async fn apply_one_by_one(&self, refused: Refused) -> Vec<Received> {
        let Refused {
            error,
            mut suspects,
            dead_lettered,
            mut held,
        } = refused;
        tracing::warn!(
            error = format!("{error:#}"),
            messages = suspects.len(),
            "PostgreSQL refused a batch of results for its data; applying its messages one by one"
        );
        if let Err(error) = ack_each(&dead_lettered).await {
            self.metrics.broker_errors.inc();
            tracing::warn!(%error, "ack failed");
        }
        suspects.sort_by_key(|delivery| delivery.delivery_tag);
        let count = suspects.len();
        let mut refused_alone: Vec<(Delivery, anyhow::Error)> = Vec::new();
        let mut requeue: Vec<lapin::Acker> = Vec::new();
        let mut suspects = suspects.into_iter();
        while let Some(delivery) = suspects.next() {
            let acker = delivery.acker.clone();
            let failed = match self.apply_batch(vec![self.receive(delivery)]).await {
                Ok(applied) => {
                    held.extend(applied.held);
                    ack_each(&applied.deliveries)
                        .await
                        .map_err(anyhow::Error::from)
                }
                Err(Refused {
                    error,
                    suspects: mut alone,
                    ..
                }) if !alone.is_empty() => {
                    refused_alone.push((alone.remove(0), error));
                    Ok(())
                }
                Err(Refused { error, .. }) => Err(error),
            };
            if let Err(error) = failed {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "applying results one by one failed; requeueing the rest"
                );
                requeue.push(acker);
                requeue.extend(suspects.map(|delivery| delivery.acker));
                break;
            }
        }
        // Every message of the batch refused on its own: the fault is not theirs (one of
        // our statements, a setting), and dead-lettering them would lose every result.
        // They go back to the queue, as any failed batch does. (A batch of one cannot
        // tell the two apart: its message is dead-lettered.)
        if count > 1 && refused_alone.len() == count {
            tracing::error!(
                messages = count,
                "PostgreSQL refused every message of a batch on its own; requeueing them"
            );
            requeue.extend(refused_alone.drain(..).map(|(delivery, _)| delivery.acker));
        }
        for (delivery, error) in refused_alone {
            let reason = format!("refused by PostgreSQL: {error:#}");
            let done = match self.dead_letter(&delivery, &reason).await {
                Ok(()) => delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map(drop)
                    .map_err(anyhow::Error::from),
                Err(error) => Err(error),
            };
            if let Err(error) = done {
                tracing::warn!(error = format!("{error:#}"), "dead-lettering failed");
                requeue.push(delivery.acker);
            }
        }
        if !requeue.is_empty() {
            let options = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            for acker in requeue {
                if let Err(error) = acker.nack(options).await {
                    self.metrics.broker_errors.inc();
                    tracing::warn!(%error, "nack failed");
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        held
    }
}

/// Acknowledge each of `deliveries` on its own.
async fn ack_each(deliveries: &[Delivery]) -> lapin::Result<()> {
    for delivery in deliveries {
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

/// The span of applying one result: a child of the worker's `execute_step` (through
/// `traceparent`), open until its batch commits.
fn apply_span(result: &StepResult, traceparent: Option<&str>) -> tracing::Span {
    let span = tracing::debug_span!("apply_result", task_id = %result.task_id,
        step_id = %result.step_id, outcome = ?result.outcome,
        trace_id = tracing::field::Empty);
    tasker_shared::telemetry::adopt(&span, traceparent);
    span
}

/// The longest wait for the transaction holding the steps of held-back deliveries:
/// several of the other coordinator's batches.
const HELD_WAIT: Duration = Duration::from_millis(100);
/// After a wait that timed out, how long held-back deliveries wait before they are
/// tried again, unless a new delivery comes first.
const HELD_RETRY: Duration = Duration::from_millis(5);
/// The longest wait between retries of deliveries that stay held.
const HELD_RETRY_MAX: Duration = Duration::from_millis(500);

/// Acknowledge the applied deliveries of a batch, not the held ones. Every unacked
/// delivery below the first held one is in the batch (the held ones always lead the
/// next), so one `multiple` ack covers those; the few applied after it are acked one
/// by one.
async fn ack(applied: &[Delivery], held: &[Received]) -> lapin::Result<()> {
    let first_held = held
        .iter()
        .map(|r| r.delivery.delivery_tag)
        .min()
        .unwrap_or(u64::MAX);
    let below = applied
        .iter()
        .filter(|d| d.delivery_tag < first_held)
        .max_by_key(|d| d.delivery_tag);
    if let Some(delivery) = below {
        delivery
            .acker
            .ack(BasicAckOptions { multiple: true })
            .await?;
    }
    for delivery in applied.iter().filter(|d| d.delivery_tag > first_held) {
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

/// The failure of a step whose redelivered message was started past its `retry_limit`
/// by [`transitions::RESTARTS_PAST_RETRY_LIMIT`] without an answer (see
/// [`transitions::mark_started`]): permanent, so that its message stops taking workers
/// down. Its later copies are answered as withdrawn, and workers skip them.
fn lost_run_result(run: &transitions::LostRun) -> StepResult {
    let now = chrono::Utc::now();
    StepResult {
        schema_version: SCHEMA_VERSION,
        task_id: run.task_id,
        step_id: run.step_id,
        dispatch_token: run.dispatch_token,
        outcome: Outcome::PermanentError,
        results: None,
        error: Some(tasker_shared::messages::StepError {
            message: format!(
                "the step's message was started {} times and no run answered: each worker \
                 that took it stopped or lost its broker connection while running it (does \
                 the handler crash its worker?); it is not started again",
                run.attempts + 1
            ),
            code: Some(WORKER_LOST.to_owned()),
            retry_after_seconds: None,
        }),
        started_at: now,
        finished_at: now,
        worker_id: "coordinator".to_owned(),
    }
}

/// The code of [`lost_run_result`].
const WORKER_LOST: &str = "worker_lost";

/// A step message its step queue dead-lettered (`reason`, RabbitMQ's
/// `x-first-death-reason`: most often `delivery_limit`, delivered that many times and
/// never acknowledged because whoever took it died holding it), as the failed attempt it
/// is. The step is retried with backoff like any retryable failure, so a message that
/// kills its workers reaches `error` after its retry limit instead of circulating, and a
/// message dropped by the queue for another reason is not left `enqueued` for ever.
fn undeliverable(body: &[u8], batch: bool, reason: &str) -> Result<WorkerMessage, String> {
    let what = if batch { "batch of steps" } else { "step" };
    let steps = steps_of(body, batch).map_err(|e| format!("a dead-lettered {what}: {e}"))?;
    let (code, message) = if reason == "delivery_limit" {
        (
            "delivery_limit",
            format!(
                "the step message was delivered {} times and never acknowledged: the workers \
                 that took it stopped while holding it (crashed, killed, out of memory)",
                broker::DELIVERY_LIMIT
            ),
        )
    } else {
        (
            "dead_lettered",
            format!("the broker dead-lettered the step message ({reason}) before it ran"),
        )
    };
    let mut results: Vec<StepResult> = steps
        .iter()
        .map(|step| {
            StepResult::not_run(
                step,
                Outcome::RetryableError,
                code,
                message.clone(),
                "rabbitmq".to_owned(),
            )
        })
        .collect();
    if !batch && let Some(result) = results.pop() {
        return Ok(WorkerMessage::Result(result));
    }
    // Each step of a batch is the failed attempt it stands for; a step of it that did
    // run is past that dispatch, and its failure is dropped by the fence.
    Ok(WorkerMessage::Results(ResultBatch {
        schema_version: SCHEMA_VERSION,
        results: results
            .into_iter()
            .map(|result| BatchedResult {
                result,
                traceparent: None,
            })
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tasker_shared::messages::{BatchedStep, StepBatch, StepMessage};
    use uuid::Uuid;

    use super::*;

    fn step(n: u128) -> StepMessage {
        StepMessage {
            schema_version: SCHEMA_VERSION,
            task_id: Uuid::from_u128(n),
            step_id: Uuid::from_u128(100 + n),
            step_name: "s".into(),
            namespace: "ns".into(),
            template: "t@1".into(),
            handler: "noop".into(),
            config: json!({}),
            context: json!({}),
            parents: Default::default(),
            attempt: 2,
            retry_limit: 3,
            deferrals: 0,
            dispatch_token: Uuid::from_u128(200 + n),
            timeout_ms: 1_000,
            dispatched_at: chrono::Utc::now(),
            item: None,
            index: None,
        }
    }

    #[test]
    fn a_dead_lettered_step_or_batch_is_the_failed_attempt_of_each_step_it_carried() {
        let single = serde_json::to_vec(&step(1)).unwrap();
        let WorkerMessage::Result(result) =
            undeliverable(&single, false, "delivery_limit").unwrap()
        else {
            panic!("a single step's message is one result");
        };
        assert_eq!(
            (result.step_id, result.dispatch_token),
            (Uuid::from_u128(101), Uuid::from_u128(201))
        );
        assert_eq!(result.outcome, Outcome::RetryableError);
        assert_eq!(
            result.error.unwrap().code.as_deref(),
            Some("delivery_limit")
        );

        let (first, second) = (step(1), step(2));
        let batch = serde_json::to_vec(&StepBatch {
            schema_version: SCHEMA_VERSION,
            steps: vec![
                BatchedStep {
                    step: &first,
                    traceparent: None,
                },
                BatchedStep {
                    step: &second,
                    traceparent: None,
                },
            ],
        })
        .unwrap();
        let WorkerMessage::Results(results) = undeliverable(&batch, true, "expired").unwrap()
        else {
            panic!("a batch is the results of its steps");
        };
        let fences: Vec<_> = results
            .results
            .iter()
            .map(|r| (r.result.step_id, r.result.dispatch_token))
            .collect();
        assert_eq!(
            fences,
            [
                (Uuid::from_u128(101), Uuid::from_u128(201)),
                (Uuid::from_u128(102), Uuid::from_u128(202))
            ]
        );
        let codes: Vec<_> = results
            .results
            .iter()
            .map(|r| r.result.error.as_ref().unwrap().code.clone())
            .collect();
        assert_eq!(codes, vec![Some("dead_lettered".to_owned()); 2]);
        // A batch's body read as one step, or the reverse, is poison.
        assert!(undeliverable(&batch, false, "expired").is_err());
        assert!(undeliverable(&single, true, "expired").is_err());
    }
}
