//! What the worker tells coordinators besides results:
//! - started notices, so steps show `in_progress` and get a running lease. Each notice
//!   is held [`LINGER`] from its step's start, then sent with the others due (one
//!   message per few milliseconds, not one per step). A notice whose step's result the
//!   broker has confirmed by then is dropped: the result records the start itself, so a
//!   step shorter than the linger costs the coordinator one write, not two. A notice
//!   of a redelivered copy leaves at once: its handler waits for the coordinator's
//!   answer (see the runtime's `withdrawn_on_redelivery`);
//! - heartbeats for every running step, so a long step keeps its lease while a worker
//!   that died loses its steps within one heartbeat lease.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::Channel;
use lapin::options::BasicPublishOptions;
use tasker_protocol::broker::{Topology, persistent};
use tasker_protocol::messages::{
    ControlMessage, HeartbeatBatch, SCHEMA_VERSION, StartedBatch, StepStarted, WorkerMessage,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::executor::InFlight;
#[cfg(feature = "failpoints")]
use crate::failpoint::{Failpoint, Stage};
use crate::runtime::BROKER_PATIENCE;

/// Most notices in one message.
const MAX_BATCH: usize = 256;
/// How long a notice is held after its step started. Under load a result's confirm
/// takes tens of milliseconds; held for 20 ms from the first notice of a batch, four
/// notices in ten still went out for no-op steps (BENCHMARKS.md).
const LINGER: Duration = Duration::from_millis(50);
/// Notices due within this much of the oldest one leave with it, so a steady stream of
/// starts makes one message per this interval at most.
const GATHER: Duration = Duration::from_millis(10);

/// A started notice waiting for its batch.
pub(crate) struct Notice {
    pub(crate) step: StepStarted,
    /// Set once the broker has confirmed the step's result: the notice is then not needed.
    pub(crate) answered: Arc<AtomicBool>,
    /// Sent at once, not held (a redelivered copy, whose handler waits for the answer).
    pub(crate) urgent: bool,
}

/// Collect notices from `receiver` and publish them, each [`LINGER`] after it arrived
/// (with those due within [`GATHER`] of it), until the sender side is dropped; then
/// send what is left at once.
pub(crate) async fn run(
    mut receiver: mpsc::UnboundedReceiver<Notice>,
    channel: Channel,
    topology: Topology,
    worker_id: String,
) {
    let mut held: VecDeque<(Instant, Notice)> = VecDeque::new();
    let mut open = true;
    loop {
        let due = held.front().map(|(arrived, _)| *arrived + LINGER);
        tokio::select! {
            received = receiver.recv(), if open => match received {
                Some(notice) if notice.urgent => {
                    let message = WorkerMessage::Started(StartedBatch {
                        schema_version: SCHEMA_VERSION,
                        worker_id: worker_id.clone(),
                        steps: vec![notice.step],
                    });
                    publish(&channel, &topology, &message).await;
                }
                Some(notice) => held.push_back((Instant::now(), notice)),
                None => open = false,
            },
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {}
        }
        // Everything once the session ends; otherwise what is due, with its company.
        let horizon = Instant::now() + GATHER;
        let leaves = |arrived: &Instant| !open || *arrived + LINGER <= horizon;
        let mut steps = Vec::new();
        while held.front().is_some_and(|(arrived, _)| leaves(arrived)) {
            let Some((_, notice)) = held.pop_front() else {
                break;
            };
            if !notice.answered.load(Ordering::Acquire) {
                steps.push(notice.step);
            }
        }
        for chunk in steps.chunks(MAX_BATCH) {
            let message = WorkerMessage::Started(StartedBatch {
                schema_version: SCHEMA_VERSION,
                worker_id: worker_id.clone(),
                steps: chunk.to_vec(),
            });
            // Best effort: a lost notice only means the step shows `enqueued` until its
            // result arrives.
            publish(&channel, &topology, &message).await;
        }
        if !open && held.is_empty() {
            return;
        }
    }
}

/// What the heartbeat loop needs.
pub(crate) struct Heartbeats {
    pub(crate) inflight: InFlight,
    pub(crate) channel: Channel,
    pub(crate) topology: Topology,
    pub(crate) worker_id: String,
    pub(crate) interval: Duration,
    pub(crate) concurrency: u16,
    pub(crate) all_namespaces: bool,
    /// The namespaces consumed now (they change as namespaces are announced).
    pub(crate) namespaces: Box<dyn Fn() -> Vec<String> + Send>,
    #[cfg(feature = "failpoints")]
    pub(crate) failpoint: Failpoint,
}

/// Every `interval`, until `stop`: tell coordinators which steps are still running (on
/// the results queue, to extend their leases) and that this worker is alive (on the
/// control exchange, for `/health/status`).
pub(crate) async fn heartbeats(beats: Heartbeats, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(beats.interval);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = ticks.tick() => {}
        }
        let steps = beats.inflight.running();
        let status = ControlMessage::WorkerStatus {
            worker_id: beats.worker_id.clone(),
            namespaces: (beats.namespaces)(),
            all_namespaces: beats.all_namespaces,
            concurrency: beats.concurrency,
            in_flight: steps.len(),
            interval_ms: u64::try_from(beats.interval.as_millis()).unwrap_or(u64::MAX),
        };
        send(
            &beats.channel,
            &beats.topology,
            &beats.topology.control_exchange(),
            "",
            &status,
            "the worker status",
        )
        .await;
        if steps.is_empty() {
            continue;
        }
        #[cfg(feature = "failpoints")]
        if beats.failpoint.hits(Stage::Heartbeating) {
            tracing::warn!("failpoint: paused at heartbeating");
            while beats.channel.status().connected() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tracing::warn!("failpoint: released");
        }
        let message = WorkerMessage::Heartbeat(HeartbeatBatch {
            schema_version: SCHEMA_VERSION,
            worker_id: beats.worker_id.clone(),
            steps,
        });
        publish(&beats.channel, &beats.topology, &message).await;
    }
}

/// Best effort: a lost notice only means a step shows `enqueued` until its result
/// arrives; a lost heartbeat is covered by the next one.
async fn publish(channel: &Channel, topology: &Topology, message: &WorkerMessage) {
    send(
        channel,
        topology,
        "",
        &topology.results_queue(),
        message,
        "a notice",
    )
    .await;
}

/// Publish `message` as JSON without a confirm, giving up after [`BROKER_PATIENCE`];
/// a failure is logged as not sending `what`.
async fn send(
    channel: &Channel,
    topology: &Topology,
    exchange: &str,
    routing_key: &str,
    message: &impl serde::Serialize,
    what: &str,
) {
    let body = match serde_json::to_vec(message) {
        Ok(body) => body,
        Err(error) => {
            tracing::warn!(%error, "cannot encode {what}");
            return;
        }
    };
    let published = tokio::time::timeout(
        BROKER_PATIENCE,
        channel.basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            &body,
            topology.signed(&body, persistent()),
        ),
    )
    .await;
    match published {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::warn!(%error, "cannot publish {what}"),
        Err(_) => tracing::warn!("cannot publish {what}: no answer from the broker"),
    }
}
