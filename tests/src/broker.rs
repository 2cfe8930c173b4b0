//! RabbitMQ as the tests see it: publishing as a producer would, reading the dead-letter
//! queue, counting consumers, cutting connections, and deleting what a test declared.

use std::time::Duration;

use anyhow::{Context, bail};
use lapin::message::Delivery;
use lapin::options::{
    BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tasker_shared::broker::{REASON_HEADER, SOURCE_HEADER, carries_step_batch, header_str};
use tasker_shared::messages::steps_of;
use tokio::process::Command;

use crate::amqp_url;

/// A connection to the test broker and a channel on it in confirm mode (keep the
/// connection: dropping it closes the channel).
pub async fn confirm_channel() -> (Connection, Channel) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let channel = connection.create_channel().await.expect("a channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    (connection, channel)
}

/// Publish a persistent message, mandatory, and wait for the broker's confirm; fails
/// when the broker refuses it or routes it nowhere.
pub async fn publish(channel: &Channel, exchange: &str, routing_key: &str, body: &[u8]) {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "the broker refused a publish");
    assert!(
        confirm.take_message().is_none(),
        "a publish to {exchange}/{routing_key} was not routed"
    );
}

/// A message taken from a dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    /// `x-tasker-reason`: every dead letter has one.
    pub reason: String,
    /// `x-tasker-source-queue`, or empty.
    pub source_queue: String,
}

/// Take `count` messages from `queue` (acked as they are taken), waiting up to
/// `patience` for them; panics naming how many came.
pub async fn take_messages(
    channel: &Channel,
    queue: &str,
    count: usize,
    patience: Duration,
) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut messages = Vec::new();
    while messages.len() < count {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get");
        match got {
            Some(message) => messages.push(message.delivery),
            None => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "only {} of {count} messages arrived in {queue}: {:?}",
                    messages.len(),
                    messages
                        .iter()
                        .map(|m| String::from_utf8_lossy(&m.data).into_owned())
                        .collect::<Vec<_>>()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    messages
}

/// Take messages from the step queue `queue` (acked as they are taken), as a worker
/// would receive them, until they carried `count` steps, waiting up to 20 s for each:
/// each step as JSON, a batch's in order (a batched step's `traceparent` left in).
pub async fn take_steps(channel: &Channel, queue: &str, count: usize) -> Vec<serde_json::Value> {
    let mut steps = Vec::new();
    while steps.len() < count {
        let delivery = take_messages(channel, queue, 1, Duration::from_secs(20))
            .await
            .remove(0);
        let body: serde_json::Value =
            serde_json::from_slice(&delivery.data).expect("a step message is JSON");
        if carries_step_batch(&delivery.properties) {
            let batch = body["steps"].as_array().expect("a batch has steps");
            steps.extend(batch.iter().cloned());
        } else {
            steps.push(body);
        }
    }
    assert_eq!(steps.len(), count, "more steps came than asked for");
    steps
}

/// Take `count` messages from the dead-letter queue `queue`, waiting up to 30 s for them.
///
/// Whether more arrive is for the caller to check, with
/// [`assert_no_dead_letters`], once every message that could be dead-lettered has been
/// dealt with (a counter reached, a task finished).
pub async fn take_dead_letters(channel: &Channel, queue: &str, count: usize) -> Vec<DeadLetter> {
    take_messages(channel, queue, count, Duration::from_secs(30))
        .await
        .into_iter()
        .map(|delivery| DeadLetter {
            reason: header_str(&delivery.properties, REASON_HEADER)
                .expect("every dead letter has an x-tasker-reason header"),
            source_queue: header_str(&delivery.properties, SOURCE_HEADER).unwrap_or_default(),
            body: delivery.data,
        })
        .collect()
}

/// The dead-letter queue `queue` is empty now.
pub async fn assert_no_dead_letters(channel: &Channel, queue: &str) {
    let extra = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get");
    assert!(
        extra.is_none(),
        "an unexpected dead letter: {:?}",
        extra.map(|m| String::from_utf8_lossy(&m.delivery.data).into_owned())
    );
}

/// Delete the queues and exchanges a test created under `prefix`.
pub async fn delete_broker_objects(prefix: &str, namespaces: &[String]) -> anyhow::Result<()> {
    delete_broker_objects_at(&amqp_url(), prefix, namespaces).await
}

/// [`delete_broker_objects`] on the broker at `url`.
pub async fn delete_broker_objects_at(
    url: &str,
    prefix: &str,
    namespaces: &[String],
) -> anyhow::Result<()> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let mut queues: Vec<String> = namespaces
        .iter()
        .map(|n| format!("{prefix}.steps.{n}"))
        .collect();
    queues.extend(
        ["results", "dead_letter"]
            .iter()
            .map(|q| format!("{prefix}.{q}")),
    );
    for queue in queues {
        let _ = channel.queue_delete(queue.into(), Default::default()).await;
    }
    for exchange in ["steps", "control", "dlx", "events"] {
        let _ = channel
            .exchange_delete(format!("{prefix}.{exchange}").into(), Default::default())
            .await;
    }
    let _ = connection.close(200, "OK".into()).await;
    Ok(())
}

/// Close every RabbitMQ connection named `name` (the name a process gives its connection,
/// such as `tasker-worker w2`), as a network fault or an operator would, with
/// `rabbitmqctl close_connection`. Returns how many were closed.
pub async fn close_broker_connections(name: &str) -> anyhow::Result<usize> {
    let listed = rabbitmqctl(&[
        "list_connections",
        "pid",
        "client_properties",
        "-q",
        "--no-table-headers",
    ])
    .await?;
    let wanted = format!("\"{name}\"");
    let pids: Vec<String> = listed
        .lines()
        .filter(|line| line.contains("connection_name") && line.contains(&wanted))
        .filter_map(|line| line.split('\t').next().map(str::to_owned))
        .collect();
    for pid in &pids {
        rabbitmqctl(&["close_connection", pid, "fault injected by a test"]).await?;
    }
    Ok(pids.len())
}

/// Run `rabbitmqctl` with `args`; its standard output, or an error naming its stderr.
async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .with_context(|| format!("running rabbitmqctl {}", args[0]))?;
    anyhow::ensure!(
        output.status.success(),
        "rabbitmqctl {} failed: {}",
        args[0],
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `queue` as the broker has it now (a passive declare), or `None` when it does not exist.
async fn inspect_queue(queue: &str) -> anyhow::Result<Option<lapin::Queue>> {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await;
    let _ = connection.close(200, "OK".into()).await;
    Ok(declared.ok())
}

/// Delete `queue` (a test's own, declared outside Tasker; or one of Tasker's, to lose it).
///
/// # Errors
///
/// The broker unreachable, or refusing the deletion.
pub async fn delete_queue(queue: &str) -> anyhow::Result<()> {
    let (connection, channel) = confirm_channel().await;
    channel
        .queue_delete(queue.into(), Default::default())
        .await?;
    let _ = connection.close(200, "OK".into()).await;
    Ok(())
}

/// Whether `queue` exists now.
pub async fn queue_exists(queue: &str) -> anyhow::Result<bool> {
    Ok(inspect_queue(queue).await?.is_some())
}

/// Consumers of `queue` now (0 when it does not exist).
pub async fn queue_consumers(queue: &str) -> anyhow::Result<u32> {
    Ok(inspect_queue(queue)
        .await?
        .map(|q| q.consumer_count())
        .unwrap_or(0))
}

/// Ready messages in `queue` now (0 when it does not exist).
pub async fn queue_messages(queue: &str) -> anyhow::Result<u32> {
    Ok(inspect_queue(queue)
        .await?
        .map(|q| q.message_count())
        .unwrap_or(0))
}

/// The steps waiting in the step queue `queue`, message by message: how many each
/// message carries (one, or a batch). Every message is handed back to the queue; call it
/// while nothing consumes the queue.
pub async fn queued_steps(queue: &str) -> anyhow::Result<Vec<usize>> {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let mut carried = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await?
    {
        let delivery = message.delivery;
        let batch = carries_step_batch(&delivery.properties);
        carried.push(steps_of(&delivery.data, batch)?.len());
    }
    if !carried.is_empty() {
        channel
            .basic_nack(
                0,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await?;
    }
    let _ = connection.close(200, "OK".into()).await;
    Ok(carried)
}

/// Wait until `queue` holds no ready message (its consumers have taken them all, acked
/// or not).
pub async fn wait_until_taken(queue: &str, timeout: Duration) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    loop {
        let ready = queue_messages(queue).await?;
        if ready == 0 {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("{queue} still holds {ready} ready messages after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until `queue` has at least `consumers` consumers; returns how long that took.
pub async fn wait_for_consumers(
    queue: &str,
    consumers: u32,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let started = std::time::Instant::now();
    loop {
        let now = queue_consumers(queue).await.unwrap_or(0);
        if now >= consumers {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("{queue} has {now} consumers after {timeout:?}, expected {consumers}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Declare the durable `queue` with `argument` set (`x-queue-type`, `x-max-length`…), as
/// an operator or another installation might have: Tasker's own declaration of it then
/// fails as inequivalent.
pub async fn declare_queue_with(channel: &Channel, queue: &str, argument: (&str, AMQPValue)) {
    let mut arguments = FieldTable::default();
    arguments.insert(argument.0.into(), argument.1);
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .expect("queue declared");
}
