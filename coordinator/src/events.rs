//! The lifecycle events relay: publishes the transition history to the events exchange.
//!
//! The history is the outbox: every committed transition that means something to the
//! outside (`task.completed`, `step.failed`…, see `tasker_shared::events`) is published,
//! in order, at least once, then the relay's cursor moves past it in the same
//! transaction. `TASKER_EVENTS` may name only some events (routing-key patterns): the
//! others are not published, and the cursor moves past them too. Nothing on the dispatch
//! path waits for it. One coordinator relays at a time (the one holding the cursor's row
//! lock); the others skip.
//!
//! Transition ids come from one sequence but commit out of order, so a gap in the ids
//! may be a transaction still in flight: the relay waits at a gap until it fills, or
//! until every transaction that was running when it first met the gap has ended. The
//! transaction of a missing id took it before the ids after it, which had committed, so
//! it was running then, with a transaction id smaller than one the relay takes just
//! after its read. Once none of those is running (`pg_snapshot_xip`), every id still
//! missing below the highest read then was a rollback's, and the relay moves past all of
//! them at once. So a transaction that holds
//! an id for long (a slow commit, a long bulk operation) is waited for, not skipped, and
//! a rollback's gap is passed as soon as the transactions of its time have ended. One
//! left open (a session idle in a transaction that wrote) would hold the events back for
//! good, so after [`GAP_PATIENCE`] the relay gives up on it, says so in the log, and
//! does not wait for it again.
//!
//! A step's claim is no event and a quarter of the history: the read leaves claims out
//! but gives each row the id before it among all (`previous`), so what was left out is
//! never taken for a gap, and the cursor still moves past it.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::Channel;
use lapin::options::BasicPublishOptions;
use serde_json::value::RawValue;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::link::BrokerLink;
use crate::metrics::CoordinatorMetrics;
use crate::service::Service;
use tasker_shared::broker::{Topology, await_confirms, persistent, publish_together};
use tasker_shared::db::Database;
use tasker_shared::events::{Change, EventSelection, LifecycleEvent, event_name};
use tasker_shared::store::events::{
    Names, RecordedTransition, advance_cursor, lock_cursor, names_of, transitions_after,
};
use uuid::Uuid;

/// Most transitions relayed per transaction.
const BATCH: i64 = 500;
/// The longest wait at a gap in the transition ids while transactions that were running
/// when it was met stay open.
const GAP_PATIENCE: Duration = Duration::from_secs(60);
/// How soon the relay looks at a gap again.
const GAP_RECHECK: Duration = Duration::from_millis(50);
/// Most transactions given up on that are remembered.
const GIVEN_UP_KEPT: usize = 64;

/// Gaps in the transition ids the relay met.
#[derive(Debug, Default)]
struct Gaps {
    /// The gaps being waited out, if any.
    open: Option<Gap>,
    /// Transactions (ids) that were still running when a wait gave up on them: not waited
    /// for again.
    given_up: Vec<i64>,
}

/// Gaps met in one read, waited out together.
#[derive(Debug, Clone)]
struct Gap {
    /// The highest transition id read when the first was met: every id missing below it
    /// belongs to a transaction that was running then, or has ended.
    upto: i64,
    /// A transaction id taken just after that read: those transactions have smaller
    /// ones.
    xid: i64,
    seen: std::time::Instant,
    /// They have all ended (or were given up on): the ids still missing below `upto`
    /// were rolled back.
    passed: bool,
}

pub(crate) struct EventRelay {
    db: Database,
    channel: Channel,
    /// The connection's state: no batch is begun while RabbitMQ blocks it.
    broker: Arc<BrokerLink>,
    topology: Topology,
    /// Which events are published (`TASKER_EVENTS`).
    selection: EventSelection,
    /// The step statuses whose history rows may be published (the rest are not read).
    step_statuses: Vec<&'static str>,
    metrics: Arc<CoordinatorMetrics>,
    /// Woken by this coordinator's loops and API after they commit transitions; the
    /// poll is the safety net for other coordinators' transitions.
    wake: Arc<tokio::sync::Notify>,
    poll: Duration,
    /// The gaps the relay waits at. A std Mutex: held only to read or change them.
    gaps: std::sync::Mutex<Gaps>,
}

impl EventRelay {
    pub(crate) fn new(
        db: Database,
        (channel, broker): (Channel, Arc<BrokerLink>),
        topology: Topology,
        selection: EventSelection,
        metrics: Arc<CoordinatorMetrics>,
        wake: Arc<tokio::sync::Notify>,
        poll: Duration,
    ) -> Self {
        EventRelay {
            db,
            channel,
            broker,
            topology,
            step_statuses: selection.step_statuses(),
            selection,
            metrics,
            wake,
            poll,
            gaps: std::sync::Mutex::default(),
        }
    }

    fn gaps(&self) -> std::sync::MutexGuard<'_, Gaps> {
        self.gaps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the relay waits at a gap now.
    fn at_gap(&self) -> bool {
        self.gaps().open.as_ref().is_some_and(|gap| !gap.passed)
    }

    /// Whether the gap after the id `before` may be passed (see the module docs); `upto`
    /// is the highest transition id this read returned.
    async fn gap_passed(
        &self,
        conn: &mut sqlx::PgConnection,
        before: i64,
        upto: i64,
    ) -> sqlx::Result<bool> {
        let open = self.gaps().open.clone().filter(|gap| before < gap.upto);
        let Some(gap) = open else {
            // First met: the transactions running now are those to wait for. A new id,
            // in a transaction of its own: this one's was taken before the read, and a
            // transaction that wrote a missing id may have begun since.
            let xid: i64 = self
                .db
                .run(async |conn| {
                    sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
                        .fetch_one(conn)
                        .await
                })
                .await?;
            self.gaps().open = Some(Gap {
                upto,
                xid,
                seen: std::time::Instant::now(),
                passed: false,
            });
            return Ok(false);
        };
        if gap.passed {
            return Ok(true);
        }
        let running: Vec<i64> = sqlx::query_scalar(
            "SELECT x::text::bigint FROM pg_snapshot_xip(pg_current_snapshot()) AS x \
             WHERE x < $1::text::xid8",
        )
        .bind(gap.xid.to_string())
        .fetch_all(conn)
        .await?;
        let mut gaps = self.gaps();
        gaps.given_up.retain(|xid| running.contains(xid));
        let waiting: Vec<i64> = running
            .into_iter()
            .filter(|xid| !gaps.given_up.contains(xid))
            .collect();
        let waited = gap.seen.elapsed();
        if !waiting.is_empty() && waited < GAP_PATIENCE {
            return Ok(false);
        }
        if !waiting.is_empty() {
            tracing::error!(after = before, waited = ?waited, transactions = ?waiting,
                "transactions open since the events relay met a gap in the transition ids are still open; moving past the gap, and not waiting for them again: if they wrote the missing ids, their events are not published");
            gaps.given_up.extend(waiting);
            let over = gaps.given_up.len().saturating_sub(GIVEN_UP_KEPT);
            gaps.given_up.drain(..over);
        }
        if let Some(open) = gaps.open.as_mut() {
            open.passed = true;
        }
        Ok(true)
    }

    /// Relay one batch. Returns how many transitions the cursor moved past.
    ///
    /// The batch, its publishing included, is bounded by the database's patience: the
    /// cursor's row stays locked until the events are confirmed. While RabbitMQ blocks
    /// the connection (a memory or disk alarm) no batch begins, so none is abandoned
    /// and published again every patience for as long as the alarm lasts. A batch that
    /// runs out of patience while its events wait for their confirms fails as the
    /// broker's error, not the database's.
    pub(crate) async fn relay_once(&self) -> anyhow::Result<usize> {
        if self.broker.blocked() {
            return Ok(0);
        }
        let publishing = AtomicBool::new(false);
        let relayed = self
            .db
            .run(async |conn| self.relay_on(conn, &publishing).await)
            .await;
        relayed.map_err(|error| {
            // Publishing makes no database errors: this one is the patience running out.
            if publishing.load(Ordering::Relaxed) && error.downcast_ref::<sqlx::Error>().is_some() {
                anyhow::anyhow!(
                    "RabbitMQ did not confirm a batch of events within {:?}",
                    self.db.patience()
                )
            } else {
                error
            }
        })
    }

    /// Relay one batch on `conn`; `publishing` is true while its events are published.
    async fn relay_on(
        &self,
        conn: &mut sqlx::PgConnection,
        publishing: &AtomicBool,
    ) -> anyhow::Result<usize> {
        let mut tx = conn
            .begin_with(tasker_shared::db::BEGIN_PLANNED_BY_KEY)
            .await?;
        let Some(cursor) = lock_cursor(&mut tx).await? else {
            return Ok(0);
        };
        let rows = transitions_after(&mut tx, cursor, BATCH, &self.step_statuses).await?;
        let mut last = cursor;
        let mut relayed = Vec::new();
        let upto = rows.last().map_or(cursor, |row| row.transition_id);
        for row in &rows {
            // The rows read skip claims, which are no events: a row's predecessor is
            // the id before it among all, not the row before it here.
            let before = row.previous.unwrap_or(cursor);
            if row.transition_id != before + 1 && !self.gap_passed(&mut tx, before, upto).await? {
                last = before;
                break;
            }
            last = row.transition_id;
            if let Some(name) = event_of(row).filter(|name| self.selection.publishes(name)) {
                relayed.push((row, name));
            }
        }
        {
            // Gaps filled or passed: the relay no longer waits.
            let mut gaps = self.gaps();
            if gaps.open.as_ref().is_some_and(|gap| last >= gap.upto) {
                gaps.open = None;
            }
        }
        if last == cursor {
            return Ok(0);
        }
        let names = if relayed.is_empty() {
            Names::default()
        } else {
            let ids = |id: fn(&RecordedTransition) -> Option<Uuid>| {
                let ids: HashSet<Uuid> = relayed.iter().filter_map(|(row, _)| id(row)).collect();
                ids.into_iter().collect::<Vec<_>>()
            };
            names_of(&mut tx, &ids(|row| row.task_id), &ids(|row| row.step_id)).await?
        };
        let events: Vec<Event<'_>> = relayed
            .into_iter()
            .filter_map(|(row, name)| to_event(row, name, &names))
            .collect();
        publishing.store(true, Ordering::Relaxed);
        self.publish(&events).await?;
        publishing.store(false, Ordering::Relaxed);
        advance_cursor(&mut tx, last).await?;
        tx.commit().await?;
        Ok((last - cursor) as usize)
    }

    async fn publish(&self, events: &[Event<'_>]) -> anyhow::Result<()> {
        let bodies = events
            .iter()
            .map(serde_json::to_vec)
            .collect::<Result<Vec<_>, _>>()?;
        let exchange = self.topology.events_exchange();
        // In order: consumers see the events as they were recorded.
        let mut publishes = Vec::with_capacity(events.len());
        for (event, body) in events.iter().zip(&bodies) {
            publishes.push(self.channel.basic_publish(
                exchange.as_str().into(),
                event.event.into(),
                BasicPublishOptions::default(),
                body,
                persistent(),
            ));
        }
        let confirms = publish_together(publishes)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        for confirmation in await_confirms(confirms).await {
            anyhow::ensure!(confirmation?.is_ack(), "the broker refused an event");
        }
        // Counted per name, then added: one look-up of each series per batch.
        let mut published: Vec<(&str, u64)> = Vec::new();
        for event in events {
            match published.iter_mut().find(|(name, _)| *name == event.event) {
                Some((_, count)) => *count += 1,
                None => published.push((event.event, 1)),
            }
        }
        for (name, count) in published {
            self.metrics
                .events_published
                .get_or_create(&crate::metrics::Event {
                    event: name.to_owned(),
                })
                .inc_by(count);
        }
        Ok(())
    }
}

impl Service for EventRelay {
    const NAME: &'static str = "event_relay";

    /// Run until `stop` is cancelled.
    async fn run(self, stop: CancellationToken) {
        let span = tracing::info_span!("event_relay");
        async move {
            tracing::info!(exchange = %self.topology.events_exchange(), events = %self.selection, "started");
            loop {
                loop {
                    match self.relay_once().await {
                        Ok(n) if (n as i64) < BATCH => break,
                        Ok(_) => continue,
                        Err(error) => {
                            // The database's failures are not the broker's: each alert
                            // names the dependency to look at.
                            if error.downcast_ref::<sqlx::Error>().is_some() {
                                self.metrics.database_errors.inc();
                            } else {
                                self.metrics.broker_errors.inc();
                            }
                            tracing::warn!(
                                error = format!("{error:#}"),
                                "relaying events failed; retrying shortly"
                            );
                            break;
                        }
                    }
                }
                // At a gap, look again soon: its transaction commits or ends.
                let poll = if self.at_gap() { GAP_RECHECK } else { self.poll };
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = self.wake.notified() => {
                        // Let a burst of commits gather into one batch.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    () = tokio::time::sleep(poll) => {}
                }
            }
        }
        .instrument(span)
        .await
    }
}

/// The event a transition is published as, if any.
fn event_of(row: &RecordedTransition) -> Option<&'static str> {
    let change = if row.schedule.is_some() {
        Ok(Change::Schedule)
    } else {
        Change::parse(
            row.step_id.is_some(),
            row.from_status.as_deref(),
            &row.to_status,
        )
    };
    match change {
        Ok(change) => event_name(change, row.reason),
        Err(error) => {
            tracing::warn!(transition_id = row.transition_id, %error, "history row not relayed");
            None
        }
    }
}

/// An event as the relay publishes it: borrowed from its history row and the batch's
/// names.
type Event<'a> = LifecycleEvent<&'a str, &'a RawValue>;

/// The event `name` about `row`, or `None` when its task, step or schedule is gone
/// (retention deletes a task with its history; the cursor moves past such a row).
fn to_event<'a>(row: &'a RecordedTransition, name: &'a str, names: &'a Names) -> Option<Event<'a>> {
    let task = row.task_id.and_then(|id| names.tasks.get(&id));
    let (namespace, task_name, version, priority) = match (task, &row.schedule) {
        (Some(task), _) => (
            task.namespace.as_str(),
            task.name.as_str(),
            task.version.as_str(),
            task.priority,
        ),
        // A fire that created no task (or whose task is gone) names its schedule's
        // template.
        (None, Some(_)) => (
            row.schedule_namespace.as_deref()?,
            row.schedule_template.as_deref()?,
            row.schedule_version.as_deref().unwrap_or_default(),
            tasker_shared::template::DEFAULT_PRIORITY,
        ),
        _ => return None,
    };
    let step_name = match row.step_id {
        Some(id) => Some(names.steps.get(&id)?.as_str()),
        None => None,
    };
    Some(LifecycleEvent {
        event: name,
        event_id: row.transition_id,
        occurred_at: row.created_at,
        task_id: row.task_id,
        namespace,
        task_name,
        version,
        priority,
        step_id: row.step_id,
        step_name,
        schedule: row.schedule.as_deref(),
        from_status: row.from_status.as_deref(),
        to_status: &row.to_status,
        reason: row.reason.as_str(),
        metadata: &row.metadata.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tasker_shared::states::TransitionReason;
    use tasker_shared::store::events::TaskNames;

    fn metadata(json: &str) -> sqlx::types::Json<Box<RawValue>> {
        sqlx::types::Json(RawValue::from_string(json.to_owned()).expect("JSON"))
    }

    fn step_row(id: i64, task_id: Uuid, step_id: Uuid, from: &str, to: &str) -> RecordedTransition {
        RecordedTransition {
            transition_id: id,
            previous: Some(id - 1),
            created_at: chrono::Utc::now(),
            task_id: Some(task_id),
            step_id: Some(step_id),
            from_status: Some(from.to_owned()),
            to_status: to.to_owned(),
            reason: TransitionReason::Succeeded,
            metadata: metadata(r#"{"attempt":1}"#),
            schedule: None,
            schedule_namespace: None,
            schedule_template: None,
            schedule_version: None,
        }
    }

    /// The namespace, name and version an event names.
    fn template<'a>(event: &Event<'a>) -> (&'a str, &'a str, &'a str) {
        (event.namespace, event.task_name, event.version)
    }

    #[test]
    fn an_event_takes_its_task_and_step_names_from_the_batch_and_a_gone_task_has_none() {
        let (task, step) = (Uuid::now_v7(), Uuid::now_v7());
        let mut names = Names::default();
        names.tasks.insert(
            task,
            TaskNames {
                namespace: "shop".into(),
                name: "checkout".into(),
                version: "2.0.0".into(),
                priority: 7,
            },
        );
        names.steps.insert(step, "charge".into());
        let row = step_row(9, task, step, "in_progress", "complete");
        let name = event_of(&row).expect("a completion is an event");
        let event = to_event(&row, name, &names).expect("its names are known");
        assert_eq!(event.event, "step.completed");
        assert_eq!(template(&event), ("shop", "checkout", "2.0.0"));
        assert_eq!(
            (event.priority, event.step_name, event.metadata.get()),
            (7, Some("charge"), r#"{"attempt":1}"#)
        );

        // A dispatch is no event; a row whose task (or step) is gone is passed over.
        assert_eq!(
            event_of(&step_row(10, task, step, "pending", "enqueued")),
            None
        );
        let gone = step_row(11, Uuid::now_v7(), step, "in_progress", "complete");
        assert!(to_event(&gone, "step.completed", &names).is_none());
        let step_gone = step_row(12, task, Uuid::now_v7(), "in_progress", "complete");
        assert!(to_event(&step_gone, "step.completed", &names).is_none());
    }

    #[test]
    fn a_fire_that_created_no_task_names_its_schedules_template() {
        let row = RecordedTransition {
            transition_id: 3,
            previous: None,
            created_at: chrono::Utc::now(),
            task_id: None,
            step_id: None,
            from_status: None,
            to_status: "skipped".into(),
            reason: TransitionReason::ScheduleSkipped,
            metadata: metadata(r#"{"outcome":"skipped"}"#),
            schedule: Some("nightly".into()),
            schedule_namespace: Some("ops".into()),
            schedule_template: Some("report".into()),
            schedule_version: Some(String::new()),
        };
        let name = event_of(&row).expect("a fire is an event");
        let names = Names::default();
        let event = to_event(&row, name, &names).expect("its schedule is known");
        assert_eq!(event.event, "schedule.skipped");
        assert_eq!(template(&event), ("ops", "report", ""));
        assert_eq!((event.priority, event.schedule), (5, Some("nightly")));
    }
}
