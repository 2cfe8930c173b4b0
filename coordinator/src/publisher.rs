//! Publishing claimed steps to RabbitMQ, after the claim committed.
//!
//! Steps of one namespace published together travel together: up to
//! [`STEPS_PER_MESSAGE`] in one message (a [`StepBatch`](tasker_shared::messages::StepBatch)),
//! so the broker stores, delivers and acknowledges one message where it would have handled
//! eight; most of its work is per message, not per byte (BENCHMARKS.md). A step claimed
//! alone still travels in a step message of its own.
//!
//! Publishes a whole batch, then awaits all of its confirms together (one broker round
//! trip per batch, not per step), then records the outcome (`record_publish`): a step
//! whose publish is refused, unroutable or unconfirmed stays `enqueued` with its lease
//! ended at once, so the next sweep dispatches it again without spending an attempt. A
//! confirmed step is safe in a durable queue and loses its dispatch lease, so a long
//! queue never sends it back; but not at once: the lift waits one to two
//! [`LeaseLifter`] ticks (5 to 10 s with the default lease, always well within it), and
//! is skipped for the steps whose started notice or result this coordinator applied
//! meanwhile ([`StepPublisher::settled`]). Most steps start, and their notices are
//! applied, within that time even when results queue up, so most never get the write:
//! lifting every lease at its confirm was a fourth write of each step row, and
//! PostgreSQL's largest cost per step after the claim (BENCHMARKS.md). A coordinator
//! that dies before a lift leaves those steps with their lease: any still queued when it
//! expires (they waited longer than the lease) is dispatched again and its first copy
//! superseded, as for an unconfirmed step. Step messages carry no expiration: a
//! confirmed message waits in its queue as long as the queue is long.
//!
//! A step whose message is larger than the broker takes (`TASKER_MAX_STEP_MESSAGE_BYTES`,
//! 16 MiB by default, RabbitMQ's `max_message_size` since 4.0: its context and its
//! parents' results together) is not published: the broker would close the publishing
//! channel at every try. The publisher sends the coordinator a result for it instead, a permanent failure
//! with code `step_message_too_large`, applied like any worker's.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::Channel;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use tasker_shared::broker::{
    Topology, await_confirm_on, await_confirms_on, persistent, publish_together, with_traceparent,
};
use tasker_shared::db::Database;
use tasker_shared::messages::{
    BatchedStep, Outcome, STEP_BATCH_TYPE, STEPS_PER_MESSAGE, StepMessage, StepResult,
    WorkerMessage, step_batch_body,
};
use tasker_shared::store::transitions::{self, ConfirmedStep, Dispatch};
use tasker_shared::telemetry;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::link::BrokerLink;
use crate::metrics::CoordinatorMetrics;
use crate::service::Service;

/// Batches [`StepPublisher::dispatch`] publishes at once.
const PUBLISHING_BATCHES: u32 = 4;
/// How long [`StepPublisher::takes_messages`] waits for its probe's confirm.
const PROBE_PATIENCE: Duration = Duration::from_secs(5);
/// Most steps in one published batch.
const MAX_PUBLISH_BATCH: usize = 1_000;
/// Steps waiting for a publishing slot beyond which [`StepPublisher::dispatch`] waits for
/// one: the claims slow down when the broker does.
const MAX_WAITING: usize = 4 * MAX_PUBLISH_BATCH;

/// Publishes step messages on one confirm-mode channel.
pub(crate) struct StepPublisher {
    db: Database,
    /// The channel of the current broker connection; replaced after a reconnect. A std
    /// RwLock: held only to clone or swap the handle, never across an await.
    channel: RwLock<Channel>,
    /// The current broker connection, for the short-lived channels namespaces are
    /// declared on.
    broker: Arc<BrokerLink>,
    topology: Topology,
    /// The dispatch lease given at claim time: how long a claimed step may go without its
    /// publish being confirmed before it is dispatched again.
    lease_ms: i64,
    /// Namespaces whose queue this process has declared. A std Mutex: held only to look
    /// up or insert, never across an await.
    declared: Mutex<HashSet<String>>,
    /// Permits for batches being published in the background.
    publishing: Arc<Semaphore>,
    /// Claimed steps waiting for a publishing slot. A std Mutex: held only to push or
    /// take, never across an await.
    waiting: Mutex<Vec<Dispatch>>,
    /// Where the batches published in the background run: the application's tracker.
    tasks: TaskTracker,
    /// Confirmed steps whose lease is still to be lifted. A std Mutex: held only to
    /// insert, remove or swap, never across an await.
    lifts: Mutex<Lifts>,
    /// The largest step message published (`TASKER_MAX_STEP_MESSAGE_BYTES`).
    max_message_bytes: usize,
    #[cfg(feature = "failpoints")]
    failpoint: failpoint::PauseAfterClaims,
}

/// What happened to a published batch.
#[derive(Debug, Default)]
pub(crate) struct Published {
    pub(crate) failed: usize,
    /// How many steps each message published carried.
    pub(crate) carried: Vec<usize>,
    /// Each step the broker confirmed, with the message it travelled in.
    pub(crate) confirmed: Vec<ConfirmedStep>,
    /// (step id, dispatch token) of each step the broker did not take.
    pub(crate) unpublished: Vec<(Uuid, Uuid)>,
}

/// Confirmed steps waiting for their lease to be lifted, by step id, in two generations:
/// a [`LeaseLifter`] tick lifts the older and makes the younger older, so a step waits
/// one to two ticks.
#[derive(Debug, Default)]
struct Lifts {
    young: HashMap<Uuid, ConfirmedStep>,
    old: HashMap<Uuid, ConfirmedStep>,
}

impl StepPublisher {
    /// A publisher whose background batches are tasks on `tasks`.
    pub(crate) fn new(
        db: Database,
        (broker, channel): (Arc<BrokerLink>, Channel),
        topology: Topology,
        lease_ms: i64,
        tasks: TaskTracker,
    ) -> Self {
        StepPublisher {
            db,
            channel: RwLock::new(channel),
            broker,
            topology,
            lease_ms,
            declared: Mutex::new(HashSet::new()),
            publishing: Arc::new(Semaphore::new(PUBLISHING_BATCHES as usize)),
            waiting: Mutex::new(Vec::new()),
            tasks,
            lifts: Mutex::default(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            #[cfg(feature = "failpoints")]
            failpoint: failpoint::PauseAfterClaims::default(),
        }
    }

    /// Publish no step message larger than `bytes`; such a step fails instead.
    pub(crate) fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Arm the chaos-test failpoint (see [`failpoint::PauseAfterClaims`]).
    #[cfg(feature = "failpoints")]
    pub(crate) fn pause_after_claims(mut self, claims: Option<u64>) -> Self {
        self.failpoint = failpoint::PauseAfterClaims::after(claims);
        self
    }

    /// The dispatch lease: how long a claimed step may go unconfirmed.
    pub(crate) fn lease_ms(&self) -> i64 {
        self.lease_ms
    }

    /// Publish on `channel` from now on (a new connection after the old one was lost).
    pub(crate) fn use_channel(&self, channel: Channel) {
        *self.channel.write().unwrap_or_else(|p| p.into_inner()) = channel;
    }

    /// Declare every namespace's queue again before publishing to it: on a new connection
    /// (the broker link's, replaced first), whose broker may have lost its definitions.
    pub(crate) fn forget_namespaces(&self) {
        self.declared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
    }

    /// The exchanges and queues it publishes to.
    pub(crate) fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Whether the broker can take messages now (the channel's connection is up).
    pub(crate) fn connected(&self) -> bool {
        self.channel().status().connected()
    }

    /// Whether the broker takes in and confirms a message now: a transient one that no
    /// queue receives (the default exchange, a routing key no queue has), confirmed
    /// within [`PROBE_PATIENCE`]. A connection can be up while the broker reads nothing
    /// from it: during a memory or disk alarm RabbitMQ stops reading from a connection
    /// once it publishes (and only then says `connection.blocked`), and what workers
    /// publish then, heartbeats and results, waits in their clients.
    pub(crate) async fn takes_messages(&self) -> bool {
        if self.broker.blocked() {
            return false;
        }
        let channel = self.channel();
        let probe = async {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    self.topology.probe_routing_key().into(),
                    BasicPublishOptions::default(),
                    b"",
                    BasicProperties::default(),
                )
                .await?;
            anyhow::Ok(
                tasker_shared::broker::await_confirm(confirm)
                    .await?
                    .is_ack(),
            )
        };
        matches!(
            tokio::time::timeout(PROBE_PATIENCE, probe).await,
            Ok(Ok(true))
        ) && !self.broker.blocked()
    }

    fn channel(&self) -> Channel {
        self.channel
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Make sure a namespace's queue exists and is bound, so its steps are never dropped
    /// by the exchange for want of a queue. Declared on a channel of its own: a refused
    /// declaration (a queue of another type already there) closes the channel it was
    /// made on, and the publishing channel must stay open.
    pub(crate) async fn ensure_namespace(&self, namespace: &str) -> lapin::Result<()> {
        if self.is_declared(namespace) {
            return Ok(());
        }
        let channel = self.broker.connection().create_channel().await?;
        let declared = self.topology.declare_namespace(&channel, namespace).await;
        if channel.status().connected() {
            let _ = channel.close(200, "OK".into()).await;
        }
        declared?;
        self.declared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(namespace.to_owned());
        Ok(())
    }

    fn forget_namespace(&self, namespace: &str) {
        self.declared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(namespace);
    }

    fn is_declared(&self, namespace: &str) -> bool {
        self.declared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(namespace)
    }

    /// Publish claimed steps in the background, so the caller goes on with its next batch
    /// while the broker confirms these (a persistent message is confirmed only once the
    /// broker wrote it to disk: tens of milliseconds under load). Steps handed over while
    /// every publishing slot is busy wait and leave together with the next batch, so many
    /// small claims (one per created task) do not each cost a publishing round. At most
    /// [`PUBLISHING_BATCHES`] batches are in flight; with more than [`MAX_WAITING`] steps
    /// waiting, this waits for a slot. The steps are already `enqueued` in the database,
    /// so a crash before the publish loses nothing: the sweeper dispatches them again
    /// when their lease expires.
    pub(crate) async fn dispatch(
        self: &Arc<Self>,
        claimed: Vec<Dispatch>,
        metrics: Arc<CoordinatorMetrics>,
    ) {
        #[cfg(feature = "failpoints")]
        if self.failpoint.holds(&claimed) {
            return;
        }
        let waiting = {
            let mut waiting = self.lock_waiting();
            waiting.extend(claimed);
            waiting.len()
        };
        let permit = match self.publishing.clone().try_acquire_owned() {
            Ok(permit) => permit,
            // A batch in flight takes these when it is confirmed.
            Err(_) if waiting <= MAX_WAITING => return,
            Err(_) => match self.publishing.clone().acquire_owned().await {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let publisher = self.clone();
        self.tasks.spawn(async move {
            let mut permit = permit;
            loop {
                loop {
                    let batch = publisher.take_waiting();
                    if batch.is_empty() {
                        break;
                    }
                    let started = Instant::now();
                    let published = publisher.publish(&batch).await;
                    metrics.dispatched(&batch, &published, started.elapsed());
                }
                drop(permit);
                // Steps may have arrived after the last take, while every slot was busy:
                // whoever releases a slot last picks them up.
                if publisher.lock_waiting().is_empty() {
                    return;
                }
                match publisher.publishing.clone().try_acquire_owned() {
                    Ok(again) => permit = again,
                    Err(_) => return,
                }
            }
        });
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, Vec<Dispatch>> {
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Up to [`MAX_PUBLISH_BATCH`] waiting steps, oldest first.
    fn take_waiting(&self) -> Vec<Dispatch> {
        let mut waiting = self.lock_waiting();
        let n = waiting.len().min(MAX_PUBLISH_BATCH);
        waiting.drain(..n).collect()
    }

    /// Wait until every step handed to [`dispatch`](Self::dispatch) is published, then
    /// lift every confirmed step's lease still to be lifted.
    pub(crate) async fn flush(&self) {
        let Ok(_all) = self.publishing.acquire_many(PUBLISHING_BATCHES).await else {
            return;
        };
        loop {
            let batch = self.take_waiting();
            if batch.is_empty() {
                break;
            }
            self.publish(&batch).await;
        }
        self.lift(true).await;
    }

    /// Steps whose started notice or result (under these dispatch tokens) this
    /// coordinator has committed: they are no longer `enqueued` under that token, so
    /// their lease needs no lift.
    pub(crate) fn settled(&self, steps: impl IntoIterator<Item = (Uuid, Uuid)>) {
        let mut lifts = self.lock_lifts();
        let Lifts { young, old } = &mut *lifts;
        if young.is_empty() && old.is_empty() {
            return;
        }
        for (step, token) in steps {
            for generation in [&mut *young, &mut *old] {
                if generation
                    .get(&step)
                    .is_some_and(|confirmed| confirmed.dispatch_token == token)
                {
                    generation.remove(&step);
                }
            }
        }
    }

    /// Lift the leases of the older generation (`all`: of both), and make the younger
    /// one older. Those that cannot be written now (database unreachable) wait for the
    /// next tick, still well within their lease.
    async fn lift(&self, all: bool) {
        let due: Vec<ConfirmedStep> = {
            let mut lifts = self.lock_lifts();
            let young = std::mem::take(&mut lifts.young);
            let mut due = std::mem::replace(&mut lifts.old, young);
            if all {
                due.extend(lifts.old.drain());
            }
            due.into_values().collect()
        };
        if due.is_empty() {
            return;
        }
        let lifted = self
            .db
            .run(async |conn| transitions::record_publish(conn, &due, &[]).await)
            .await;
        if let Err(error) = lifted {
            tracing::warn!(%error, steps = due.len(),
                "cannot lift the leases of confirmed steps; trying again at the next tick");
            self.lock_lifts()
                .old
                .extend(due.into_iter().map(|step| (step.step_id, step)));
        }
    }

    fn lock_lifts(&self) -> std::sync::MutexGuard<'_, Lifts> {
        self.lifts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Publish every message, wait for the broker to confirm them all, and record which
    /// were confirmed and which not. Each gets a `dispatch_step` span, a child of its
    /// task's trace, whose context travels in the message's `traceparent` header to the
    /// worker.
    pub(crate) async fn publish(&self, dispatches: &[Dispatch]) -> Published {
        let published = self.publish_all(dispatches).await;
        self.record(&published).await;
        published
    }

    /// End the lease of the steps the broker did not take, and keep the confirmed ones
    /// for the [`LeaseLifter`] (see the module docs). If the database cannot be reached,
    /// the unpublished steps are dispatched again when their lease expires.
    async fn record(&self, published: &Published) {
        if !published.confirmed.is_empty() {
            self.lock_lifts()
                .young
                .extend(published.confirmed.iter().map(|step| (step.step_id, *step)));
        }
        if published.unpublished.is_empty() {
            return;
        }
        let recorded = self
            .db
            .run(async |conn| transitions::record_publish(conn, &[], &published.unpublished).await)
            .await;
        if let Err(error) = recorded {
            tracing::warn!(%error, unpublished = published.unpublished.len(),
                "cannot record a failed publish; those steps wait for their lease to expire");
        }
    }

    async fn publish_all(&self, dispatches: &[Dispatch]) -> Published {
        let mut report = Published::default();
        let mut traceparents = Vec::with_capacity(dispatches.len());
        let mut spans = Vec::with_capacity(dispatches.len());
        for dispatch in dispatches {
            let message = &dispatch.message;
            let span = tracing::debug_span!("dispatch_step", task_id = %message.task_id,
                step_id = %message.step_id, step = %message.step_name, attempt = message.attempt,
                trace_id = tracing::field::Empty);
            telemetry::adopt(&span, dispatch.trace_parent.as_deref());
            traceparents.push(telemetry::traceparent(&span));
            spans.push(span);
        }
        let outgoing = match messages(dispatches, &mut traceparents) {
            Ok(outgoing) => outgoing,
            Err(error) => {
                // A step that cannot be written as JSON: none can be trusted; the sweeper
                // dispatches them again when their lease expires.
                tracing::warn!(%error, "writing step messages failed");
                report.failed = dispatches.len();
                report.unpublished = dispatches
                    .iter()
                    .map(|d| (d.message.step_id, d.message.dispatch_token))
                    .collect();
                return report;
            }
        };
        let steps_of = |message: &Outgoing| {
            message
                .steps
                .iter()
                .map(|&i| &dispatches[i].message)
                .collect::<Vec<_>>()
        };
        let (outgoing, oversized): (Vec<Outgoing>, Vec<Outgoing>) = outgoing
            .into_iter()
            .partition(|message| message.body.len() <= self.max_message_bytes);
        if !oversized.is_empty() {
            self.fail_oversized(&oversized, dispatches, &mut report)
                .await;
        }
        report.carried = outgoing.iter().map(|m| m.steps.len()).collect();
        let publishes = outgoing
            .iter()
            .map(|message| self.publish_one(message.first(dispatches), message))
            .collect();
        let published = publish_together(publishes).await;
        let mut confirms = Vec::with_capacity(outgoing.len());
        for (message, publish) in outgoing.iter().zip(published) {
            match publish {
                Ok(confirm) => confirms.push((message, confirm)),
                Err(error) => {
                    for step in steps_of(message) {
                        report.failed += 1;
                        report.unpublished.push((step.step_id, step.dispatch_token));
                        tracing::warn!(%error, step_id = %step.step_id, task_id = %step.task_id,
                            "publishing a step failed; the sweeper will dispatch it again");
                    }
                }
            }
        }
        let (messages, confirms): (Vec<_>, Vec<_>) = confirms.into_iter().unzip();
        let outcomes = await_confirms_on(confirms, self.broker.connection().status()).await;
        for (message, outcome) in messages.into_iter().zip(outcomes) {
            let steps = steps_of(message);
            let message = message.first(dispatches).dispatch_token;
            match outcome {
                Ok(confirmation) => {
                    let acked = confirmation.is_ack();
                    // A mandatory message the broker could not route comes back with an ack.
                    let returned = confirmation.take_message().is_some();
                    if returned && let Some(step) = steps.first() {
                        // Its queue is gone, or unbound: declared and bound again before
                        // the next publish to it.
                        self.forget_namespace(&step.namespace);
                    }
                    for step in steps {
                        if acked && !returned {
                            report.confirmed.push(ConfirmedStep {
                                step_id: step.step_id,
                                dispatch_token: step.dispatch_token,
                                message,
                            });
                        } else {
                            report.failed += 1;
                            report.unpublished.push((step.step_id, step.dispatch_token));
                            tracing::warn!(step_id = %step.step_id, namespace = %step.namespace,
                                "the broker refused or could not route a step; it will be dispatched again when its lease expires");
                        }
                    }
                }
                Err(error) => {
                    for step in steps {
                        report.failed += 1;
                        report.unpublished.push((step.step_id, step.dispatch_token));
                        tracing::warn!(%error, step_id = %step.step_id, "no confirm for a step");
                    }
                }
            }
        }
        report
    }

    /// Fail the steps of messages larger than the broker takes, for good: a result of
    /// the coordinator's own for each (code `step_message_too_large`), sent through the
    /// results queue and applied, fenced by the dispatch token, as a worker's would be.
    /// A step whose result the broker does not take is left to be dispatched again (and
    /// refused again). One at a time: such steps are rare.
    async fn fail_oversized(
        &self,
        oversized: &[Outgoing],
        dispatches: &[Dispatch],
        report: &mut Published,
    ) {
        for message in oversized {
            for &i in &message.steps {
                let step = &dispatches[i].message;
                tracing::warn!(step_id = %step.step_id, task_id = %step.task_id,
                    bytes = message.body.len(), max = self.max_message_bytes,
                    "a step message is too large to publish; the step fails");
                let result = WorkerMessage::Result(StepResult::not_run(
                    step,
                    Outcome::PermanentError,
                    STEP_MESSAGE_TOO_LARGE,
                    format!(
                        "the step's message is {} bytes, more than the broker takes \
                         (TASKER_MAX_STEP_MESSAGE_BYTES = {}): the task's context and the \
                         step's parents' results travel in it; pass references to large \
                         data instead",
                        message.body.len(),
                        self.max_message_bytes
                    ),
                    "coordinator".to_owned(),
                ));
                let sent = async {
                    let body = serde_json::to_vec(&result)?;
                    let confirm = self
                        .channel()
                        .basic_publish(
                            "".into(),
                            self.topology.results_queue().as_str().into(),
                            BasicPublishOptions {
                                mandatory: true,
                                ..BasicPublishOptions::default()
                            },
                            &body,
                            self.topology.signed(&body, persistent()),
                        )
                        .await?;
                    let confirmation =
                        await_confirm_on(confirm, self.broker.connection().status()).await?;
                    // A mandatory message the broker could not route comes back with an ack.
                    anyhow::ensure!(
                        confirmation.is_ack() && confirmation.take_message().is_none(),
                        "the broker refused or could not route it"
                    );
                    anyhow::Ok(())
                }
                .await;
                if let Err(error) = sent {
                    tracing::warn!(error = format!("{error:#}"), step_id = %step.step_id,
                        "sending the failure of a step too large to publish failed");
                    report.failed += 1;
                    report.unpublished.push((step.step_id, step.dispatch_token));
                }
            }
        }
    }

    /// Publish one message: a step alone (its trace context in the `traceparent` header)
    /// or a batch of steps of `first`'s namespace.
    async fn publish_one(
        &self,
        first: &StepMessage,
        message: &Outgoing,
    ) -> anyhow::Result<lapin::PublisherConfirm> {
        self.ensure_namespace(&first.namespace).await?;
        // Named by its first step's dispatch token (Outgoing::first).
        let properties =
            persistent().with_message_id(ShortString::from(first.dispatch_token.to_string()));
        let properties = if message.is_batch() {
            properties.with_type(ShortString::from(STEP_BATCH_TYPE))
        } else {
            with_traceparent(properties, message.traceparent.clone())
        };
        Ok(self
            .channel()
            .basic_publish(
                self.topology.steps_exchange().into(),
                first.namespace.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &message.body,
                self.topology.signed(&message.body, properties),
            )
            .await?)
    }
}

impl Outgoing {
    /// Whether it carries several steps, as a [`StepBatch`](tasker_shared::messages::StepBatch)
    /// (one step travels as a step message of its own).
    fn is_batch(&self) -> bool {
        self.steps.len() > 1
    }

    /// The first step it carries. Its dispatch token names the message: the AMQP
    /// `message_id`, and what a confirmed step records as the message it travelled in.
    fn first<'a>(&self, dispatches: &'a [Dispatch]) -> &'a StepMessage {
        &dispatches[self.steps[0]].message
    }
}

/// Most bytes of step JSON one batch carries: a step that would take a batch past it
/// goes in the next message (one larger than this travels alone).
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// RabbitMQ's default `max_message_size` since 4.0 (16 MiB; 128 MiB before): the
/// default of `TASKER_MAX_STEP_MESSAGE_BYTES`.
pub(crate) const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The code of the permanent failure of a step whose message is too large to publish.
pub(crate) const STEP_MESSAGE_TOO_LARGE: &str = "step_message_too_large";

/// What one published message carries.
#[derive(Debug)]
struct Outgoing {
    /// The steps, as indices into the published dispatches (all of one namespace).
    steps: Vec<usize>,
    /// The message's body: a step message, or a [`StepBatch`](tasker_shared::messages::StepBatch) of them.
    body: Vec<u8>,
    /// A single step's trace context, for the `traceparent` header (a batch carries each
    /// step's in its body).
    traceparent: Option<String>,
}

/// The messages that carry `dispatches`: the steps of one namespace go together, up to
/// [`STEPS_PER_MESSAGE`] and [`MAX_BATCH_BYTES`] in one [`StepBatch`](tasker_shared::messages::StepBatch), in the order they
/// were claimed; a step that goes alone is a step message as always. `traceparents` (one
/// per dispatch) are taken.
fn messages(
    dispatches: &[Dispatch],
    traceparents: &mut [Option<String>],
) -> serde_json::Result<Vec<Outgoing>> {
    // Namespaces in the order they first appear, each with its steps in claim order.
    let mut namespaces: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, dispatch) in dispatches.iter().enumerate() {
        let namespace = dispatch.message.namespace.as_str();
        match namespaces.iter_mut().find(|(n, _)| *n == namespace) {
            Some((_, steps)) => steps.push(i),
            None => namespaces.push((namespace, vec![i])),
        }
    }
    let mut outgoing = Vec::new();
    for (_, steps) in namespaces {
        // Each step written as a batch member (a member without a trace context is
        // written exactly as the step's own message), packed in claim order until a
        // message holds STEPS_PER_MESSAGE steps or the next would take it past
        // MAX_BATCH_BYTES.
        let mut group: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut bytes = 0;
        for i in steps {
            let body = serde_json::to_vec(&BatchedStep {
                step: &dispatches[i].message,
                traceparent: traceparents[i].clone(),
            })?;
            if !group.is_empty()
                && (group.len() == STEPS_PER_MESSAGE || bytes + body.len() > MAX_BATCH_BYTES)
            {
                outgoing.push(message_of(
                    std::mem::take(&mut group),
                    dispatches,
                    traceparents,
                )?);
                bytes = 0;
            }
            bytes += body.len();
            group.push((i, body));
        }
        if !group.is_empty() {
            outgoing.push(message_of(group, dispatches, traceparents)?);
        }
    }
    Ok(outgoing)
}

/// The message of one group of steps written as batch members (see [`messages`]).
fn message_of(
    group: Vec<(usize, Vec<u8>)>,
    dispatches: &[Dispatch],
    traceparents: &mut [Option<String>],
) -> serde_json::Result<Outgoing> {
    if let [(i, body)] = group.as_slice() {
        let i = *i;
        let traceparent = traceparents[i].take();
        let body = match traceparent {
            // The member carries its trace context in the body: the step's own message
            // carries it in the header instead.
            Some(_) => serde_json::to_vec(&dispatches[i].message)?,
            None => body.clone(),
        };
        return Ok(Outgoing {
            steps: vec![i],
            body,
            traceparent,
        });
    }
    let (steps, bodies): (Vec<usize>, Vec<Vec<u8>>) = group.into_iter().unzip();
    Ok(Outgoing {
        steps,
        body: step_batch_body(&bodies),
        traceparent: None,
    })
}

/// Lifts the leases of confirmed steps, one generation per tick: a tick is an eighth of
/// the dispatch lease, at most 5 s, so a lift is written long before the lease it lifts
/// would expire, and a step that waits in its queue is lifted after 5 to 10 s (with
/// the default lease). At the stop, lifts them all.
pub(crate) struct LeaseLifter {
    pub(crate) publisher: Arc<StepPublisher>,
}

impl LeaseLifter {
    fn tick(&self) -> Duration {
        let eighth = u64::try_from(self.publisher.lease_ms / 8).unwrap_or(0);
        Duration::from_millis(eighth.clamp(10, 5_000))
    }
}

impl Service for LeaseLifter {
    const NAME: &'static str = "lease_lifter";

    /// Run until `stop` is cancelled.
    async fn run(self, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(self.tick());
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = ticks.tick() => self.publisher.lift(false).await,
            }
        }
        self.publisher.lift(true).await;
    }
}

/// A chaos-test hook, built only with the `failpoints` feature.
#[cfg(feature = "failpoints")]
mod failpoint {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tasker_shared::store::transitions::Dispatch;

    /// `TASKER_FAILPOINT_PAUSE_AFTER_CLAIMS`: from this many claimed batches on, never
    /// publish one, as a coordinator frozen between committing a claim and publishing it
    /// would. The steps stay `enqueued` under their dispatch lease, exactly as they are
    /// while a batch waits to be published, so a test can kill the coordinator then.
    #[derive(Debug, Default)]
    pub(super) struct PauseAfterClaims {
        after: Option<u64>,
        /// Claimed batches seen so far.
        claims: AtomicU64,
    }

    impl PauseAfterClaims {
        pub(super) fn after(claims: Option<u64>) -> Self {
            PauseAfterClaims {
                after: claims,
                claims: AtomicU64::new(0),
            }
        }

        /// Whether `claimed` is held back: logged, and never published.
        pub(super) fn holds(&self, claimed: &[Dispatch]) -> bool {
            let claims = self.claims.fetch_add(1, Ordering::Relaxed) + 1;
            let holds = self.after.is_some_and(|n| claims >= n);
            if holds {
                tracing::warn!(claimed = claimed.len(), "failpoint: paused after claim");
            }
            holds
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::{Value, json};
    use tasker_shared::messages::{SCHEMA_VERSION, StepBatch};

    use super::*;

    fn dispatch(n: u128, namespace: &str, context: Value) -> Dispatch {
        Dispatch {
            message: StepMessage {
                schema_version: SCHEMA_VERSION,
                task_id: Uuid::from_u128(n),
                step_id: Uuid::from_u128(1_000 + n),
                step_name: format!("s{n}"),
                namespace: namespace.to_owned(),
                template: "t@1".into(),
                handler: "noop".into(),
                config: json!({}),
                context,
                parents: BTreeMap::new(),
                attempt: 1,
                retry_limit: 3,
                deferrals: 0,
                dispatch_token: Uuid::from_u128(2_000 + n),
                timeout_ms: 1_000,
                dispatched_at: chrono::Utc::now(),
                item: None,
                index: None,
            },
            trace_parent: None,
        }
    }

    fn step_ids(message: &Outgoing) -> Vec<Uuid> {
        if message.is_batch() {
            StepBatch::decode(&message.body)
                .unwrap()
                .steps
                .into_iter()
                .map(|s| s.step.step_id)
                .collect()
        } else {
            vec![StepMessage::decode(&message.body).unwrap().step_id]
        }
    }

    #[test]
    fn steps_of_one_namespace_travel_together_up_to_the_most_a_message_carries() {
        // 19 steps of `a` and 2 of `b`, interleaved, claimed in this order.
        let dispatches: Vec<Dispatch> = (0..21)
            .map(|n| {
                dispatch(
                    n,
                    if n % 10 == 3 { "b" } else { "a" },
                    json!({"n": n as u64}),
                )
            })
            .collect();
        let mut traceparents = vec![None; dispatches.len()];
        let outgoing = messages(&dispatches, &mut traceparents).unwrap();
        let sizes: Vec<usize> = outgoing.iter().map(|m| m.steps.len()).collect();
        assert_eq!(
            sizes,
            [
                STEPS_PER_MESSAGE,
                STEPS_PER_MESSAGE,
                19 - 2 * STEPS_PER_MESSAGE,
                2
            ]
        );
        // Every step once, each namespace's in claim order, the body saying what `steps` says.
        let mut seen = Vec::new();
        for message in &outgoing {
            let namespace = &dispatches[message.steps[0]].message.namespace;
            assert!(
                message
                    .steps
                    .iter()
                    .all(|&i| &dispatches[i].message.namespace == namespace)
            );
            assert!(message.steps.windows(2).all(|w| w[0] < w[1]));
            let ids: Vec<Uuid> = message
                .steps
                .iter()
                .map(|&i| dispatches[i].message.step_id)
                .collect();
            assert_eq!(step_ids(message), ids);

            seen.extend(message.steps.iter().copied());
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..21).collect::<Vec<_>>());
    }

    #[test]
    fn a_step_claimed_alone_travels_in_a_step_message_with_its_trace_context_in_the_header() {
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let dispatches = vec![dispatch(1, "a", json!({})), dispatch(2, "b", json!({}))];
        let mut traceparents = vec![Some(traceparent.to_owned()), None];
        let outgoing = messages(&dispatches, &mut traceparents).unwrap();
        assert_eq!(outgoing.len(), 2);
        assert!(!outgoing[0].is_batch());
        assert_eq!(outgoing[0].traceparent.as_deref(), Some(traceparent));
        assert_eq!(
            outgoing[0].body,
            serde_json::to_vec(&dispatches[0].message).unwrap()
        );
        assert_eq!(outgoing[1].traceparent, None);
        assert_eq!(
            outgoing[1].body,
            serde_json::to_vec(&dispatches[1].message).unwrap()
        );

        // Together, each carries its own in the body.
        let dispatches = vec![dispatch(1, "a", json!({})), dispatch(2, "a", json!({}))];
        let mut traceparents = vec![Some(traceparent.to_owned()), None];
        let outgoing = messages(&dispatches, &mut traceparents).unwrap();
        assert_eq!(outgoing.len(), 1);
        assert!(outgoing[0].is_batch() && outgoing[0].traceparent.is_none());
        let batch = StepBatch::decode(&outgoing[0].body).unwrap();
        assert_eq!(batch.steps[0].traceparent.as_deref(), Some(traceparent));
        assert_eq!(batch.steps[1].traceparent, None);
    }

    #[test]
    fn large_steps_split_a_batch_and_one_larger_than_a_batch_travels_alone() {
        let big = |n| dispatch(n, "a", json!({"blob": "x".repeat(MAX_BATCH_BYTES / 3)}));
        let huge = dispatch(9, "a", json!({"blob": "x".repeat(MAX_BATCH_BYTES)}));
        let dispatches = vec![big(1), big(2), big(3), huge, big(4)];
        let mut traceparents = vec![None; dispatches.len()];
        let outgoing = messages(&dispatches, &mut traceparents).unwrap();
        let groups: Vec<Vec<usize>> = outgoing.iter().map(|m| m.steps.clone()).collect();
        assert_eq!(groups, [vec![0, 1], vec![2], vec![3], vec![4]]);
        assert!(
            outgoing
                .iter()
                .all(|m| m.steps.len() == 1 || m.body.len() <= MAX_BATCH_BYTES + 64)
        );
        for message in &outgoing {
            assert_eq!(step_ids(message).len(), message.steps.len());
        }

        // A message begun after a split by size fills up with the steps after it.
        let large = |n| dispatch(n, "a", json!({"blob": "x".repeat(MAX_BATCH_BYTES * 3 / 5)}));
        let mut dispatches = vec![large(1), large(2)];
        dispatches.extend((3..10).map(|n| dispatch(n, "a", json!({}))));
        let mut traceparents = vec![None; dispatches.len()];
        let outgoing = messages(&dispatches, &mut traceparents).unwrap();
        let sizes: Vec<usize> = outgoing.iter().map(|m| m.steps.len()).collect();
        assert_eq!(sizes, [1, STEPS_PER_MESSAGE]);
    }
}
