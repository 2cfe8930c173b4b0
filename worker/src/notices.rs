//! Started notices, batched: the worker tells coordinators which steps it has started
//! (so they show `in_progress` and get a lease sized to their timeout) with one message
//! per few milliseconds, not one per step.

use std::time::Duration;

use lapin::Channel;
use lapin::options::BasicPublishOptions;
use tasker_shared::broker::{Topology, persistent};
use tasker_shared::messages::{SCHEMA_VERSION, StartedBatch, StepStarted, WorkerMessage};
use tokio::sync::mpsc;

/// Most notices in one message.
const MAX_BATCH: usize = 256;
/// Longest a notice waits for company.
const LINGER: Duration = Duration::from_millis(5);

/// Collect notices from `receiver` and publish them in batches until the sender side is
/// dropped and everything received has been sent.
pub(crate) async fn run(
    mut receiver: mpsc::UnboundedReceiver<StepStarted>,
    channel: Channel,
    topology: Topology,
    worker_id: String,
) {
    let mut batch = Vec::new();
    while let Some(first) = receiver.recv().await {
        batch.push(first);
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(notice)) => batch.push(notice),
                Ok(None) | Err(_) => break,
            }
        }
        let message = WorkerMessage::Started(StartedBatch {
            schema_version: SCHEMA_VERSION,
            worker_id: worker_id.clone(),
            steps: std::mem::take(&mut batch),
        });
        // Best effort: a lost notice only means the step shows `enqueued` until its
        // result arrives.
        let body = match serde_json::to_vec(&message) {
            Ok(body) => body,
            Err(error) => {
                tracing::warn!(%error, "cannot encode started notices");
                continue;
            }
        };
        let published = channel
            .basic_publish(
                "".into(),
                topology.results_queue().into(),
                BasicPublishOptions::default(),
                &body,
                persistent(),
            )
            .await;
        if let Err(error) = published {
            tracing::warn!(%error, "cannot publish started notices");
        }
    }
}
