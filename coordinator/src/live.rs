//! Live updates for the console: lifecycle events fanned out to the open event streams
//! (`GET /v1/events/stream`).
//!
//! Viewers never poll the database. While at least one stream is open, the coordinator
//! consumes the events exchange through one private queue (server-named, exclusive,
//! auto-deleted, bounded to [`QUEUE_LENGTH`] messages, oldest dropped first) and hands
//! each event to every open stream through a broadcast channel; each stream keeps the
//! events its filter asks for. With no stream open for [`LINGER`], the consumer stops
//! and its queue disappears, so a coordinator nobody watches pays nothing.
//!
//! The events are the ones the relay publishes (`docs/observability.md`, "Lifecycle
//! events"): with `TASKER_EVENTS=false` there are none, and [`LiveEvents::enabled`] says
//! so; with patterns there, only those ([`LiveEvents::only`]). A stream that falls
//! behind gets a `lagged` event and should reload what it shows.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::types::{AMQPValue, FieldTable};
use serde::Deserialize;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::link::BrokerLink;
use tasker_shared::broker::{Topology, subscribe_private};
use tasker_shared::events::EventSelection;

/// Events held for streams that read slower than events arrive.
const BUFFER: usize = 4096;
/// Messages the private queue keeps while the consumer is behind (oldest dropped first).
const QUEUE_LENGTH: i64 = 10_000;
/// How long the consumer outlives the last stream.
const LINGER: Duration = Duration::from_secs(30);
/// How long to wait before consuming again after the broker failed.
const RETRY: Duration = Duration::from_secs(1);
/// Most streams open at once on one coordinator; fewer when the API serves fewer than
/// twice as many connections (see [`LiveEvents::max_streams`]).
const MAX_STREAMS: usize = 256;

/// One lifecycle event as received: its JSON body and what streams filter on.
#[derive(Debug)]
pub(crate) struct LiveEvent {
    /// The event's JSON, as published.
    pub(crate) json: String,
    /// `task.completed`, `step.failed`…
    pub(crate) event: String,
    pub(crate) task_id: Option<Uuid>,
    pub(crate) namespace: String,
    /// Set on the marker sent once the consumer is bound again after it lost the broker:
    /// events published meanwhile reached no stream, and every stream says `lagged`.
    pub(crate) missed: bool,
}

impl LiveEvent {
    /// The marker of events missed while the consumer was not bound.
    fn missed() -> Self {
        LiveEvent {
            json: String::new(),
            event: String::new(),
            task_id: None,
            namespace: String::new(),
            missed: true,
        }
    }
}

/// The fields of a lifecycle event that streams filter on.
#[derive(Deserialize)]
struct Header {
    event: String,
    #[serde(default)]
    task_id: Option<Uuid>,
    #[serde(default)]
    namespace: String,
}

/// The hub: one per coordinator.
pub(crate) struct LiveEvents {
    broker: Arc<BrokerLink>,
    topology: Topology,
    /// `TASKER_EVENTS`: without the relay there is nothing to stream.
    selection: EventSelection,
    sender: broadcast::Sender<Arc<LiveEvent>>,
    /// Whether the consumer runs. Also the lock under which streams are counted and
    /// opened.
    consuming: Mutex<bool>,
    /// Whether the consumer's queue is bound: events published from then on reach the
    /// streams.
    bound: watch::Sender<bool>,
    /// Cancelled when the coordinator stops: the open streams end, so they do not hold
    /// the shutdown's drain.
    closing: CancellationToken,
    /// Most streams open at once.
    max_streams: usize,
}

impl LiveEvents {
    /// `max_connections` is the API's (`TASKER_HTTP_MAX_CONNECTIONS`): streams take at
    /// most half of them, so that a page of streams never leaves a probe or an
    /// operator's request waiting to be accepted.
    pub(crate) fn new(
        broker: Arc<BrokerLink>,
        topology: Topology,
        selection: EventSelection,
        max_connections: usize,
    ) -> Self {
        LiveEvents {
            max_streams: MAX_STREAMS.min(max_connections / 2),
            broker,
            topology,
            selection,
            sender: broadcast::channel(BUFFER).0,
            consuming: Mutex::new(false),
            bound: watch::Sender::new(false),
            closing: CancellationToken::new(),
        }
    }

    /// Cancelled when the coordinator stops.
    pub(crate) fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }

    /// End every open stream and the consumer: the coordinator is stopping.
    pub(crate) fn close(&self) {
        self.closing.cancel();
    }

    /// Whether lifecycle events are published at all (`TASKER_EVENTS`).
    pub(crate) fn enabled(&self) -> bool {
        self.selection.is_on()
    }

    /// The patterns of the events published, when `TASKER_EVENTS` names only some.
    pub(crate) fn only(&self) -> Option<&[String]> {
        self.selection.patterns()
    }

    /// Most streams open at once.
    pub(crate) fn max_streams(&self) -> usize {
        self.max_streams
    }

    /// Receive every event from now on, starting the consumer if it is not running; `None`
    /// when [`LiveEvents::max_streams`] streams are open. Streams are counted and opened under one
    /// lock, so concurrent requests cannot pass the limit together.
    pub(crate) fn subscribe(self: &Arc<Self>) -> Option<broadcast::Receiver<Arc<LiveEvent>>> {
        let mut consuming = self.consuming.lock().unwrap_or_else(|p| p.into_inner());
        if self.sender.receiver_count() >= self.max_streams {
            return None;
        }
        let receiver = self.sender.subscribe();
        if self.enabled() && !*consuming {
            *consuming = true;
            tokio::spawn(self.clone().consume());
        }
        Some(receiver)
    }

    /// Wait (at most `patience`) until events published from now on reach the streams;
    /// whether they do.
    pub(crate) async fn ready(&self, patience: Duration) -> bool {
        if !self.enabled() {
            return false;
        }
        let mut bound = self.bound.subscribe();
        tokio::time::timeout(patience, bound.wait_for(|bound| *bound))
            .await
            .is_ok_and(|bound| bound.is_ok())
    }

    /// Consume the events exchange until no stream has been open for [`LINGER`].
    async fn consume(self: Arc<Self>) {
        let mut idle_since: Option<tokio::time::Instant> = None;
        // Whether the last subscription failed with streams open: they missed what was
        // published until the next one is bound.
        let mut missed = false;
        loop {
            let consumed = self.consume_once(&mut idle_since, missed).await;
            self.bound.send_replace(false);
            {
                let mut consuming = self.consuming.lock().unwrap_or_else(|p| p.into_inner());
                // A stream may have opened since the last look: it saw `consuming` still
                // set and counts on this loop.
                if self.sender.receiver_count() == 0 || self.closing.is_cancelled() {
                    *consuming = false;
                    tracing::debug!("no event stream open: stopped consuming events");
                    return;
                }
            }
            missed = consumed.is_err();
            match consumed {
                Ok(()) => idle_since = None,
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "live events: cannot consume the events exchange; retrying"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(RETRY) => {}
                        () = self.closing.cancelled() => {}
                    }
                }
            }
        }
    }

    /// One subscription: returns once no stream has been open for [`LINGER`]. After a
    /// failed one (`missed`), the open streams are told that they missed events.
    async fn consume_once(
        &self,
        idle_since: &mut Option<tokio::time::Instant>,
        missed: bool,
    ) -> anyhow::Result<()> {
        let channel = self.broker.connection().create_channel().await?;
        let mut arguments = FieldTable::default();
        arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(QUEUE_LENGTH));
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString("drop-head".to_owned().into()),
        );
        let mut consumer =
            subscribe_private(&channel, &self.topology.events_exchange(), "#", arguments).await?;
        tracing::debug!("consuming lifecycle events for the open event streams");
        self.bound.send_replace(true);
        if missed {
            let _ = self.sender.send(Arc::new(LiveEvent::missed()));
        }
        let mut tick = tokio::time::interval(LINGER / 6);
        loop {
            tokio::select! {
                () = self.closing.cancelled() => {
                    let _ = channel.close(200, "the coordinator is stopping".into()).await;
                    return Ok(());
                }
                delivery = consumer.next() => {
                    let delivery = match delivery {
                        Some(Ok(delivery)) => delivery,
                        Some(Err(error)) => return Err(error.into()),
                        None => anyhow::bail!("the events consumer ended"),
                    };
                    // Lifecycle events are not signed (their consumers are other systems,
                    // without `TASKER_MESSAGE_KEY`): the exchange is Tasker's own, and
                    // publishing to it takes the broker's credentials.
                    let Ok(json) = String::from_utf8(delivery.data) else { continue };
                    let Ok(header) = serde_json::from_str::<Header>(&json) else { continue };
                    // No receiver: the send fails, and the tick below notices.
                    let _ = self.sender.send(Arc::new(LiveEvent {
                        json,
                        event: header.event,
                        task_id: header.task_id,
                        namespace: header.namespace,
                        missed: false,
                    }));
                }
                _ = tick.tick() => {
                    if self.sender.receiver_count() > 0 {
                        *idle_since = None;
                    } else if idle_since.get_or_insert_with(tokio::time::Instant::now).elapsed() >= LINGER {
                        let _ = channel.close(200, "no event stream open".into()).await;
                        return Ok(());
                    }
                }
            }
        }
    }
}
