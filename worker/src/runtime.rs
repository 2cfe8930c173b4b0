//! The worker runtime: consume steps, run them concurrently, publish results, ack.
//!
//! ```text
//!  namespace queues ──consumers──▶ deliveries (bounded) ──▶ one task per step
//!                                                            │ started notice ──▶ batcher ──▶ results queue
//!                                                            │ run handler (timeout, panic caught)
//!                                                            └ publish result, await confirm, then ack
//! ```
//!
//! Concurrency is bounded twice: a semaphore of `concurrency` permits bounds the running
//! handlers, and the broker's prefetch (channel-wide, twice `concurrency`) bounds the
//! messages held. A step frees its handler slot as soon as its handler returns, not when
//! the broker confirms its result (a persistent message's confirm waits for the broker's
//! disk write, tens of milliseconds under load); the step's message stays unacked, and
//! counts against the prefetch, until that confirm arrives. On shutdown the consumers are
//! cancelled, messages received but not started are handed back to the broker, running
//! steps finish and publish their results, and only then does the connection close.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};
use tasker_shared::broker::{self, TRACEPARENT_HEADER, Topology, header_str, persistent};
use tasker_shared::messages::{
    ControlMessage, Outcome, SCHEMA_VERSION, StepError as WireError, StepMessage, StepResult,
    StepStarted, WorkerMessage,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::Instrument;

use crate::executor::{self, InFlight};
use crate::handler::HandlerRegistry;
use crate::metrics::{HandlerOutcome, WorkerMetrics};
use crate::notices::Notice;
use crate::settings::WorkerSettings;

/// A connected worker, ready to run.
pub struct Worker {
    registry: Arc<HandlerRegistry>,
    /// The connection made by [`Worker::build`], used by the first session.
    connection: Option<Connection>,
    broker: tasker_shared::config::BrokerSettings,
    topology: Topology,
    worker_id: String,
    concurrency: u16,
    namespaces: Option<Vec<String>>,
    heartbeat_interval: Duration,
    metrics_addr: Option<std::net::SocketAddr>,
    metrics: Arc<WorkerMetrics>,
    max_result_bytes: usize,
}

/// What every step task shares.
struct Shared {
    registry: Arc<HandlerRegistry>,
    topology: Topology,
    worker_id: String,
    /// Confirm-mode channel for results and dead letters.
    publish: Channel,
    started: mpsc::UnboundedSender<Notice>,
    inflight: InFlight,
    metrics: Arc<WorkerMetrics>,
    /// `TASKER_MAX_RESULT_BYTES`: larger results fail the step (see the executor).
    max_result_bytes: usize,
}

/// The consumers this worker runs, so shutdown can cancel them.
#[derive(Default)]
struct Consumers {
    /// Namespaces being consumed. A std Mutex: held only to read or insert.
    namespaces: Mutex<HashSet<String>>,
    tags: Mutex<Vec<ShortString>>,
}

impl Consumers {
    /// The namespaces consumed now, sorted.
    fn namespaces(&self) -> Vec<String> {
        let mut namespaces: Vec<String> = self
            .namespaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        namespaces.sort();
        namespaces
    }
}

impl Worker {
    /// Connect to RabbitMQ and declare the topology.
    pub async fn build(
        settings: WorkerSettings,
        registry: HandlerRegistry,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            settings.concurrency > 0,
            "TASKER_CONCURRENCY must be at least 1"
        );
        let topology = Topology::new(settings.broker.amqp_prefix.clone());
        let worker_id = settings.worker_id();
        let connection =
            broker::connect(&settings.broker, &format!("tasker-worker {worker_id}")).await?;
        let connection = declare_topology(connection, &topology).await?;
        Ok(Worker {
            registry: Arc::new(registry),
            connection: Some(connection),
            broker: settings.broker.clone(),
            topology,
            worker_id,
            concurrency: settings.concurrency,
            namespaces: settings.selected_namespaces(),
            heartbeat_interval: Duration::from_millis(settings.heartbeat_interval_ms.max(100)),
            metrics_addr: settings.metrics_addr,
            metrics: Arc::new(WorkerMetrics::new(settings.concurrency)),
            max_result_bytes: settings.max_result_bytes,
        })
    }

    /// Messages held at most: twice the handler slots (see the module docs).
    fn prefetch(&self) -> u16 {
        self.concurrency.saturating_mul(2)
    }

    /// This worker's id.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Run until `shutdown` resolves, then drain gracefully.
    ///
    /// A lost broker connection ends the current session the same way as a shutdown
    /// (no new steps; steps received but not started go back; running steps finish), then
    /// the worker reconnects, retrying without limit, and carries on. Steps whose results
    /// could not be published on the lost connection are redelivered by the broker.
    pub async fn run_until_stopped(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let metrics_server = match self.metrics_addr {
            Some(address) => {
                Some(crate::metrics::serve(address, self.metrics.clone(), stop_rx).await?)
            }
            None => None,
        };
        let inflight = InFlight::default();
        tokio::pin!(shutdown);
        let mut connection = self.connection.take();
        loop {
            let current = match connection.take() {
                Some(current) => current,
                None => {
                    let name = format!("tasker-worker {}", self.worker_id);
                    let topology = &self.topology;
                    let reconnect = broker::reconnect(&self.broker, &name, |connection| {
                        declare_topology(connection, topology)
                    });
                    tokio::select! {
                        () = &mut shutdown => break,
                        current = reconnect => {
                            self.metrics.broker_reconnects.inc();
                            tracing::info!(worker_id = %self.worker_id, "reconnected to RabbitMQ");
                            current
                        }
                    }
                }
            };
            match self.session(current, &inflight, &mut shutdown).await {
                Ok(()) => break,
                Err(error) => {
                    self.metrics.broker_errors.inc();
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "lost the connection to RabbitMQ; reconnecting"
                    );
                    // Never spin: a session that fails at once waits a moment first.
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        let _ = stop_tx.send(true);
        if let Some(server) = metrics_server {
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        }
        tracing::info!(worker_id = %self.worker_id, "worker stopped");
        Ok(())
    }

    /// Consume and run steps on one connection until `shutdown` (`Ok`) or until the
    /// connection is lost (`Err`), then drain.
    async fn session(
        &self,
        connection: Connection,
        inflight: &InFlight,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> anyhow::Result<()> {
        let connection = &connection;
        let consume = connection.create_channel().await?;
        // Channel-wide prefetch: the limit holds across every namespace consumed.
        consume
            .basic_qos(self.prefetch(), BasicQosOptions { global: true })
            .await?;
        let (started_tx, started_rx) = mpsc::unbounded_channel();
        let batcher = tokio::spawn(crate::notices::run(
            started_rx,
            connection.create_channel().await?,
            self.topology.clone(),
            self.worker_id.clone(),
        ));
        let (stop_tx, stop_rx) = watch::channel(false);
        let consumers = Arc::new(Consumers::default());
        let shared = Arc::new(Shared {
            registry: self.registry.clone(),
            topology: self.topology.clone(),
            worker_id: self.worker_id.clone(),
            publish: broker::confirm_channel(connection).await?,
            started: started_tx,
            inflight: inflight.clone(),
            metrics: self.metrics.clone(),
            max_result_bytes: self.max_result_bytes,
        });
        let (deliveries_tx, mut deliveries) =
            mpsc::channel::<Delivery>(usize::from(self.concurrency));

        if let Some(namespaces) = &self.namespaces {
            for namespace in namespaces {
                start_consumer(
                    &consume,
                    &self.topology,
                    &consumers,
                    namespace,
                    deliveries_tx.clone(),
                )
                .await?;
            }
        }
        // Status after the fixed namespaces' consumers exist, so the first one lists them.
        let status_consumers = consumers.clone();
        let heartbeats = tokio::spawn(crate::notices::heartbeats(
            crate::notices::Heartbeats {
                inflight: inflight.clone(),
                channel: connection.create_channel().await?,
                topology: self.topology.clone(),
                worker_id: self.worker_id.clone(),
                interval: self.heartbeat_interval,
                concurrency: self.concurrency,
                all_namespaces: self.namespaces.is_none(),
                namespaces: Box::new(move || status_consumers.namespaces()),
            },
            stop_rx,
        ));
        let control = tokio::spawn(follow_control(
            shared.clone(),
            connection.create_channel().await?,
            consume.clone(),
            consumers.clone(),
            // Only a worker serving every namespace follows the announcements.
            self.namespaces.is_none().then(|| deliveries_tx.clone()),
        ));
        drop(deliveries_tx);
        tracing::info!(worker_id = %self.worker_id, concurrency = self.concurrency,
            namespaces = ?self.namespaces.as_deref().unwrap_or(&["*".to_owned()]),
            handlers = ?self.registry.names(), "worker started");

        let running = Arc::new(Semaphore::new(usize::from(self.concurrency)));
        let unacked = Arc::new(Semaphore::new(usize::from(self.prefetch())));
        let mut health = tokio::time::interval(Duration::from_secs(1));
        let outcome = loop {
            tokio::select! {
                () = shutdown.as_mut() => break Ok(()),
                _ = health.tick() => {
                    if !connection.status().connected() {
                        break Err(anyhow::anyhow!("lost the connection to RabbitMQ"));
                    }
                }
                delivery = deliveries.recv() => {
                    let Some(delivery) = delivery else {
                        break Err(anyhow::anyhow!("every consumer stopped"));
                    };
                    let held = unacked.clone().acquire_owned().await?;
                    let slot = running.clone().acquire_owned().await?;
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        handle(&shared, delivery, slot).await;
                        drop(held);
                    });
                }
            }
        };

        tracing::info!("stopping: no new steps; finishing the running ones");
        // Every wait below but the running steps' (bounded by their timeouts) has a limit:
        // a broker in trouble must not keep a stopping worker alive.
        let patience = Duration::from_secs(5);
        control.abort();
        let tags: Vec<ShortString> = consumers
            .tags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for tag in tags {
            let _ = tokio::time::timeout(
                patience,
                consume.basic_cancel(tag, BasicCancelOptions::default()),
            )
            .await;
        }
        // Received but not started: hand back to the broker for another worker.
        deliveries.close();
        while let Ok(delivery) = deliveries.try_recv() {
            let nack = delivery.acker.nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            });
            let _ = tokio::time::timeout(patience, nack).await;
        }
        let _ = unacked.acquire_many(u32::from(self.prefetch())).await;
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(patience, heartbeats).await;
        drop(shared);
        let _ = tokio::time::timeout(patience, batcher).await;
        let _ = tokio::time::timeout(patience, consume.close(200, "worker stopped".into())).await;
        let _ =
            tokio::time::timeout(patience, connection.close(200, "worker stopped".into())).await;
        outcome
    }
}

/// Declare the base topology on a fresh connection.
async fn declare_topology(
    connection: Connection,
    topology: &Topology,
) -> anyhow::Result<Connection> {
    let channel = connection.create_channel().await?;
    topology
        .declare_base(&channel)
        .await
        .context("declaring the broker topology")?;
    channel.close(200, "OK".into()).await?;
    Ok(connection)
}

async fn start_consumer(
    channel: &Channel,
    topology: &Topology,
    consumers: &Consumers,
    namespace: &str,
    deliveries: mpsc::Sender<Delivery>,
) -> anyhow::Result<()> {
    if !consumers
        .namespaces
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(namespace.to_owned())
    {
        return Ok(());
    }
    topology.declare_namespace(channel, namespace).await?;
    let mut consumer = channel
        .basic_consume(
            topology.step_queue(namespace).into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    consumers
        .tags
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(consumer.tag());
    tracing::info!(%namespace, queue = %topology.step_queue(namespace), "consuming");
    tokio::spawn(async move {
        while let Some(delivery) = consumer.next().await {
            match delivery {
                Ok(delivery) => {
                    if deliveries.send(delivery).await.is_err() {
                        break;
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "step consumer failed");
                    break;
                }
            }
        }
    });
    Ok(())
}

/// Follow the control exchange: abort the steps of cancelled tasks and, for a worker
/// serving every namespace (`deliveries` given), consume each namespace announced.
async fn follow_control(
    shared: Arc<Shared>,
    control: Channel,
    consume: Channel,
    consumers: Arc<Consumers>,
    deliveries: Option<mpsc::Sender<Delivery>>,
) {
    let (topology, worker_id) = (&shared.topology, &shared.worker_id);
    let subscribe = async {
        let queue = control
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        control
            .queue_bind(
                queue.name().clone(),
                topology.control_exchange().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = control
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        if deliveries.is_some() {
            let hello = serde_json::to_vec(&ControlMessage::Hello {
                worker_id: worker_id.clone(),
            })
            .unwrap_or_default();
            control
                .basic_publish(
                    topology.control_exchange().into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &hello,
                    persistent(),
                )
                .await?;
        }
        lapin::Result::Ok(consumer)
    };
    let mut consumer = match subscribe.await {
        Ok(consumer) => consumer,
        Err(error) => {
            tracing::error!(%error, "cannot follow the control exchange");
            return;
        }
    };
    while let Some(Ok(delivery)) = consumer.next().await {
        match serde_json::from_slice(&delivery.data) {
            Ok(ControlMessage::Namespaces { namespaces }) => {
                let Some(deliveries) = &deliveries else {
                    continue;
                };
                for namespace in namespaces {
                    if let Err(error) = start_consumer(
                        &consume,
                        topology,
                        &consumers,
                        &namespace,
                        deliveries.clone(),
                    )
                    .await
                    {
                        tracing::error!(%error, %namespace, "cannot consume namespace");
                    }
                }
            }
            Ok(ControlMessage::CancelTask { task_id }) => {
                let aborted = shared.inflight.cancel_task(task_id);
                shared.metrics.aborted_cancelled.inc_by(aborted as u64);
                if aborted > 0 {
                    tracing::info!(%task_id, aborted, "task cancelled: aborted its running steps");
                }
            }
            Ok(ControlMessage::Hello { .. } | ControlMessage::WorkerStatus { .. }) => {}
            // Advisory and fanned out to every process: dropped and logged, not
            // dead-lettered (each receiver would file its own copy) nor retried.
            Err(error) => {
                shared.metrics.control_dropped.inc();
                tracing::warn!(
                    %error,
                    bytes = delivery.data.len(),
                    "dropped an undecodable control message"
                );
            }
        }
    }
}

/// Run one delivered step to the end: its result confirmed by the broker, then the ack.
/// `slot` is a handler slot, given back as soon as the handler returns.
async fn handle(shared: &Shared, delivery: Delivery, slot: OwnedSemaphorePermit) {
    let source_queue = shared.topology.step_queue(delivery.routing_key.as_str());
    let message = match StepMessage::decode(&delivery.data) {
        Ok(message) => message,
        Err(error) => {
            tracing::warn!(%error, "poison step message; dead-lettering it");
            shared.metrics.dead_letter("undecodable");
            dead_letter(shared, &delivery, &error.to_string(), &source_queue).await;
            return;
        }
    };
    // The step's span: a child of the coordinator's dispatch (through the message's
    // traceparent header); every log line about the step carries its ids and trace id.
    let span = tracing::info_span!("execute_step", task_id = %message.task_id,
        step_id = %message.step_id, step = %message.step_name, handler = %message.handler,
        attempt = message.attempt, trace_id = tracing::field::Empty);
    let parent = header_str(&delivery.properties, TRACEPARENT_HEADER);
    tasker_shared::telemetry::adopt(&span, parent.as_deref());
    run_step(shared, delivery, message, source_queue, span.clone(), slot)
        .instrument(span)
        .await;
}

/// The part of [`handle`] inside the step's span.
async fn run_step(
    shared: &Shared,
    delivery: Delivery,
    message: StepMessage,
    source_queue: String,
    span: tracing::Span,
    slot: OwnedSemaphorePermit,
) {
    if shared.inflight.is_cancelled(message.task_id) {
        tracing::info!("skipped: the task was cancelled");
        shared.metrics.skipped_cancelled.inc();
        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        return;
    }
    let Some(handler) = shared.registry.get(&message.handler) else {
        let reason = format!(
            "unknown handler `{}`; this worker has: {}",
            message.handler,
            shared.registry.names().join(", ")
        );
        tracing::warn!(%reason, "dead-lettering the step and failing it");
        let now = chrono::Utc::now();
        let result = StepResult {
            schema_version: SCHEMA_VERSION,
            task_id: message.task_id,
            step_id: message.step_id,
            dispatch_token: message.dispatch_token,
            outcome: Outcome::PermanentError,
            results: None,
            error: Some(WireError {
                message: reason.clone(),
                code: Some("unknown_handler".into()),
                retry_after_seconds: None,
            }),
            started_at: now,
            finished_at: now,
            worker_id: shared.worker_id.clone(),
        };
        if publish_result(shared, &result, None).await.is_ok() {
            shared.metrics.dead_letter("unknown_handler");
            dead_letter(shared, &delivery, &reason, &source_queue).await;
        } else {
            requeue(&delivery).await;
        }
        return;
    };

    let answered = Arc::new(AtomicBool::new(false));
    let _ = shared.started.send(Notice {
        step: StepStarted {
            step_id: message.step_id,
            dispatch_token: message.dispatch_token,
            started_at: chrono::Utc::now(),
            redelivered: delivery.redelivered,
        },
        answered: answered.clone(),
    });
    shared.metrics.in_flight.inc();
    let result = executor::execute(
        handler,
        &message,
        &shared.worker_id,
        &shared.inflight,
        shared.max_result_bytes,
    )
    .await;
    shared.metrics.in_flight.dec();
    drop(slot);
    let Some(result) = result else {
        // Aborted because the task was cancelled: nothing to report.
        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        return;
    };
    let outcome = serde_json::to_value(result.outcome)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let seconds = (result.finished_at - result.started_at)
        .num_microseconds()
        .unwrap_or(0) as f64
        / 1e6;
    shared
        .metrics
        .step_duration
        .get_or_create(&HandlerOutcome {
            handler: message.handler.clone(),
            outcome,
        })
        .observe(seconds.max(0.0));
    match &result.error {
        None => tracing::debug!("step succeeded"),
        Some(error) => {
            tracing::info!(outcome = ?result.outcome, code = ?error.code, message = %error.message, "step failed")
        }
    }
    match publish_result(
        shared,
        &result,
        tasker_shared::telemetry::traceparent(&span),
    )
    .await
    {
        Ok(()) => {
            // The result is safe with the broker and records the start itself.
            answered.store(true, Ordering::Release);
            if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
                shared.metrics.broker_errors.inc();
                tracing::warn!(%error, "ack failed; the step will be redelivered and its duplicate result dropped");
            }
        }
        Err(error) => {
            shared.metrics.broker_errors.inc();
            tracing::warn!(
                error = format!("{error:#}"),
                "cannot publish the result; handing the step back"
            );
            requeue(&delivery).await;
        }
    }
}

async fn publish_result(
    shared: &Shared,
    result: &StepResult,
    traceparent: Option<String>,
) -> anyhow::Result<()> {
    let body = serde_json::to_vec(&WorkerMessage::Result(result.clone()))?;
    let mut properties = persistent();
    if let Some(traceparent) = traceparent {
        let mut headers = FieldTable::default();
        headers.insert(
            TRACEPARENT_HEADER.into(),
            lapin::types::AMQPValue::LongString(traceparent.into()),
        );
        properties = properties.with_headers(headers);
    }
    let confirm = broker::await_confirm(
        shared
            .publish
            .basic_publish(
                "".into(),
                shared.topology.results_queue().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            )
            .await?,
    )
    .await?;
    anyhow::ensure!(confirm.is_ack(), "the broker refused the result");
    anyhow::ensure!(
        confirm.take_message().is_none(),
        "the results queue is missing"
    );
    Ok(())
}

async fn dead_letter(shared: &Shared, delivery: &Delivery, reason: &str, source_queue: &str) {
    match shared
        .topology
        .dead_letter(&shared.publish, &delivery.data, source_queue, reason)
        .await
    {
        Ok(()) => {
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        }
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                "cannot dead-letter a message; handing it back"
            );
            requeue(delivery).await;
        }
    }
}

async fn requeue(delivery: &Delivery) {
    // Pause so a broker in trouble is not hammered with the same message.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = delivery
        .acker
        .nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await;
}
