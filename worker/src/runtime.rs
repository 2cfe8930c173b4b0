//! The worker runtime: consume steps, run them concurrently, publish results, ack.
//!
//! ```text
//!  namespace queues ──consumers──▶ deliveries (bounded) ──▶ one task per delivery
//!                                          (waits for a handler slot, then per step)
//!                                                            │ started notice ──▶ batcher ──▶ results queue
//!                                                            │ run handler (timeout, panic caught)
//!                                                            └ result ──▶ sender ──▶ results queue
//!                                                              (confirmed, then ack)
//! ```
//!
//! A message carries one step, or a batch of up to `STEPS_PER_MESSAGE` steps of one
//! namespace (AMQP `type` `steps`): each step of a batch runs as a step message of its
//! own would, and the message is acked once every one of them is answered (or handed
//! back whole once they are, if one of them was).
//!
//! Concurrency is bounded twice: a semaphore of `concurrency` permits bounds the running
//! handlers (across broker sessions), and the broker's prefetch (channel-wide, twice
//! `concurrency`) bounds the messages held. A step frees its handler slot as soon as its
//! handler returns, not when the broker confirms its result (a persistent message's
//! confirm waits for the broker's disk write, tens of milliseconds under load); the
//! step's message stays unacked, and counts against the prefetch, until that confirm
//! arrives.
//!
//! ## Broker sessions
//! One connection is one session. A session ends when the connection is lost, when any
//! of its consumers stops or the broker closes any of its channels (it closes a channel,
//! not the connection, on a channel error, and a closed channel never reopens), or at
//! shutdown. The loop that watches for these never waits for a handler slot: each
//! delivery waits for its slots in a task of its own, so a worker whose every slot is
//! busy with long steps still notices a lost connection or a SIGTERM at once. A lost
//! session never waits for the broker: it stops its heartbeats, closes the connection
//! (so the broker requeues what this worker held) and reconnects at once. Handlers
//! still running carry on; their results are published on the next session's channel,
//! and a copy of their step redelivered to this worker meanwhile waits for them instead
//! of running twice. Every broker call a step makes (publish, ack, nack) gives up after
//! [`BROKER_PATIENCE`]: lapin can leave an ack that is issued just as the connection
//! fails pending for ever, and a step task that never ends would hold the worker's
//! drain with it. The one exception is a publish (a result, a dead letter) while the
//! broker blocks the connection's publishers for a memory or disk alarm: it waits for
//! the alarm to clear, since what lapin holds then is written afterwards whatever this
//! worker decides.
//!
//! At shutdown the consumers are cancelled, messages received but not started are
//! handed back to the broker (those waiting for a slot too; a batch of which one step
//! has started starts the rest, as its message is answered whole), running steps
//! finish and publish their results, and only then does the connection close.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};
use tasker_protocol::broker::{
    self, TRACEPARENT_HEADER, Topology, header_str, persistent, subscribe_private,
};
use tasker_protocol::config::QueueType;
use tasker_protocol::messages::{
    BatchedStep, ControlMessage, Outcome, StepBatch, StepMessage, StepResult, StepStarted,
};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::executor::{self, InFlight};
#[cfg(feature = "failpoints")]
use crate::failpoint::{Failpoint, Stage};
use crate::handler::HandlerRegistry;
use crate::metrics::{HandlerOutcome, WorkerMetrics};
use crate::notices::Notice;
use crate::results::{PublishChannel, RESULT_PATIENCE, ResultSender, current_channel};
use crate::settings::WorkerSettings;

/// The longest one broker call of a step (a publish's send, an ack, a nack) may take
/// before it counts as failed. A publish's confirm has its own limit
/// ([`broker::CONFIRM_TIMEOUT`]); neither counts while the broker blocks the connection's
/// publishers (see [`crate::results::PublishChannel::written`]).
pub(crate) const BROKER_PATIENCE: Duration = Duration::from_secs(5);

/// The longest a session's set-up (channels, prefetch, consumers) may take.
const SETUP_PATIENCE: Duration = Duration::from_secs(30);

/// A connected worker, ready to run.
pub struct Worker {
    registry: Arc<HandlerRegistry>,
    /// The connection made by [`Worker::build`], used by the first session.
    connection: Option<Connection>,
    broker: tasker_protocol::config::BrokerSettings,
    topology: Topology,
    worker_id: String,
    concurrency: u16,
    namespaces: Option<Vec<String>>,
    heartbeat_interval: Duration,
    metrics_addr: Option<std::net::SocketAddr>,
    metrics: Arc<WorkerMetrics>,
    max_result_bytes: usize,
    #[cfg(feature = "failpoints")]
    failpoint: Failpoint,
}

/// What every step task shares, across broker sessions.
struct Shared {
    registry: Arc<HandlerRegistry>,
    topology: Topology,
    worker_id: String,
    /// The confirm-mode channel of the current session, for results and dead letters;
    /// `None` between sessions.
    publish: watch::Sender<Option<PublishChannel>>,
    /// Publishes results, several to a message under load.
    results: ResultSender,
    inflight: InFlight,
    metrics: Arc<WorkerMetrics>,
    /// `TASKER_MAX_RESULT_BYTES`: larger results fail the step (see the executor).
    max_result_bytes: usize,
    #[cfg(feature = "failpoints")]
    failpoint: Failpoint,
}

impl Shared {
    /// The current session's publishing channel, waiting up to `patience` for a session
    /// whose connection is up.
    async fn publish_channel(&self, patience: Duration) -> anyhow::Result<PublishChannel> {
        current_channel(self.publish.subscribe(), patience).await
    }
}

/// What one session's step tasks share.
struct SessionHandles {
    started: mpsc::UnboundedSender<Notice>,
    /// Turns true when the connection this session's deliveries came on is lost.
    lost: watch::Sender<bool>,
}

/// The consumers this worker runs, so shutdown can cancel them.
#[derive(Default)]
struct Consumers {
    /// Namespaces being consumed. A std Mutex: held only to read, insert or remove.
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
        // tasker.http reads its settings from the environment; a bad one stops the
        // worker here rather than failing every HTTP step.
        crate::handlers::http::check_settings().map_err(anyhow::Error::msg)?;
        #[cfg(feature = "failpoints")]
        let failpoint = Failpoint::parse(settings.failpoint_pause_at.as_deref())?;
        let topology = settings.broker.topology().map_err(anyhow::Error::msg)?;
        let worker_id = settings.worker_id();
        anyhow::ensure!(
            tasker_protocol::messages::valid_worker_id(&worker_id),
            "TASKER_WORKER_ID `{}` is not a worker id: 1 to {} letters, digits, '.', '_', ':' or '-'",
            worker_id.escape_default(),
            tasker_protocol::messages::MAX_WORKER_ID_LEN
        );
        let connection =
            broker::connect(&settings.broker, &format!("tasker-worker {worker_id}")).await?;
        let connection = broker::within(
            broker::ATTEMPT_PATIENCE,
            declare_topology(connection, &topology),
        )
        .await
        .context("declaring the broker topology")?;
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
            #[cfg(feature = "failpoints")]
            failpoint,
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
    /// A lost broker connection (or a consumer the broker stopped) ends the current
    /// session at once, and the worker reconnects, retrying without limit, and carries
    /// on (see the module docs). Steps received on the lost connection are redelivered by
    /// the broker.
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
        let publish = watch::channel(None).0;
        let results = ResultSender::start(
            publish.subscribe(),
            self.topology.clone(),
            self.metrics.clone(),
        );
        let shared = Arc::new(Shared {
            registry: self.registry.clone(),
            topology: self.topology.clone(),
            worker_id: self.worker_id.clone(),
            publish,
            results,
            inflight: InFlight::default(),
            metrics: self.metrics.clone(),
            max_result_bytes: self.max_result_bytes,
            #[cfg(feature = "failpoints")]
            failpoint: self.failpoint.clone(),
        });
        // Handler slots, across sessions: steps of a lost session still running count.
        let running = Arc::new(Semaphore::new(usize::from(self.concurrency)));
        let steps = TaskTracker::new();
        tokio::pin!(shutdown);
        let mut connection = self.connection.take();
        loop {
            let current = match connection.take() {
                Some(current) => current,
                None => {
                    let name = format!("tasker-worker {}", self.worker_id);
                    let topology = &self.topology;
                    let metrics = &self.metrics;
                    let reconnect = broker::reconnect(
                        &self.broker,
                        &name,
                        |connection| declare_topology(connection, topology),
                        || {
                            metrics.broker_errors.inc();
                        },
                    );
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
            match self
                .session(current, &shared, &running, &steps, &mut shutdown)
                .await
            {
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
        // Steps of earlier sessions still running finish and publish (each broker call is
        // bounded, and each handler by its timeout).
        steps.close();
        steps.wait().await;
        let _ = stop_tx.send(true);
        if let Some(server) = metrics_server {
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        }
        tracing::info!(worker_id = %self.worker_id, "worker stopped");
        Ok(())
    }

    /// Consume and run steps on one connection until `shutdown` (`Ok`) or until the
    /// session is lost (`Err`: the connection, or a consumer, failed).
    async fn session(
        &self,
        connection: Connection,
        shared: &Arc<Shared>,
        running: &Arc<Semaphore>,
        steps: &TaskTracker,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> anyhow::Result<()> {
        // Shared with the control loop, which opens a channel for each namespace announced.
        let owned = Arc::new(connection);
        let connection = &*owned;
        // Set when a consumer stops: the session is over even if the connection is up.
        let failed = Arc::new(Notify::new());
        let (deliveries_tx, mut deliveries) =
            mpsc::channel::<Received>(usize::from(self.concurrency));
        let consumers = Arc::new(Consumers::default());
        let opened = tokio::time::timeout(SETUP_PATIENCE, async {
            let consume = connection.create_channel().await?;
            // Classic queues: a channel-wide prefetch, so the limit holds across every
            // namespace consumed. Quorum queues refuse a channel-wide prefetch: there it
            // holds per namespace.
            let global = self.topology.queue_type() == QueueType::Classic;
            consume
                .basic_qos(self.prefetch(), BasicQosOptions { global })
                .await?;
            let notices = connection.create_channel().await?;
            let heartbeats = connection.create_channel().await?;
            let control = connection.create_channel().await?;
            let publish = broker::confirm_channel(connection).await?;
            if let Some(namespaces) = &self.namespaces {
                for namespace in namespaces {
                    start_consumer(
                        &consume,
                        &consume,
                        &self.topology,
                        &consumers,
                        namespace,
                        deliveries_tx.clone(),
                        failed.clone(),
                    )
                    .await?;
                }
            }
            anyhow::Ok((consume, notices, heartbeats, control, publish))
        })
        .await;
        let (consume, notices, heartbeat_channel, control_channel, publish) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(error)) => {
                close_lost(connection).await;
                return Err(error.context("opening a broker session"));
            }
            Err(_) => {
                close_lost(connection).await;
                anyhow::bail!("opening a broker session took longer than {SETUP_PATIENCE:?}");
            }
        };
        // RabbitMQ closes a channel, not the connection, on a channel error (a publish to
        // an exchange an operator deleted, a message over its size limit), and lapin
        // never reopens one: the session ends when any of its channels closes.
        let watched = [
            ("steps", consume.clone()),
            ("started notices", notices.clone()),
            ("heartbeats", heartbeat_channel.clone()),
            ("control", control_channel.clone()),
            ("results", publish.clone()),
        ];
        shared
            .publish
            .send_replace(Some(PublishChannel::new(publish, connection)));
        let (started_tx, started_rx) = mpsc::unbounded_channel();
        let batcher = tokio::spawn(crate::notices::run(
            started_rx,
            notices,
            self.topology.clone(),
            self.worker_id.clone(),
        ));
        let session = Arc::new(SessionHandles {
            started: started_tx,
            lost: watch::channel(false).0,
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        // Status after the fixed namespaces' consumers exist, so the first one lists them.
        let status_consumers = consumers.clone();
        let heartbeats = tokio::spawn(crate::notices::heartbeats(
            crate::notices::Heartbeats {
                inflight: shared.inflight.clone(),
                channel: heartbeat_channel,
                topology: self.topology.clone(),
                worker_id: self.worker_id.clone(),
                interval: self.heartbeat_interval,
                concurrency: self.concurrency,
                all_namespaces: self.namespaces.is_none(),
                namespaces: Box::new(move || status_consumers.namespaces()),
                #[cfg(feature = "failpoints")]
                failpoint: shared.failpoint.clone(),
            },
            stop_rx,
        ));
        // Cancelled when the worker starts to drain: the control loop, which goes on
        // meanwhile for cancels, consumes no new namespace from then on.
        let closing = CancellationToken::new();
        let control = tokio::spawn(follow_control(
            shared.clone(),
            owned.clone(),
            control_channel,
            consume.clone(),
            consumers.clone(),
            // Only a worker serving every namespace follows the announcements.
            self.namespaces
                .is_none()
                .then(|| (deliveries_tx.clone(), closing.clone())),
            failed.clone(),
        ));
        drop(deliveries_tx);
        tracing::info!(worker_id = %self.worker_id, concurrency = self.concurrency,
            namespaces = ?self.namespaces.as_deref().unwrap_or(&["*".to_owned()]),
            handlers = ?self.registry.names(), "worker started");

        // Each delivery waits for its handler slots in a task of its own, so this loop
        // keeps watching the connection and shutdown while every slot is busy.
        let starts = Starts {
            shared: shared.clone(),
            session: session.clone(),
            unacked: Arc::new(Semaphore::new(usize::from(self.prefetch()))),
            running: running.clone(),
            steps: steps.clone(),
            consume: consume.clone(),
            draining: CancellationToken::new(),
        };
        let mut health = tokio::time::interval(Duration::from_secs(1));
        let outcome = loop {
            tokio::select! {
                biased;
                () = shutdown.as_mut() => break Ok(()),
                () = failed.notified() => {
                    break Err(anyhow::anyhow!("a consumer stopped (the broker closed its channel or cancelled it)"));
                }
                _ = health.tick() => {
                    if !connection.status().connected() {
                        break Err(anyhow::anyhow!("lost the connection to RabbitMQ"));
                    }
                    if let Some((name, _)) = watched.iter().find(|(_, c)| !c.status().connected()) {
                        break Err(anyhow::anyhow!("the broker closed the {name} channel"));
                    }
                }
                delivery = deliveries.recv() => {
                    let Some(received) = delivery else {
                        break Err(anyhow::anyhow!("every consumer stopped"));
                    };
                    let starts = starts.clone();
                    steps.spawn(async move { starts.start(received).await });
                }
            }
        };

        if outcome.is_err() {
            // Lost: nothing on this connection can be trusted to answer. Stop its loops,
            // close it (the broker requeues what this worker held: the deliveries not yet
            // started and the steps still running) and reconnect at once. Steps still
            // running publish their results on the next session.
            tracing::info!("session lost: reconnecting; running steps carry on");
            session.lost.send_replace(true);
            shared.publish.send_replace(None);
            let _ = stop_tx.send(true);
            control.abort();
            heartbeats.abort();
            batcher.abort();
            drop(deliveries);
            close_lost(connection).await;
            return outcome;
        }

        tracing::info!("stopping: no new steps; finishing the running ones");
        closing.cancel();
        let tags: Vec<ShortString> = consumers
            .tags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for tag in tags {
            let _ = tokio::time::timeout(
                BROKER_PATIENCE,
                consume.basic_cancel(tag, BasicCancelOptions::default()),
            )
            .await;
        }
        // Received but not started, and waiting for a slot (once no consumer of this
        // worker would get them back): hand back to the broker for another worker, all
        // at once (each nack waits up to BROKER_PATIENCE on a broker in trouble).
        starts.draining.cancel();
        deliveries.close();
        let waiting: Vec<Received> = std::iter::from_fn(|| deliveries.try_recv().ok()).collect();
        futures::future::join_all(
            waiting
                .iter()
                .map(|received| nack_requeue(&received.delivery)),
        )
        .await;
        // Every step task, of this session and of lost ones, ends: its handler has a
        // timeout and each broker call a limit (but for publishes during a broker alarm,
        // until it clears). Heartbeats go on meanwhile, and cancels still abort running
        // steps (the control loop consumes no new namespace).
        steps.close();
        steps.wait().await;
        control.abort();
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(BROKER_PATIENCE, heartbeats).await;
        // The last handles on the started notices' sender: the batcher ends.
        drop(starts);
        drop(session);
        let _ = tokio::time::timeout(BROKER_PATIENCE, batcher).await;
        let _ = tokio::time::timeout(BROKER_PATIENCE, consume.close(200, "worker stopped".into()))
            .await;
        let _ = tokio::time::timeout(
            BROKER_PATIENCE,
            connection.close(200, "worker stopped".into()),
        )
        .await;
        outcome
    }
}

/// Close a connection the session gave up on, without waiting on it for long.
async fn close_lost(connection: &Connection) {
    let _ = tokio::time::timeout(
        BROKER_PATIENCE,
        connection.close(320, "tasker-worker: session lost".into()),
    )
    .await;
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
        .map_err(|error| topology.declare_error(error))?;
    channel.close(200, "OK".into()).await?;
    Ok(connection)
}

/// Consume `namespace`'s step queue on `channel`, declaring it on `declare`: a channel of
/// its own for a namespace announced while the session runs, since the broker closes the
/// channel a declaration fails on (a queue of the other type, say), and the consuming
/// channel's close would end the session, requeueing every step it holds, at every
/// announcement.
async fn start_consumer(
    declare: &Channel,
    channel: &Channel,
    topology: &Topology,
    consumers: &Consumers,
    namespace: &str,
    deliveries: mpsc::Sender<Received>,
    failed: Arc<Notify>,
) -> anyhow::Result<()> {
    let namespaces = || {
        consumers
            .namespaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    };
    if !namespaces().insert(namespace.to_owned()) {
        return Ok(());
    }
    let consumed = async {
        topology
            .declare_namespace(declare, namespace)
            .await
            .map_err(|error| topology.declare_error(error))?;
        let consumer = channel
            .basic_consume(
                topology.step_queue(namespace).into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        anyhow::Ok(consumer)
    }
    .await;
    let mut consumer = match consumed {
        Ok(consumer) => consumer,
        Err(error) => {
            // Not consumed: the next announcement tries again.
            namespaces().remove(namespace);
            return Err(error);
        }
    };
    consumers
        .tags
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(consumer.tag());
    tracing::info!(%namespace, queue = %topology.step_queue(namespace), "consuming");
    let namespace = namespace.to_owned();
    let queue: Arc<str> = topology.step_queue(&namespace).into();
    tokio::spawn(async move {
        loop {
            match consumer.next().await {
                Some(Ok(delivery)) => {
                    let received = Received {
                        queue: queue.clone(),
                        delivery,
                    };
                    if let Err(mpsc::error::SendError(received)) = deliveries.send(received).await {
                        // The session is over: hand back what the consumer still
                        // buffers, until its cancel (or the connection's end) ends it.
                        nack_requeue(&received.delivery).await;
                        continue;
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, %namespace, "step consumer failed");
                    break;
                }
                None => {
                    tracing::warn!(%namespace, "step consumer ended");
                    break;
                }
            }
        }
        // A consumer that stops while its session runs ends the session: the worker
        // reconnects and consumes again, instead of silently serving one queue fewer.
        failed.notify_one();
    });
    Ok(())
}

/// Follow the control exchange: abort the steps of cancelled tasks and, for a worker
/// serving every namespace (`deliveries` given, with the token of its closing), consume
/// each namespace announced until the worker is closing.
async fn follow_control(
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    control: Channel,
    consume: Channel,
    consumers: Arc<Consumers>,
    deliveries: Option<(mpsc::Sender<Received>, CancellationToken)>,
    failed: Arc<Notify>,
) {
    follow(
        shared,
        &connection,
        control,
        consume,
        consumers,
        deliveries,
        &failed,
    )
    .await;
    // Without the control exchange this worker misses cancels and namespaces: end the
    // session so the next one subscribes again.
    failed.notify_one();
}

async fn follow(
    shared: Arc<Shared>,
    connection: &Connection,
    control: Channel,
    consume: Channel,
    consumers: Arc<Consumers>,
    deliveries: Option<(mpsc::Sender<Received>, CancellationToken)>,
    failed: &Arc<Notify>,
) {
    let (topology, worker_id) = (&shared.topology, &shared.worker_id);
    let subscribe = async {
        let consumer = subscribe_private(
            &control,
            &topology.control_exchange(),
            "",
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
                    topology.signed(&hello, persistent()),
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
        if let Err(error) = topology.verify(&delivery.data, &delivery.properties) {
            tracing::warn!(%error, "control message dropped");
            continue;
        }
        match serde_json::from_slice(&delivery.data) {
            Ok(ControlMessage::Namespaces { namespaces }) => {
                let Some((deliveries, closing)) = &deliveries else {
                    continue;
                };
                if closing.is_cancelled() {
                    continue;
                }
                for namespace in namespaces {
                    // Every announcement names every namespace: most are consumed already.
                    if consumers
                        .namespaces
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains(&namespace)
                    {
                        continue;
                    }
                    let started = async {
                        let declare = connection.create_channel().await?;
                        let started = start_consumer(
                            &declare,
                            &consume,
                            topology,
                            &consumers,
                            &namespace,
                            deliveries.clone(),
                            failed.clone(),
                        )
                        .await;
                        if declare.status().connected() {
                            let _ = declare.close(200, "OK".into()).await;
                        }
                        started
                    };
                    if let Err(error) = started.await {
                        tracing::error!(error = format!("{error:#}"), %namespace,
                            "cannot consume namespace; its steps wait for another worker");
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
            Ok(ControlMessage::Superseded { dispatches }) => {
                let aborted = shared.inflight.supersede(
                    dispatches
                        .into_iter()
                        .map(|d| (d.step_id, d.dispatch_token)),
                );
                shared.metrics.aborted_superseded.inc_by(aborted as u64);
                if aborted > 0 {
                    tracing::info!(aborted, "dispatches superseded: aborted their runs");
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

/// A step message and the queue it was consumed from (its routing key names the queue
/// only when it came through the steps exchange).
struct Received {
    queue: Arc<str>,
    delivery: Delivery,
}

/// What a session's deliveries need to start their steps.
#[derive(Clone)]
struct Starts {
    shared: Arc<Shared>,
    session: Arc<SessionHandles>,
    /// Messages received and not yet answered, across the session's consumers.
    unacked: Arc<Semaphore>,
    /// Handler slots, across sessions.
    running: Arc<Semaphore>,
    steps: TaskTracker,
    /// The channel the deliveries came on.
    consume: Channel,
    /// Cancelled when the worker stops taking new steps.
    draining: CancellationToken,
}

/// How a wait for a handler slot (or a permit to hold one more message) ended.
enum Slot {
    Free(OwnedSemaphorePermit),
    /// The worker is stopping: the step is not started.
    Draining,
    /// The connection the delivery came on is gone: the broker hands it back.
    Lost,
}

impl Starts {
    /// Start a delivery's steps as handler slots come free and run them to the end.
    async fn start(self, received: Received) {
        let held = match self.permit(&self.unacked, true).await {
            Slot::Free(held) => held,
            Slot::Draining => return nack_requeue(&received.delivery).await,
            Slot::Lost => return,
        };
        if broker::carries_step_batch(&received.delivery.properties) {
            self.start_batch(received, held).await;
            return;
        }
        let Received { queue, delivery } = received;
        match self.slot(true).await {
            Slot::Free(slot) => {
                handle(&self.shared, &self.session, &queue, delivery, slot).await;
                drop(held);
            }
            Slot::Draining => nack_requeue(&delivery).await,
            Slot::Lost => {}
        }
    }

    /// Wait for a handler slot, unless the session is lost first, or (with `drain`) the
    /// worker stops taking steps.
    async fn slot(&self, drain: bool) -> Slot {
        self.permit(&self.running, drain).await
    }

    /// Wait for a permit of `semaphore`, as [`Self::slot`] does.
    async fn permit(&self, semaphore: &Arc<Semaphore>, drain: bool) -> Slot {
        let mut lost = self.session.lost.subscribe();
        let slot = tokio::select! {
            biased;
            () = self.draining.cancelled(), if drain => return Slot::Draining,
            _ = lost.wait_for(|lost| *lost) => return Slot::Lost,
            slot = semaphore.clone().acquire_owned() => slot,
        };
        match slot {
            // A step from a connection lost meanwhile is not started: the broker hands
            // its message to another worker, or to this one's next session.
            Ok(slot) if self.consume.status().connected() && !*lost.borrow() => Slot::Free(slot),
            _ => Slot::Lost,
        }
    }

    /// Start the steps of a message that carries several ([`StepBatch`]): each as a
    /// handler slot comes free, as that many step messages in a row would start; the
    /// message is acked once every one of them is answered. Stops when the connection is
    /// lost (the broker hands the message back, and the steps not started run from that
    /// copy). When the worker stops before the first step started, the message goes
    /// back; once one started, the rest start too (a message is answered whole). A batch
    /// that does not verify or decode is dead-lettered whole.
    async fn start_batch(&self, received: Received, held: OwnedSemaphorePermit) {
        let Received { queue, delivery } = received;
        let batch = match open(&self.shared, &delivery, StepBatch::decode) {
            Ok(batch) => batch.steps,
            Err(reason) => {
                let delivered = Delivered::Alone(Box::new(delivery));
                let _ = dead_letter(&self.shared, &delivered, None, &reason, &queue).await;
                drop(held);
                return;
            }
        };
        let first = match self.slot(true).await {
            Slot::Free(slot) => slot,
            Slot::Draining => {
                nack_requeue(&delivery).await;
                return;
            }
            Slot::Lost => return,
        };
        let answers = Arc::new(Answers {
            left: AtomicUsize::new(batch.len()),
            requeue: AtomicBool::new(false),
            delivery,
            _held: held,
        });
        let mut slot = Some(first);
        for BatchedStep { step, traceparent } in batch {
            let slot = match slot.take() {
                Some(slot) => slot,
                None => match self.slot(false).await {
                    Slot::Free(slot) => slot,
                    Slot::Draining | Slot::Lost => break,
                },
            };
            let (shared, session, queue) =
                (self.shared.clone(), self.session.clone(), queue.clone());
            let delivered = Delivered::Part(answers.clone());
            self.steps.spawn(async move {
                run(
                    &shared,
                    &session,
                    delivered,
                    step,
                    traceparent,
                    &queue,
                    slot,
                )
                .await;
            });
        }
    }
}

/// Run one delivered step to the end: its result confirmed by the broker, then the ack.
/// `slot` is a handler slot, given back as soon as the handler returns.
async fn handle(
    shared: &Shared,
    session: &SessionHandles,
    source_queue: &str,
    delivery: Delivery,
    slot: OwnedSemaphorePermit,
) {
    let delivered = Delivered::Alone(Box::new(delivery));
    let message = match open(shared, delivered.delivery(), StepMessage::decode) {
        Ok(message) => message,
        Err(reason) => {
            let _ = dead_letter(shared, &delivered, None, &reason, source_queue).await;
            return;
        }
    };
    // A single step carries its trace context in the message's traceparent header.
    let parent = header_str(&delivered.delivery().properties, TRACEPARENT_HEADER);
    run(
        shared,
        session,
        delivered,
        message,
        parent,
        source_queue,
        slot,
    )
    .await;
}

/// A delivery's message, verified and decoded with `decode`; or, when it is poison, why
/// (counted, and to be dead-lettered).
fn open<T, E: std::fmt::Display>(
    shared: &Shared,
    delivery: &Delivery,
    decode: impl FnOnce(&[u8]) -> Result<T, E>,
) -> Result<T, String> {
    if let Err(error) = shared.topology.verify(&delivery.data, &delivery.properties) {
        tracing::warn!(%error, "step message that does not verify; dead-lettering it");
        shared
            .metrics
            .dead_letter(tasker_protocol::signing::BAD_SIGNATURE);
        return Err(format!(
            "{}: {error}",
            tasker_protocol::signing::BAD_SIGNATURE
        ));
    }
    decode(&delivery.data).map_err(|error| {
        tracing::warn!(%error, "poison step message; dead-lettering it");
        shared.metrics.dead_letter("undecodable");
        error.to_string()
    })
}

/// Run one step in its span, a child of the coordinator's dispatch (`parent`, the W3C
/// trace context the message carried); every log line about the step carries its ids
/// and trace id.
async fn run(
    shared: &Shared,
    session: &SessionHandles,
    delivered: Delivered,
    message: StepMessage,
    parent: Option<String>,
    source_queue: &str,
    slot: OwnedSemaphorePermit,
) {
    let span = tracing::info_span!("execute_step", task_id = %message.task_id,
        step_id = %message.step_id, step = %message.step_name, handler = %message.handler,
        attempt = message.attempt, trace_id = tracing::field::Empty);
    tasker_protocol::telemetry::adopt(&span, parent.as_deref());
    run_step(
        shared,
        session,
        delivered,
        message,
        source_queue.to_owned(),
        span.clone(),
        slot,
    )
    .instrument(span)
    .await;
}

/// A message that carries several steps ([`StepBatch`]), answered by them: acked when
/// the last of them is answered, or handed back to the broker if any of them was.
struct Answers {
    delivery: Delivery,
    /// Steps not yet answered.
    left: AtomicUsize,
    /// Whether one of them was handed back.
    requeue: AtomicBool,
    /// One of the worker's unacked-message permits, given back with the message.
    _held: OwnedSemaphorePermit,
}

impl Answers {
    async fn answer(&self, shared: &Shared, hand_back: bool) {
        if hand_back {
            self.requeue.store(true, Ordering::Release);
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        if self.requeue.load(Ordering::Acquire) {
            // Its answered steps are skipped when it comes back to this worker, and their
            // duplicate results dropped by the coordinator's fence when another runs them.
            requeue_delivery(&self.delivery).await;
        } else {
            ack_delivery(shared, &self.delivery).await;
        }
    }
}

/// A step's delivery, answered to the broker when the step is done: a message of its own,
/// or one step of a message that carries several ([`Answers`]).
enum Delivered {
    Alone(Box<Delivery>),
    Part(Arc<Answers>),
}

impl Delivered {
    fn delivery(&self) -> &Delivery {
        match self {
            Delivered::Alone(delivery) => delivery,
            Delivered::Part(answers) => &answers.delivery,
        }
    }
}

/// Hold here if the fault-test hook is armed for `stage`, until `session` is lost.
#[cfg(feature = "failpoints")]
async fn failpoint(shared: &Shared, session: &SessionHandles, stage: Stage) {
    if !shared.failpoint.hits(stage) {
        return;
    }
    tracing::warn!(
        stage = stage.name(),
        "failpoint: paused at {}",
        stage.name()
    );
    // The sender lives as long as `session`, so this only ends when the session is lost.
    let _ = session.lost.subscribe().wait_for(|lost| *lost).await;
    tracing::warn!(stage = stage.name(), "failpoint: released");
}

/// Whether this copy of a step need not run: its task was cancelled, its dispatch was
/// superseded, or this worker already answered the same dispatch (a redelivery after the
/// connection it first came on was lost). A copy of a dispatch this worker is running
/// waits for that run first. Acks the copy when it need not run.
async fn skip_copy(shared: &Shared, delivered: &Delivered, message: &StepMessage) -> bool {
    let inflight = &shared.inflight;
    let (step_id, token) = (message.step_id, message.dispatch_token);
    let reason = match withdrawn(shared, message) {
        Some(reason) => reason,
        None => {
            if inflight.is_running(step_id, token) {
                tracing::info!("a copy of a step this worker runs: waiting for that run");
                let patience =
                    Duration::from_millis(u64::try_from(message.timeout_ms).unwrap_or(0))
                        + RESULT_PATIENCE;
                let _ = tokio::time::timeout(patience, async {
                    while inflight.is_running(step_id, token) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
                .await;
            }
            // That run may have ended for a cancel or a newer dispatch, which this copy
            // obeys too.
            match withdrawn(shared, message) {
                Some(reason) => reason,
                None if inflight.was_answered(step_id, token) => {
                    shared.metrics.skipped_duplicate.inc();
                    "this worker already published the result of this dispatch"
                }
                None => return false,
            }
        }
    };
    tracing::info!("skipped: {reason}");
    ack(shared, delivered).await;
    true
}

/// How long a redelivered copy of a step waits, its started notice sent, for the
/// coordinator to withdraw it before its handler runs.
const REDELIVERY_CHECK: Duration = Duration::from_secs(1);

/// Whether the coordinator withdraws this redelivered copy within [`REDELIVERY_CHECK`]
/// of its started notice: its step ended under this dispatch, was cancelled or
/// dispatched again, or its message was started too often without an answer (a
/// handler that crashes its worker: the coordinator failed the step with
/// `worker_lost`). A copy nobody withdraws runs after the wait; the next copy asks again.
async fn withdrawn_on_redelivery(shared: &Shared, message: &StepMessage) -> bool {
    let deadline = tokio::time::Instant::now() + REDELIVERY_CHECK;
    loop {
        if let Some(reason) = withdrawn(shared, message) {
            tracing::info!("redelivered copy skipped: {reason}");
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Why a step is no longer to run, if it is not: its task was cancelled, or its dispatch
/// superseded (counted).
fn withdrawn(shared: &Shared, message: &StepMessage) -> Option<&'static str> {
    let inflight = &shared.inflight;
    if inflight.is_cancelled(message.task_id) {
        shared.metrics.skipped_cancelled.inc();
        Some("the task was cancelled")
    } else if inflight.is_superseded(message.step_id, message.dispatch_token) {
        shared.metrics.skipped_superseded.inc();
        Some("the coordinator withdrew this dispatch (dispatched again, or its step ended)")
    } else {
        None
    }
}

/// The part of [`handle`] inside the step's span.
async fn run_step(
    shared: &Shared,
    session: &SessionHandles,
    delivered: Delivered,
    message: StepMessage,
    source_queue: String,
    span: tracing::Span,
    slot: OwnedSemaphorePermit,
) {
    if skip_copy(shared, &delivered, &message).await {
        return;
    }
    let Some(handler) = shared.registry.get(&message.handler) else {
        let reason = format!(
            "unknown handler `{}`; this worker has: {}",
            message.handler,
            shared.registry.names().join(", ")
        );
        tracing::warn!(%reason, "dead-lettering the step and failing it");
        let result = StepResult::not_run(
            &message,
            Outcome::PermanentError,
            "unknown_handler",
            reason.clone(),
            shared.worker_id.clone(),
        );
        // In the step's trace, as any result: its failure shows under its execution.
        let traceparent = tasker_protocol::telemetry::traceparent(&span);
        if shared.results.publish(result, traceparent).await.is_ok() {
            shared.metrics.dead_letter("unknown_handler");
            if dead_letter(shared, &delivered, Some(&message), &reason, &source_queue).await {
                // A redelivered copy (its batch handed back for another step) is skipped.
                shared
                    .inflight
                    .mark_answered(message.step_id, message.dispatch_token);
            }
        } else {
            requeue(shared, &delivered).await;
        }
        return;
    };

    #[cfg(feature = "failpoints")]
    failpoint(shared, session, Stage::Received).await;
    let answered = Arc::new(AtomicBool::new(false));
    let redelivered = delivered.delivery().redelivered;
    let _ = session.started.send(Notice {
        step: StepStarted {
            step_id: message.step_id,
            dispatch_token: message.dispatch_token,
            started_at: chrono::Utc::now(),
            redelivered,
        },
        answered: answered.clone(),
        urgent: redelivered,
    });
    if redelivered && withdrawn_on_redelivery(shared, &message).await {
        ack(shared, &delivered).await;
        return;
    }
    #[cfg(feature = "failpoints")]
    failpoint(shared, session, Stage::Running).await;
    shared.metrics.in_flight.inc();
    let result = executor::execute(
        handler,
        &message,
        &shared.worker_id,
        &shared.inflight,
        shared.max_result_bytes,
        slot,
    )
    .await;
    shared.metrics.in_flight.dec();
    let Some(result) = result else {
        // Aborted because the task was cancelled or the dispatch superseded: nothing to
        // report.
        ack(shared, &delivered).await;
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
    #[cfg(feature = "failpoints")]
    failpoint(shared, session, Stage::Publishing).await;
    let published = shared
        .results
        .publish(result, tasker_protocol::telemetry::traceparent(&span))
        .await;
    // Answered before it stops counting as running, so a copy waiting for this run
    // (`skip_copy`) never sees it as neither.
    if published.is_ok() {
        shared
            .inflight
            .mark_answered(message.step_id, message.dispatch_token);
    }
    shared
        .inflight
        .remove(message.step_id, message.dispatch_token);
    match published {
        Ok(()) => {
            // The result is safe with the broker and records the start itself.
            answered.store(true, Ordering::Release);
            #[cfg(feature = "failpoints")]
            failpoint(shared, session, Stage::Acking).await;
            ack(shared, &delivered).await;
        }
        Err(error) => {
            shared.metrics.broker_errors.inc();
            tracing::warn!(
                error = format!("{error:#}"),
                "cannot publish the result; handing the step back"
            );
            requeue(shared, &delivered).await;
        }
    }
}

/// Answer a step done: its message is acked (a batch's, once all of its steps are).
async fn ack(shared: &Shared, delivered: &Delivered) {
    match delivered {
        Delivered::Alone(delivery) => ack_delivery(shared, delivery).await,
        Delivered::Part(answers) => answers.answer(shared, false).await,
    }
}

/// Hand a step back to the broker (a batch's message, once all of its steps are
/// answered).
async fn requeue(shared: &Shared, delivered: &Delivered) {
    match delivered {
        Delivered::Alone(delivery) => requeue_delivery(delivery).await,
        Delivered::Part(answers) => answers.answer(shared, true).await,
    }
}

/// Ack a message, giving up after [`BROKER_PATIENCE`]. A failed ack is harmless: the
/// broker redelivers the message when the connection closes, and the copy is skipped
/// (this worker answered it) or its result dropped by the coordinator's fence.
async fn ack_delivery(shared: &Shared, delivery: &Delivery) {
    let acked = tokio::time::timeout(
        BROKER_PATIENCE,
        delivery.acker.ack(BasicAckOptions::default()),
    )
    .await;
    match acked {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            shared.metrics.broker_errors.inc();
            tracing::warn!(%error, "ack failed; the step will be redelivered and skipped or its duplicate result dropped");
        }
        Err(_) => {
            shared.metrics.broker_errors.inc();
            tracing::warn!(
                "no answer to an ack within {BROKER_PATIENCE:?}; the step will be redelivered and skipped or its duplicate result dropped"
            );
        }
    }
}

/// Copy a message to the dead-letter queue with `reason`, then answer it. A step of a
/// batch (`step`) goes there alone, as a step message of its own. Returns whether the
/// copy was filed (otherwise the message is handed back).
async fn dead_letter(
    shared: &Shared,
    delivered: &Delivered,
    step: Option<&StepMessage>,
    reason: &str,
    source_queue: &str,
) -> bool {
    let body = match (delivered, step) {
        (Delivered::Part(_), Some(step)) => match serde_json::to_vec(step) {
            Ok(body) => std::borrow::Cow::Owned(body),
            Err(error) => {
                tracing::error!(%error, "cannot write a step to dead-letter it; handing it back");
                requeue(shared, delivered).await;
                return false;
            }
        },
        _ => std::borrow::Cow::Borrowed(delivered.delivery().data.as_slice()),
    };
    let sent = async {
        let channel = shared.publish_channel(BROKER_PATIENCE).await?;
        channel
            .written(
                broker::CONFIRM_TIMEOUT + BROKER_PATIENCE,
                shared.topology.dead_letter(
                    &channel.channel,
                    Some(&channel.connection),
                    &body,
                    source_queue,
                    reason,
                ),
            )
            .await
            .context("no answer from the broker to a dead letter")?
    };
    match sent.await {
        Ok(()) => {
            ack(shared, delivered).await;
            true
        }
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                "cannot dead-letter a message; handing it back"
            );
            requeue(shared, delivered).await;
            false
        }
    }
}

/// Hand a message back to the broker after a pause (so a broker in trouble is not
/// hammered with the same message).
async fn requeue_delivery(delivery: &Delivery) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    nack_requeue(delivery).await;
}

async fn nack_requeue(delivery: &Delivery) {
    let nack = delivery.acker.nack(BasicNackOptions {
        multiple: false,
        requeue: true,
    });
    let _ = tokio::time::timeout(BROKER_PATIENCE, nack).await;
}
