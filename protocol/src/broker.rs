//! RabbitMQ: connecting, the topology every process declares, and publishing with confirms.
//!
//! Names (with the default prefix `tasker`):
//!
//! | name | kind | what flows |
//! |---|---|---|
//! | `tasker.steps` | direct exchange | step messages, routing key = namespace |
//! | `tasker.steps.<namespace>` | durable queue | one per namespace; workers consume it |
//! | `tasker.results` | durable queue | results and started notices (default exchange) |
//! | `tasker.control` | fanout exchange | namespace announcements, worker hellos and status, cancels |
//! | `tasker.events` | topic exchange | lifecycle events, routing key = event name (`task.completed`…) |
//! | `tasker.dlx` / `tasker.dead_letter` | fanout exchange / durable queue | poison messages, with an `x-tasker-reason` header |
//!
//! Every declaration is idempotent with the same arguments, so whichever process starts
//! first creates the topology and the others find it. The step, results and dead-letter
//! queues are of the type `TASKER_QUEUE_TYPE` names. Quorum step queues also carry a
//! delivery limit ([`DELIVERY_LIMIT`]) for messages that are delivered that many times
//! without an ack (their consumers keep dying on them): they dead-letter to the results
//! queue, where the coordinator fails that attempt. The results queue's limit is in
//! effect none ([`RESULTS_DELIVERY_LIMIT`]).

use std::time::Duration;

use anyhow::Context;
use backon::{ExponentialBuilder, Retryable};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::{BrokerSettings, QueueType, SecretUrl};

/// Deliveries of one step message a quorum step queue allows before it dead-letters the
/// message: workers that crash on it cannot keep it in circulation. RabbitMQ before 4.3
/// also counts a message a worker gives back (at shutdown, on a reconnect), hence the
/// margin; RabbitMQ 4's own default is 20 as well.
pub const DELIVERY_LIMIT: i64 = 20;

/// The results queue's delivery limit: in effect none. A coordinator gives a batch back
/// while PostgreSQL is out (and RabbitMQ before 4.3 counts that): results must survive
/// any outage, and the coordinator dead-letters what it cannot decode itself. Explicit,
/// because RabbitMQ 4 would otherwise give quorum queues a limit of 20.
pub const RESULTS_DELIVERY_LIMIT: i64 = 1_000_000_000;

/// The header that says why a message was dead-lettered.
pub const REASON_HEADER: &str = "x-tasker-reason";
/// The header that names the queue a dead-lettered message came from.
pub const SOURCE_HEADER: &str = "x-tasker-source-queue";
/// The W3C trace context header.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The names of Tasker's exchanges and queues under one prefix.
/// With them, the keys its messages are signed and checked with
/// ([`crate::signing`]).
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    queue_type: QueueType,
    keys: std::sync::Arc<crate::signing::MessageKeys>,
}

impl Topology {
    /// The topology under `prefix` (normally `tasker`), with classic queues and no
    /// message keys.
    pub fn new(prefix: impl Into<String>) -> Self {
        Topology {
            prefix: prefix.into(),
            queue_type: QueueType::Classic,
            keys: std::sync::Arc::default(),
        }
    }

    /// The same, with durable queues of `queue_type`.
    #[must_use]
    pub fn with_queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// The type of the durable queues.
    pub fn queue_type(&self) -> QueueType {
        self.queue_type
    }

    /// The same, signing and checking messages with `keys`.
    #[must_use]
    pub fn with_keys(mut self, keys: crate::signing::MessageKeys) -> Self {
        self.keys = std::sync::Arc::new(keys);
        self
    }

    /// `properties` for publishing `body`, with its signature when there is a key.
    pub fn signed(&self, body: &[u8], properties: BasicProperties) -> BasicProperties {
        if !self.keys.enabled() {
            return properties;
        }
        let headers = properties.headers().clone().unwrap_or_default();
        properties.with_headers(self.keys.sign(body, headers))
    }

    /// Whether a received message verifies (always, without a key).
    ///
    /// # Errors
    ///
    /// Why it does not.
    pub fn verify(
        &self,
        body: &[u8],
        properties: &BasicProperties,
    ) -> Result<(), crate::signing::BadSignature> {
        self.keys.verify(body, properties.headers().as_ref())
    }

    /// `error`, from declaring the topology, as the error a process stops with: a queue
    /// of another type says what to do about it.
    pub fn declare_error(&self, error: lapin::Error) -> anyhow::Error {
        if is_queue_conflict(&error) {
            anyhow::Error::new(error)
                .context(conflict_advice("one of Tasker's queues", self.queue_type))
        } else {
            anyhow::Error::new(error).context("declaring the broker topology")
        }
    }

    /// Why a message was dead-lettered, when one of this topology's step queues did it
    /// (RabbitMQ's `x-first-death-queue` and `x-first-death-reason` headers). Classic step
    /// queues dead-letter nothing (they are declared without a dead-letter exchange), so
    /// with them no message is taken for one: the headers are not signed, and a step
    /// message a broker user copied to the results queue with them would otherwise fail
    /// its step's attempt.
    pub fn dead_lettered_step(&self, properties: &BasicProperties) -> Option<String> {
        if self.queue_type == QueueType::Classic {
            return None;
        }
        let queue = header_str(properties, "x-first-death-queue")?;
        let namespace = queue.strip_prefix(&self.step_queue(""))?;
        if namespace.is_empty() {
            return None;
        }
        Some(header_str(properties, "x-first-death-reason").unwrap_or_else(|| "unknown".into()))
    }

    /// Whether messages are signed.
    pub fn signs(&self) -> bool {
        self.keys.enabled()
    }

    /// The prefix every name here starts with (`TASKER_AMQP_PREFIX`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The direct exchange steps are published to.
    pub fn steps_exchange(&self) -> String {
        format!("{}.steps", self.prefix)
    }

    /// The queue holding one namespace's steps.
    pub fn step_queue(&self, namespace: &str) -> String {
        format!("{}.steps.{namespace}", self.prefix)
    }

    /// The queue coordinators consume results from.
    pub fn results_queue(&self) -> String {
        format!("{}.results", self.prefix)
    }

    /// The routing key of a coordinator's probe of the broker: published to the default
    /// exchange, where no queue has this name, so the broker confirms and drops it.
    pub fn probe_routing_key(&self) -> String {
        format!("{}.probe", self.prefix)
    }

    /// The fanout exchange for control messages.
    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.prefix)
    }

    /// The topic exchange lifecycle events are published to (routing key: the event name).
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// The exchange poison messages are published to.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.prefix)
    }

    /// The queue poison messages end in.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead_letter", self.prefix)
    }

    /// Declare the exchanges and queues every process relies on.
    pub async fn declare_base(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.steps_exchange().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.control_exchange().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.events_exchange().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dead_letter_exchange().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        self.declare_durable_queue(channel, &self.dead_letter_queue())
            .await?;
        channel
            .queue_bind(
                self.dead_letter_queue().into(),
                self.dead_letter_exchange().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.declare_durable_queue(channel, &self.results_queue())
            .await?;
        Ok(())
    }

    /// Declare one namespace's step queue and bind it to the steps exchange.
    pub async fn declare_namespace(&self, channel: &Channel, namespace: &str) -> lapin::Result<()> {
        let queue = self.step_queue(namespace);
        self.declare_durable_queue(channel, &queue).await?;
        channel
            .queue_bind(
                queue.into(),
                self.steps_exchange().into(),
                namespace.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    /// The arguments `queue` (one of the durable queues) is declared with.
    fn queue_arguments(&self, queue: &str) -> FieldTable {
        let mut arguments = FieldTable::default();
        if self.queue_type == QueueType::Classic {
            // No arguments at all: queues declared before TASKER_QUEUE_TYPE existed
            // carry none, and an explicit `classic` would not be equivalent to them.
            return arguments;
        }
        let text = |value: String| AMQPValue::LongString(value.into());
        arguments.insert(
            "x-queue-type".into(),
            text(self.queue_type.as_str().to_owned()),
        );
        if queue == self.dead_letter_queue() {
            return arguments;
        }
        if queue == self.results_queue() {
            arguments.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(RESULTS_DELIVERY_LIMIT),
            );
            arguments.insert(
                "x-dead-letter-exchange".into(),
                text(self.dead_letter_exchange()),
            );
        } else {
            // A step message past the limit goes to the coordinators, which fail the
            // attempt (a step whose message kills its workers must not stay enqueued).
            arguments.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(DELIVERY_LIMIT),
            );
            arguments.insert("x-dead-letter-exchange".into(), text(String::new()));
            arguments.insert(
                "x-dead-letter-routing-key".into(),
                text(self.results_queue()),
            );
        }
        arguments
    }

    /// Declare one of the durable queues with its arguments. A queue that exists with
    /// other arguments (another queue type) fails with an error that says so.
    async fn declare_durable_queue(
        &self,
        channel: &Channel,
        name: &str,
    ) -> lapin::Result<lapin::Queue> {
        channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                self.queue_arguments(name),
            )
            .await
            .inspect_err(|error| {
                if is_queue_conflict(error) {
                    tracing::error!(
                        queue = name,
                        queue_type = self.queue_type.as_str(),
                        %error,
                        "{}",
                        conflict_advice(&format!("queue `{name}`"), self.queue_type)
                    );
                }
            })
    }

    /// Messages ready in `queue` and its consumers, or `None` when the queue does not
    /// exist. Asks with a passive declare on a channel of its own (the broker closes a
    /// channel that asks about a missing queue), so nothing is created.
    pub async fn queue_counts(
        &self,
        connection: &Connection,
        queue: &str,
    ) -> lapin::Result<Option<(u32, u32)>> {
        let channel = connection.create_channel().await?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(queue) => {
                let _ = channel.close(200, "OK".into()).await;
                Ok(Some((queue.message_count(), queue.consumer_count())))
            }
            Err(error) if is_not_found(&error) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Publish a poison message to the dead-letter exchange with the reason, and wait for
    /// the broker's confirm. The caller acks the original only after this returns `Ok`.
    /// With `connection`, its confirm is awaited as [`await_confirm_on`] does.
    pub async fn dead_letter(
        &self,
        channel: &Channel,
        connection: Option<&lapin::ConnectionStatus>,
        body: &[u8],
        source_queue: &str,
        reason: &str,
    ) -> anyhow::Result<()> {
        let mut headers = FieldTable::default();
        headers.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(truncate(reason, 1024).into()),
        );
        headers.insert(
            SOURCE_HEADER.into(),
            AMQPValue::LongString(source_queue.into()),
        );
        let publish = channel
            .basic_publish(
                self.dead_letter_exchange().into(),
                "".into(),
                BasicPublishOptions::default(),
                body,
                persistent().with_headers(headers),
            )
            .await?;
        let mut deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
        let confirm = confirmed_by(publish, &mut deadline, connection).await?;
        anyhow::ensure!(confirm.is_ack(), "the broker refused the dead letter");
        Ok(())
    }
}

/// Consume `exchange`'s messages routed by `routing_key` through a private queue: named by
/// the server, exclusive to `channel`'s connection, gone with it, declared with
/// `arguments` (a length limit, say), its messages acknowledged on delivery. For
/// advisory fan-out: control messages, lifecycle events for a live view.
pub async fn subscribe_private(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    arguments: FieldTable,
) -> lapin::Result<lapin::Consumer> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Run `publishes` (each a `basic_publish`, or something that ends in one) together: each
/// is polled once, in order, before the next starts, which queues its frames; then all
/// are awaited. A lapin publish resolves once its I/O loop has written the frames, so
/// publishes awaited one by one cost a wake of that loop and back per message; started
/// together, the frames queued meanwhile go out together. Messages on one channel still
/// leave in the order given.
pub async fn publish_together<F: std::future::Future>(publishes: Vec<F>) -> Vec<F::Output> {
    use std::task::Poll;
    let mut started = Vec::new();
    for publish in publishes {
        let mut publish = Box::pin(publish);
        let first = std::future::poll_fn(|cx| Poll::Ready(publish.as_mut().poll(cx))).await;
        started.push((publish, first));
    }
    let mut outputs = Vec::with_capacity(started.len());
    for (publish, first) in started {
        outputs.push(match first {
            Poll::Ready(output) => output,
            Poll::Pending => publish.await,
        });
    }
    outputs
}

/// Properties for a durable JSON message.
pub fn persistent() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
}

/// `properties` with a W3C trace context in the [`TRACEPARENT_HEADER`] header, when there
/// is one (an attempt or a task that was traced).
pub fn with_traceparent(
    properties: BasicProperties,
    traceparent: Option<String>,
) -> BasicProperties {
    let Some(traceparent) = traceparent else {
        return properties;
    };
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        TRACEPARENT_HEADER.into(),
        AMQPValue::LongString(traceparent.into()),
    );
    properties.with_headers(headers)
}

/// Whether the broker answered 404 (no such queue or exchange).
pub fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}

/// Whether a message on a step queue carries a [`StepBatch`](crate::messages::StepBatch)
/// (its AMQP `type` is [`STEP_BATCH_TYPE`](crate::messages::STEP_BATCH_TYPE)) rather than
/// one step.
pub fn carries_step_batch(properties: &BasicProperties) -> bool {
    properties
        .kind()
        .as_ref()
        .is_some_and(|kind| kind.as_str() == crate::messages::STEP_BATCH_TYPE)
}

/// Read a string header from a message's properties.
pub fn header_str(properties: &BasicProperties, name: &str) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(value) => Some(value.to_string()),
        AMQPValue::ShortString(value) => Some(value.to_string()),
        _ => None,
    }
}

/// Whether the broker refused a declaration because the queue exists with other
/// arguments (406 PRECONDITION_FAILED, "inequivalent arg").
pub fn is_queue_conflict(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if amqp.get_id() == 406 && amqp.to_string().contains("inequivalent arg"))
}

/// What to do when `queue` exists with other arguments than Tasker declares with
/// `wanted` (the broker's error, which follows, names the argument).
pub fn conflict_advice(queue: &str, wanted: QueueType) -> String {
    format!(
        "{queue} exists with other arguments than Tasker declares with \
         TASKER_QUEUE_TYPE={} (another queue type, or an argument set by hand or by an \
         older release). A queue's arguments cannot change: give every process the same \
         TASKER_QUEUE_TYPE, or drain and delete the old queue (docs/operating.md, \
         \"Queue types\"), or use a new TASKER_AMQP_PREFIX",
        wanted.as_str()
    )
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The wait between connection attempts: 200 ms growing to 2 s, each wait lengthened by
/// a random part of itself (so at most 4 s), so that a fleet does not come back in step
/// and a broker back from an outage is served again within seconds.
fn connect_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
}

/// How long one connection attempt may take, from the TCP connect through the AMQP
/// handshake to what the caller opens on the new connection. lapin sets no limit of its
/// own: a peer that takes the socket and never answers (a node booting or stopping, a
/// load balancer in front of a dead node) would hold the attempt, and with it the
/// process's return to work, for ever.
pub const ATTEMPT_PATIENCE: Duration = Duration::from_secs(20);

/// `attempt`, given up after `patience`: for what is done on a new connection before a
/// process's loops start (declarations, channels), which lapin does not bound.
pub async fn within<T, E: Into<anyhow::Error>>(
    patience: Duration,
    attempt: impl std::future::Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(patience, attempt).await {
        Ok(done) => done.map_err(Into::into),
        Err(_) => Err(anyhow::anyhow!("no answer within {patience:?}")),
    }
}

/// One connection attempt, named `name` in RabbitMQ's management UI.
async fn connect_once(url: &SecretUrl, name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    within(
        ATTEMPT_PATIENCE,
        Connection::connect(url.expose(), properties),
    )
    .await
}

/// How long a process's start-up tries to reach RabbitMQ before it exits.
pub const STARTUP_PATIENCE: Duration = Duration::from_secs(60);

/// Connect to RabbitMQ, retrying with backoff for up to [`STARTUP_PATIENCE`] so that a
/// process started alongside the broker waits for it instead of failing.
pub async fn connect(settings: &BrokerSettings, name: &str) -> anyhow::Result<Connection> {
    let retried = (|| connect_once(&settings.amqp_url, name))
        .retry(connect_backoff().without_max_times())
        .notify(|error: &anyhow::Error, wait| {
            tracing::warn!(error = format!("{error:#}"), ?wait, broker = %settings.amqp_url, "RabbitMQ not reachable yet; retrying");
        });
    within(STARTUP_PATIENCE, retried)
        .await
        .with_context(|| format!("cannot connect to RabbitMQ at {}", settings.amqp_url))
}

/// Connect again after the connection was lost, and keep trying (every few seconds at
/// most) until the broker answers: a broker restart or a network outage must not stop a
/// process. `open` runs on every fresh connection (declare the topology, open channels);
/// if it fails, or the attempt as a whole takes longer than [`ATTEMPT_PATIENCE`], the
/// connection is dropped and the next attempt starts over. `failed` is
/// called at every failed attempt (a broker error counted for each, so an outage shows
/// for as long as it lasts). Callers race this against their shutdown signal.
pub async fn reconnect<T, F, Fut>(
    settings: &BrokerSettings,
    name: &str,
    open: F,
    failed: impl Fn(),
) -> T
where
    F: Fn(Connection) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let attempt = || {
        within(ATTEMPT_PATIENCE, async {
            open(connect_once(&settings.amqp_url, name).await?).await
        })
    };
    loop {
        // The backoff never runs out, so this only returns Ok; loop anyway to stay total.
        let reconnected = attempt
            .retry(connect_backoff().without_max_times())
            .notify(|error: &anyhow::Error, wait| {
                failed();
                tracing::warn!(error = format!("{error:#}"), ?wait, broker = %settings.amqp_url,
                    "RabbitMQ not reachable; retrying");
            })
            .await;
        if let Ok(value) = reconnected {
            return value;
        }
    }
}

/// A channel in publisher-confirm mode.
pub async fn confirm_channel(connection: &Connection) -> lapin::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// How long a publisher confirm may take before the publish counts as failed.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Await a publisher confirm, polling it again every 100 ms until [`CONFIRM_TIMEOUT`]
/// (see [`patiently`]): a confirm that never comes fails the publish instead of hanging
/// it.
pub async fn await_confirm(
    confirm: lapin::PublisherConfirm,
) -> anyhow::Result<lapin::Confirmation> {
    let mut deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
    confirmed_by(confirm, &mut deadline, None).await
}

/// Await a publisher confirm as [`await_confirm`] does, for as long as the broker blocks
/// the publishers of `connection` (a memory or disk alarm: `connection.blocked`) and
/// [`CONFIRM_TIMEOUT`] after. The broker takes in and confirms what was published during
/// the block once it lifts: a publish given up on meanwhile would still arrive, after
/// the caller had handed its work back to be done again.
pub async fn await_confirm_on(
    confirm: lapin::PublisherConfirm,
    connection: &lapin::ConnectionStatus,
) -> anyhow::Result<lapin::Confirmation> {
    let mut deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
    confirmed_by(confirm, &mut deadline, Some(connection)).await
}

/// Await the confirms of messages published together, as [`await_confirm`] does, with
/// one [`CONFIRM_TIMEOUT`] for them all. One after the other: the broker confirms a
/// channel's messages in the order they were published, so once the first is in, the
/// rest usually are too and cost no timer each.
pub async fn await_confirms(
    confirms: Vec<lapin::PublisherConfirm>,
) -> Vec<anyhow::Result<lapin::Confirmation>> {
    confirmed_together(confirms, None).await
}

/// [`await_confirms`], for as long as the broker blocks the publishers of `connection`
/// and [`CONFIRM_TIMEOUT`] after (see [`await_confirm_on`]).
pub async fn await_confirms_on(
    confirms: Vec<lapin::PublisherConfirm>,
    connection: &lapin::ConnectionStatus,
) -> Vec<anyhow::Result<lapin::Confirmation>> {
    confirmed_together(confirms, Some(connection)).await
}

async fn confirmed_together(
    confirms: Vec<lapin::PublisherConfirm>,
    connection: Option<&lapin::ConnectionStatus>,
) -> Vec<anyhow::Result<lapin::Confirmation>> {
    let mut deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
    let mut confirmations = Vec::with_capacity(confirms.len());
    for confirm in confirms {
        confirmations.push(confirmed_by(confirm, &mut deadline, connection).await);
    }
    confirmations
}

/// Await `confirm` until `deadline`, as [`patiently`] does.
async fn confirmed_by(
    confirm: lapin::PublisherConfirm,
    deadline: &mut tokio::time::Instant,
    connection: Option<&lapin::ConnectionStatus>,
) -> anyhow::Result<lapin::Confirmation> {
    match patiently(confirm, deadline, CONFIRM_TIMEOUT, connection).await {
        Some(confirmation) => Ok(confirmation?),
        None => anyhow::bail!("no publisher confirm within {CONFIRM_TIMEOUT:?}"),
    }
}

/// Await `future` (a publish, or its confirm), polling it again every 100 ms, until
/// `deadline`; `None` past it. While the broker blocks the publishers of `connection` (a
/// memory or disk alarm, `connection.blocked`) the deadline moves to `patience` from
/// now: lapin holds what is published during the block and writes it once it lifts, and
/// the broker then takes it in and confirms it, so a publish given up on meanwhile would
/// still arrive, after its work was handed back to be done again.
///
/// Polling again: now and then a lapin confirm future stayed pending although the broker
/// had confirmed (measured with tasker-bench under load), and polling recovers it.
pub async fn patiently<F: std::future::Future>(
    future: F,
    deadline: &mut tokio::time::Instant,
    patience: Duration,
    connection: Option<&lapin::ConnectionStatus>,
) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut told = false;
    loop {
        if let Ok(output) = tokio::time::timeout(Duration::from_millis(100), &mut future).await {
            return Some(output);
        }
        if connection.is_some_and(|c| c.blocked() && c.connected()) {
            if !told {
                told = true;
                tracing::warn!(
                    "RabbitMQ blocks publishers (a memory or disk alarm): waiting for the \
                     block to lift"
                );
            }
            *deadline = tokio::time::Instant::now() + patience;
        } else if tokio::time::Instant::now() >= *deadline {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that takes the socket and never speaks AMQP (a node booting or stopping, a
    /// load balancer in front of a dead node) ends the attempt after its patience, so
    /// the caller tries again, instead of holding it for ever.
    #[tokio::test]
    async fn a_silent_peer_ends_a_connection_attempt_after_its_patience() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url: SecretUrl = format!("amqp://guest:guest@{}/%2f", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let held = tokio::spawn(async move {
            let mut sockets = Vec::new();
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                sockets.push(socket);
            }
        });
        let started = tokio::time::Instant::now();
        let attempt = connect_once(&url, "silent");
        let error = tokio::time::timeout(ATTEMPT_PATIENCE + Duration::from_secs(10), attempt)
            .await
            .expect("the attempt ends by itself")
            .expect_err("no connection from a peer that never answers");
        assert!(error.to_string().contains("no answer within"), "{error:#}");
        assert!(
            started.elapsed() >= ATTEMPT_PATIENCE,
            "{:?}",
            started.elapsed()
        );
        held.abort();
    }

    #[test]
    fn names_live_under_the_prefix() {
        let topology = Topology::new("t1");
        assert_eq!(topology.step_queue("payments"), "t1.steps.payments");
        assert_eq!(topology.results_queue(), "t1.results");
        assert_eq!(topology.dead_letter_queue(), "t1.dead_letter");
    }

    #[test]
    fn step_messages_dead_lettered_by_a_step_queue_are_recognised() {
        let topology = Topology::new("t1").with_queue_type(QueueType::Quorum);
        let dead = |queue: &str, reason: Option<&str>| {
            let mut headers = FieldTable::default();
            headers.insert(
                "x-first-death-queue".into(),
                AMQPValue::LongString(queue.into()),
            );
            if let Some(reason) = reason {
                headers.insert(
                    "x-first-death-reason".into(),
                    AMQPValue::LongString(reason.into()),
                );
            }
            topology.dead_lettered_step(&BasicProperties::default().with_headers(headers))
        };
        assert_eq!(
            dead("t1.steps.payments", Some("delivery_limit")).as_deref(),
            Some("delivery_limit")
        );
        assert_eq!(
            dead("t1.steps.payments", Some("expired")).as_deref(),
            Some("expired")
        );
        assert_eq!(dead("t1.steps.payments", None).as_deref(), Some("unknown"));
        assert_eq!(dead("t1.results", Some("delivery_limit")), None);
        assert_eq!(dead("t2.steps.payments", Some("delivery_limit")), None);
        assert_eq!(dead("t1.steps.", Some("delivery_limit")), None);
        assert_eq!(
            topology.dead_lettered_step(&BasicProperties::default()),
            None
        );
        // Classic step queues dead-letter nothing: the same headers are a forgery.
        let classic = Topology::new("t1");
        let mut headers = FieldTable::default();
        headers.insert(
            "x-first-death-queue".into(),
            AMQPValue::LongString("t1.steps.payments".into()),
        );
        assert_eq!(
            classic.dead_lettered_step(&BasicProperties::default().with_headers(headers)),
            None
        );
    }

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
