//! Retention: finished tasks older than `TASKER_RETENTION` are removed with their steps,
//! edges and history (`tasker_shared::store::retention`), in bounded batches, by one
//! coordinator at a time; `tasker-coordinator prune` does it once.
//!
//! The loop paces itself: after each batch it rests as long as the batch took, so
//! pruning a large backlog uses at most half of one database connection's time and the
//! dispatch path keeps the rest.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use tasker_shared::db::Database;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::CoordinatorMetrics;
use crate::service::Service;
use tasker_shared::config::DatabaseSettings;
use tasker_shared::events::EventSelection;
use tasker_shared::span::{SpanError, parse_span};
use tasker_shared::store::retention::{self, PruneScope, Pruned};

/// Tasks removed per transaction.
pub(crate) const PRUNE_BATCH: i64 = 1_000;

/// How long finished tasks are kept: a number and a unit (`s`, `m`, `h`, `d`, `w`), e.g.
/// `30d` or `12h`, at least one minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Age(TimeDelta);

impl FromStr for Age {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let age = match parse_span(text, &["s", "m", "h", "d", "w"]) {
            Ok(age) if age <= TimeDelta::days(100 * 365) => age,
            Ok(_) | Err(SpanError::TooLong) => return Err(format!("`{text}` is too long")),
            Err(SpanError::NoUnit) => {
                return Err(format!("`{text}` has no unit: write e.g. 30d, 12h or 90m"));
            }
            Err(SpanError::NotANumber) => {
                return Err(format!("`{text}` does not start with a whole number"));
            }
            Err(SpanError::UnknownUnit(unit)) => {
                return Err(format!(
                    "`{unit}` in `{text}` is not a unit: s, m, h, d or w"
                ));
            }
        };
        if age < TimeDelta::minutes(1) {
            return Err(format!("`{text}` is shorter than a minute"));
        }
        Ok(Age(age))
    }
}

impl fmt::Display for Age {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seconds = self.0.num_seconds();
        for (unit, size) in [("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60)] {
            if seconds % size == 0 {
                return write!(f, "{}{unit}", seconds / size);
            }
        }
        write!(f, "{seconds}s")
    }
}

/// `TASKER_RETENTION`: an [`Age`], or `off` to keep everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Keep every task.
    Off,
    /// Remove finished tasks older than this.
    Keep(Age),
}

impl FromStr for Retention {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim().eq_ignore_ascii_case("off") {
            Ok(Retention::Off)
        } else {
            text.parse().map(Retention::Keep)
        }
    }
}

/// Totals of one or more batches.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    batches: u64,
    pruned: Pruned,
}

impl Totals {
    fn add(&mut self, batch: Pruned) {
        self.batches += 1;
        self.pruned.tasks += batch.tasks;
        self.pruned.steps += batch.steps;
        self.pruned.edges += batch.edges;
        self.pruned.transitions += batch.transitions;
    }
}

/// The retention loop of `tasker-coordinator serve`.
pub(crate) struct RetentionLoop {
    pub(crate) db: Database,
    pub(crate) metrics: Arc<CoordinatorMetrics>,
    pub(crate) keep: Age,
    /// Keep tasks whose history the events relay has not published yet.
    pub(crate) keep_unrelayed: bool,
    /// How often to look (`TASKER_RETENTION_INTERVAL_MS`).
    pub(crate) every: Duration,
}

impl Service for RetentionLoop {
    const NAME: &'static str = "retention";

    async fn run(self, stop: CancellationToken) {
        let span = tracing::info_span!("retention", keep = %self.keep);
        async move {
            loop {
                if self.round(&stop).await {
                    break;
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(self.every) => {}
                }
            }
        }
        .instrument(span)
        .await
    }
}

impl RetentionLoop {
    /// Prune batches until none is full, another coordinator prunes, or `stop`; returns
    /// whether `stop` came.
    async fn round(&self, stop: &CancellationToken) -> bool {
        let started = Instant::now();
        let mut totals = Totals::default();
        let mut stopping = false;
        loop {
            let scope = PruneScope {
                finished_before: Utc::now() - self.keep.0,
                keep_unrelayed: self.keep_unrelayed,
            };
            let batch_started = Instant::now();
            let pruned = self
                .db
                .run(async |conn| retention::prune_batch(conn, scope, PRUNE_BATCH).await)
                .await;
            match pruned {
                Ok(Some(batch)) => {
                    self.metrics.pruned_tasks.inc_by(batch.tasks);
                    totals.add(batch);
                    if batch.tasks < PRUNE_BATCH.unsigned_abs() {
                        break;
                    }
                }
                // Another coordinator is pruning.
                Ok(None) => break,
                Err(error) => {
                    self.metrics.database_errors.inc();
                    tracing::warn!(%error, "pruning finished tasks failed; trying again next round");
                    break;
                }
            }
            tokio::select! {
                () = stop.cancelled() => {
                    stopping = true;
                    break;
                }
                () = tokio::time::sleep(batch_started.elapsed()) => {}
            }
        }
        if totals.pruned.tasks > 0 {
            tracing::info!(
                tasks = totals.pruned.tasks,
                steps = totals.pruned.steps,
                edges = totals.pruned.edges,
                transitions = totals.pruned.transitions,
                batches = totals.batches,
                seconds = started.elapsed().as_secs_f64(),
                "pruned finished tasks"
            );
        }
        stopping
    }
}

/// `tasker-coordinator prune`: remove finished tasks once, without pausing between
/// batches, and print what was removed.
#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    #[command(flatten)]
    database: DatabaseSettings,
    /// Remove tasks that finished longer ago than this (e.g. `30d`, `12h`).
    #[arg(long, value_name = "AGE")]
    older_than: Age,
    /// Count what would be removed, remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Tasks per transaction.
    #[arg(long, default_value_t = PRUNE_BATCH, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    batch_size: i64,
    /// Whether lifecycle events are on (as for `serve`): then tasks whose transitions the
    /// events relay has not passed yet are kept.
    #[arg(long, env = "TASKER_EVENTS", default_value = "true")]
    events: EventSelection,
}

impl PruneArgs {
    /// Apply migrations, then prune, or with `--dry-run` count (changing nothing: no
    /// database made, no migration applied), and print the outcome.
    ///
    /// # Errors
    ///
    /// The database's.
    pub async fn run(self) -> anyhow::Result<()> {
        if !self.dry_run {
            tasker_shared::db::migrate(&self.database).await?;
        }
        let pool = tasker_shared::db::connect_lazy(&self.database)?;
        let scope = PruneScope {
            finished_before: Utc::now() - self.older_than.0,
            keep_unrelayed: self.events.is_on(),
        };
        if self.dry_run {
            let count = retention::count_prunable(&pool, scope).await?;
            println!(
                "{count} finished tasks completed before {} would be removed (dry run)",
                scope.finished_before.to_rfc3339()
            );
            return Ok(());
        }
        let started = Instant::now();
        let mut totals = Totals::default();
        let mut waited_for_another = false;
        loop {
            match retention::prune_batch(&pool, scope, self.batch_size).await? {
                Some(batch) => {
                    totals.add(batch);
                    if batch.tasks < self.batch_size.unsigned_abs() {
                        break;
                    }
                }
                None => {
                    if !waited_for_another {
                        eprintln!("a coordinator is pruning too; taking turns with it");
                        waited_for_another = true;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let Pruned {
            tasks,
            steps,
            edges,
            transitions,
        } = totals.pruned;
        println!(
            "removed {tasks} finished tasks completed before {} ({steps} steps, {edges} edges, \
             {transitions} transitions) in {seconds:.1} s, {:.0} tasks/s",
            scope.finished_before.to_rfc3339(),
            tasks as f64 / seconds.max(1e-9)
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_operators_write_them() {
        assert_eq!("30d".parse::<Age>().unwrap().0, TimeDelta::days(30));
        assert_eq!("12h".parse::<Age>().unwrap().0, TimeDelta::hours(12));
        assert_eq!(" 2w ".parse::<Age>().unwrap().0, TimeDelta::weeks(2));
        assert_eq!("90m".parse::<Age>().unwrap().to_string(), "90m");
        assert_eq!("48h".parse::<Age>().unwrap().to_string(), "2d");
        assert_eq!("OFF".parse::<Retention>().unwrap(), Retention::Off);
        assert_eq!(
            "7d".parse::<Retention>().unwrap(),
            Retention::Keep("1w".parse().unwrap())
        );
    }

    #[test]
    fn ages_that_make_no_sense_are_refused_with_the_reason() {
        for (text, reason) in [
            ("30", "has no unit"),
            ("d", "does not start with a whole number"),
            ("30 days", "is not a unit"),
            ("30y", "is not a unit"),
            ("59s", "shorter than a minute"),
            ("0d", "shorter than a minute"),
            ("99999999999w", "too long"),
            ("-1d", "does not start with a whole number"),
        ] {
            let error = text.parse::<Age>().unwrap_err();
            assert!(error.contains(reason), "{text}: {error}");
        }
    }
}
