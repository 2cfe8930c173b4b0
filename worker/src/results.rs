//! Results leave the worker in batches. Each finished step hands its result to one
//! sender task, which publishes what has gathered as one persistent message (a `results`
//! batch, or a plain `result` when it is alone) and answers each step once the broker
//! confirms it; only then is the step's message acked. At most [`IN_FLIGHT`] messages
//! wait for their confirms at once, and results that finish meanwhile gather for the
//! next one. So a result that finds the sender idle leaves at once (light load adds no
//! wait), and under load one message carries what finished during a confirm: the broker
//! stores, delivers and acks one message for many steps.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Connection, ConnectionStatus};
use tasker_protocol::broker::{self, Topology, persistent};
use tasker_protocol::messages::{BatchedResult, SCHEMA_VERSION, StepResult, WorkerMessage};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::WorkerMetrics;
use crate::runtime::BROKER_PATIENCE;

/// Messages of results waiting for their confirms at once.
const IN_FLIGHT: usize = 2;
/// Most results in one message.
const MAX_RESULTS: usize = 128;
/// A message stops gathering results past this many bytes of JSON (a larger result
/// leaves alone).
const MAX_BYTES: usize = 512 * 1024;

/// How long a finished step waits for a broker session to publish its result on, when
/// the connection it came on was lost.
pub(crate) const RESULT_PATIENCE: Duration = Duration::from_secs(60);

/// A broker session's confirm-mode channel for results and dead letters, with its
/// connection's status.
#[derive(Clone)]
pub(crate) struct PublishChannel {
    pub(crate) channel: Channel,
    pub(crate) connection: ConnectionStatus,
}

impl PublishChannel {
    pub(crate) fn new(channel: Channel, connection: &Connection) -> Self {
        PublishChannel {
            channel,
            connection: connection.status().clone(),
        }
    }

    fn connected(&self) -> bool {
        self.channel.status().connected()
    }

    /// Wait for `publish`, a publish on this channel, at most `patience`, or longer while
    /// the broker blocks the connection's publishers ([`broker::patiently`]): lapin
    /// keeps what is published during the block and writes it, with any ack or nack
    /// queued after it, once the block lifts, so a result given up on meanwhile would
    /// reach the coordinator after its step was handed back, and the step would run
    /// twice.
    pub(crate) async fn written<T>(
        &self,
        patience: Duration,
        publish: impl Future<Output = T>,
    ) -> anyhow::Result<T> {
        let mut deadline = tokio::time::Instant::now() + patience;
        broker::patiently(publish, &mut deadline, patience, Some(&self.connection))
            .await
            .context("no answer from the broker to a publish")
    }
}

/// A result (with its trace context) waiting to leave, and the step waiting for its
/// confirm.
struct Outgoing {
    entry: BatchedResult,
    confirmed: oneshot::Sender<anyhow::Result<()>>,
}

/// Hands results to the sender task. The task stops once every `ResultSender` is gone
/// and what it holds is published.
#[derive(Clone)]
pub(crate) struct ResultSender(mpsc::UnboundedSender<Outgoing>);

impl ResultSender {
    /// Start the sender task. `channels` is the current broker session's confirm-mode
    /// channel (`None` between sessions).
    pub(crate) fn start(
        channels: watch::Receiver<Option<PublishChannel>>,
        topology: Topology,
        metrics: std::sync::Arc<WorkerMetrics>,
    ) -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(
            receiver,
            Publisher {
                channels,
                topology,
                metrics,
            },
        ));
        ResultSender(sender)
    }

    /// Publish `result` (with the trace context of its attempt) and wait for the
    /// broker's confirm. If the connection the step came on was lost, the result waits
    /// for the next session (up to [`RESULT_PATIENCE`]); if the connection fails during
    /// the publish, it is published once more on the next session (a duplicate result is
    /// dropped by the coordinator's fence).
    pub(crate) async fn publish(
        &self,
        result: StepResult,
        traceparent: Option<String>,
    ) -> anyhow::Result<()> {
        let (confirmed, answer) = oneshot::channel();
        self.0
            .send(Outgoing {
                entry: BatchedResult {
                    result,
                    traceparent,
                },
                confirmed,
            })
            .map_err(|_| anyhow::anyhow!("the worker's result sender has stopped"))?;
        answer
            .await
            .context("the worker's result sender stopped before the broker answered")?
    }
}

/// What publishing needs.
#[derive(Clone)]
struct Publisher {
    channels: watch::Receiver<Option<PublishChannel>>,
    topology: Topology,
    metrics: std::sync::Arc<WorkerMetrics>,
}

async fn run(mut receiver: mpsc::UnboundedReceiver<Outgoing>, publisher: Publisher) {
    let mut waiting: VecDeque<Outgoing> = VecDeque::new();
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    loop {
        while in_flight.len() < IN_FLIGHT && !waiting.is_empty() {
            let (body, properties, answers) = next_message(&mut waiting);
            publisher
                .metrics
                .result_batch_size
                .observe(answers.len() as f64);
            let publisher = publisher.clone();
            in_flight.push(async move {
                let published = publisher.publish(&body, properties).await;
                for answer in answers {
                    let _ = answer.send(match &published {
                        Ok(()) => Ok(()),
                        Err(error) => Err(anyhow::anyhow!("{error:#}")),
                    });
                }
            });
        }
        if !open && waiting.is_empty() && in_flight.is_empty() {
            return;
        }
        tokio::select! {
            received = receiver.recv(), if open => match received {
                Some(outgoing) => waiting.push_back(outgoing),
                None => open = false,
            },
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
        }
        // Everything that has arrived meanwhile joins the next message.
        while let Ok(outgoing) = receiver.try_recv() {
            waiting.push_back(outgoing);
        }
    }
}

/// Take the next message's results from the front of `waiting`: its body, properties
/// and the steps to answer. One result is a `result` message with its trace context in
/// the `traceparent` header; several are a `results` batch, each with its own.
fn next_message(
    waiting: &mut VecDeque<Outgoing>,
) -> (
    Vec<u8>,
    BasicProperties,
    Vec<oneshot::Sender<anyhow::Result<()>>>,
) {
    let mut answers = Vec::new();
    if waiting.len() == 1
        && let Some(Outgoing { entry, confirmed }) = waiting.pop_front()
    {
        answers.push(confirmed);
        let properties = broker::with_traceparent(persistent(), entry.traceparent);
        let body = serde_json::to_vec(&WorkerMessage::Result(entry.result))
            .expect("a result encodes as JSON");
        return (body, properties, answers);
    }
    // The batch's envelope around its entries, each encoded once as it joins (so the
    // size limit is exact): what serde writes for `WorkerMessage::Results`.
    let mut body =
        format!(r#"{{"type":"results","schema_version":{SCHEMA_VERSION},"results":["#).into_bytes();
    while answers.len() < MAX_RESULTS {
        let Some(next) = waiting.front() else {
            break;
        };
        let entry = serde_json::to_vec(&next.entry).expect("a result encodes as JSON");
        if !answers.is_empty() && body.len() + entry.len() > MAX_BYTES {
            break;
        }
        if !answers.is_empty() {
            body.push(b',');
        }
        body.extend_from_slice(&entry);
        if let Some(outgoing) = waiting.pop_front() {
            answers.push(outgoing.confirmed);
        }
    }
    body.extend_from_slice(b"]}");
    (body, persistent(), answers)
}

impl Publisher {
    /// Publish one message on the current session's channel and wait for its confirm,
    /// once more on the next session if the connection failed meanwhile.
    async fn publish(&self, body: &[u8], properties: BasicProperties) -> anyhow::Result<()> {
        let mut tries = 0;
        loop {
            tries += 1;
            let channel = current_channel(self.channels.clone(), RESULT_PATIENCE).await?;
            match publish_on(&channel, &self.topology, body, properties.clone()).await {
                Ok(()) => return Ok(()),
                Err(error) if tries < 2 && !channel.connected() => {
                    tracing::info!(
                        error = format!("{error:#}"),
                        "the connection failed while publishing results; publishing again on the next one"
                    );
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// The current session's channel, waiting up to `patience` for a session whose
/// connection is up.
pub(crate) async fn current_channel(
    mut channels: watch::Receiver<Option<PublishChannel>>,
    patience: Duration,
) -> anyhow::Result<PublishChannel> {
    let channel = tokio::time::timeout(
        patience,
        channels.wait_for(|c| c.as_ref().is_some_and(PublishChannel::connected)),
    )
    .await
    .context("no connection to RabbitMQ")?
    .context("the worker is stopping")?;
    channel.clone().context("no connection to RabbitMQ")
}

async fn publish_on(
    channel: &PublishChannel,
    topology: &Topology,
    body: &[u8],
    properties: BasicProperties,
) -> anyhow::Result<()> {
    let publish = channel.channel.basic_publish(
        "".into(),
        topology.results_queue().into(),
        BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        },
        body,
        topology.signed(body, properties),
    );
    let confirm = channel.written(BROKER_PATIENCE, publish).await??;
    let confirm = broker::await_confirm_on(confirm, &channel.connection).await?;
    anyhow::ensure!(confirm.is_ack(), "the broker refused the result");
    anyhow::ensure!(
        confirm.take_message().is_none(),
        "the results queue is missing"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use serde_json::json;
    use tasker_protocol::messages::{BatchedResult, Outcome, ResultBatch};
    use uuid::Uuid;

    fn outgoing(n: u128, results: serde_json::Value) -> (Outgoing, BatchedResult) {
        let result = StepResult {
            schema_version: SCHEMA_VERSION,
            task_id: Uuid::from_u128(n),
            step_id: Uuid::from_u128(n + 1),
            dispatch_token: Uuid::from_u128(n + 2),
            outcome: Outcome::Success,
            results: Some(results),
            error: None,
            started_at: Utc::now(),
            finished_at: Utc::now(),
            worker_id: "w1".into(),
        };
        let traceparent = n
            .is_multiple_of(2)
            .then(|| "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned());
        let entry = BatchedResult {
            result,
            traceparent,
        };
        let (confirmed, _) = oneshot::channel();
        (
            Outgoing {
                entry: entry.clone(),
                confirmed,
            },
            entry,
        )
    }

    #[test]
    fn a_lone_result_leaves_as_a_result_message_with_its_trace_in_the_header() {
        let (one, expected) = outgoing(10, json!({"ok": true}));
        let mut waiting = VecDeque::from([one]);
        let (body, properties, answers) = next_message(&mut waiting);
        assert_eq!(answers.len(), 1);
        assert!(waiting.is_empty());
        assert_eq!(
            broker::header_str(&properties, broker::TRACEPARENT_HEADER),
            expected.traceparent
        );
        assert!(expected.traceparent.is_some());
        assert_eq!(
            WorkerMessage::decode(&body).unwrap(),
            WorkerMessage::Result(expected.result)
        );
    }

    #[test]
    fn waiting_results_leave_together_as_serde_would_write_them_up_to_the_limits() {
        let (mut waiting, expected): (VecDeque<_>, Vec<_>) = (0..MAX_RESULTS as u128 + 5)
            .map(|n| outgoing(n * 10, json!({"n": n as u64})))
            .unzip();
        let (body, _, answers) = next_message(&mut waiting);
        assert_eq!(answers.len(), MAX_RESULTS);
        assert_eq!(waiting.len(), 5);
        let batch = WorkerMessage::Results(ResultBatch {
            schema_version: SCHEMA_VERSION,
            results: expected[..MAX_RESULTS].to_vec(),
        });
        assert_eq!(body, serde_json::to_vec(&batch).unwrap());
        assert_eq!(WorkerMessage::decode(&body).unwrap(), batch);

        // Large results: the batch stops before it passes MAX_BYTES; the first goes
        // whatever its size.
        let big = json!("x".repeat(MAX_BYTES / 3));
        let (mut waiting, expected): (VecDeque<_>, Vec<_>) =
            (0..5).map(|n| outgoing(n * 10, big.clone())).unzip();
        let (body, _, answers) = next_message(&mut waiting);
        assert_eq!(answers.len(), 2);
        assert!(body.len() <= MAX_BYTES);
        assert_eq!(waiting.len(), 3);
        assert_eq!(
            waiting.front().map(|o| o.entry.result.step_id),
            Some(expected[2].result.step_id)
        );
        let huge = json!("x".repeat(MAX_BYTES * 2));
        let (mut waiting, _): (VecDeque<_>, Vec<_>) =
            (0..2).map(|n| outgoing(n * 10, huge.clone())).unzip();
        let (body, _, answers) = next_message(&mut waiting);
        assert_eq!(answers.len(), 1);
        assert!(body.len() > MAX_BYTES);
        assert_eq!(waiting.len(), 1);
    }
}
