//! Task creations written in batches.
//!
//! Each `POST /v1/tasks` hands its [`Creation`] to the [`TaskCreator`], which writes the
//! creations waiting at that moment with one statement (`tasks::create_many`): one round
//! trip and one commit for the batch. One batch is written at a time; creations arriving
//! meanwhile wait and leave together in the next. A second batch starts beside the first
//! only once the first has run for [`PATIENCE`] (a batch waiting on a lock). So an idle
//! coordinator writes each creation alone, at once, and a busy one writes more per
//! statement the busier it is, without a timer adding latency.
//!
//! A batch is all or nothing. When its statement fails (a template's versions changed,
//! `TK001`, or any other error), each creation is written again on its own with
//! `tasks::create`, which answers for that creation alone; but when the database could
//! not be reached, each is answered with that error at once.
//!
//! The batching loop and each batch's write are tasks on the application's tracker; the
//! loop ends once the API has answered its last request and [`TaskCreator::close`] is
//! called, after handing over the creations still waiting.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use sqlx::PgPool;
use tasker_shared::db::Database;
use tasker_shared::store::tasks::{self, Created, Creation};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Batches written at once: each holds a database connection while it runs. Two, so
/// that a batch waiting on a lock (an idempotency key another transaction is inserting)
/// does not hold up every creation; but the second starts only once the first has run
/// for [`PATIENCE`]. Two side by side at all times wrote 4.3 tasks per statement in the
/// benchmark, one at a time 7.5, for about a tenth less of PostgreSQL's CPU per diamond
/// step (BENCHMARKS.md).
pub(crate) const BATCHES_IN_FLIGHT: usize = 2;
/// How long a batch is written alone before a second may start beside it: far longer
/// than a batch takes (a few milliseconds), far shorter than a request's patience.
pub(crate) const PATIENCE: Duration = Duration::from_millis(20);
/// The most creations one statement writes.
pub(crate) const MAX_BATCH: usize = 64;

struct Job {
    creation: Creation,
    reply: oneshot::Sender<sqlx::Result<Created>>,
    /// Its place among the admitted creations, given back once it is written: a request
    /// that goes away (a client's time-out) leaves its creation to be written, and it
    /// still counts against the limit until then.
    admitted: OwnedSemaphorePermit,
}

/// Hands creations to the batching loop and waits for their outcome.
#[derive(Clone)]
pub(crate) struct TaskCreator {
    jobs: mpsc::UnboundedSender<Job>,
    /// Creations admitted at once (`TASKER_MAX_PENDING_CREATES`): the bound on what the
    /// channel above holds.
    admitted: Arc<Semaphore>,
    limit: u32,
    /// Cancelled by [`close`](TaskCreator::close): the batching loop ends.
    closed: CancellationToken,
}

/// Why a creation was not written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CreateError {
    /// More creations are waiting than `TASKER_MAX_PENDING_CREATES` allows.
    #[error("{limit} task creations are already waiting to be written")]
    Overloaded { limit: u32 },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl TaskCreator {
    /// Start the loop that writes the batches, on `tasks` (it ends when every
    /// `TaskCreator` is gone, or at [`close`](Self::close)).
    /// `batch_size` observes how many creations each statement writes.
    /// At most `limit` creations are admitted at once (see [`CreateError::Overloaded`]).
    pub(crate) fn start(
        db: Database,
        batch_size: Histogram,
        limit: u32,
        tasks: &TaskTracker,
    ) -> Self {
        let (jobs, receiver) = mpsc::unbounded_channel();
        let closed = CancellationToken::new();
        tasks.spawn(gather(
            db,
            receiver,
            batch_size,
            tasks.clone(),
            closed.clone(),
        ));
        TaskCreator {
            jobs,
            admitted: Arc::new(Semaphore::new(limit as usize)),
            limit,
            closed,
        }
    }

    /// No more creations come (the API has answered its last request): write the ones
    /// waiting and end the batching loop. A later [`create`](Self::create) fails.
    pub(crate) fn close(&self) {
        self.closed.cancel();
    }

    /// Write `creation`, with whatever other creations wait at the same time; refused at
    /// once when `limit` creations are already admitted.
    pub(crate) async fn create(&self, creation: Creation) -> Result<Created, CreateError> {
        let Ok(admitted) = self.admitted.clone().try_acquire_owned() else {
            return Err(CreateError::Overloaded { limit: self.limit });
        };
        let (reply, outcome) = oneshot::channel();
        self.jobs
            .send(Job {
                creation,
                reply,
                admitted,
            })
            .map_err(|_| sqlx::Error::PoolClosed)?;
        Ok(outcome.await.map_err(|_| sqlx::Error::PoolClosed)??)
    }
}

/// Take the creations waiting whenever a batch may start, and write them, each batch a
/// task on `tasks`, until `closed` and nothing waits. A batch may start when no other is
/// written, or when the one written has run for [`PATIENCE`].
async fn gather(
    db: Database,
    mut receiver: mpsc::UnboundedReceiver<Job>,
    batch_size: Histogram,
    tasks: TaskTracker,
    closed: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    // When each batch being written started, by batch number. A std Mutex: held only to
    // read or change the list, never across an await.
    let running: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    for batch in 0.. {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let oldest = lock_running(&running)
            .iter()
            .map(|(_, started)| *started)
            .min();
        if let Some(started) = oldest {
            // Until that batch ends (its slot comes free) or has run its patience.
            let deadline = tokio::time::Instant::from_std(started + PATIENCE);
            let _ = tokio::time::timeout_at(deadline, slots.acquire()).await;
        }
        let mut jobs = Vec::new();
        let received = tokio::select! {
            // Creations already waiting go out before the loop ends.
            biased;
            received = receiver.recv_many(&mut jobs, MAX_BATCH) => received,
            () = closed.cancelled() => 0,
        };
        if received == 0 {
            return;
        }
        let (db, batch_size, running) = (db.clone(), batch_size.clone(), running.clone());
        lock_running(&running).push((batch, Instant::now()));
        tasks.spawn(async move {
            // A batch whose answer never comes (its database host vanished) must not hold
            // its slot, and with enough of them every creation, for ever: its requests are
            // answered 503 (their replies dropped), as when the database is unreachable.
            // Whether it was written is unknown; an idempotency key makes a retry safe.
            // The pool closes the connection it held unless the answer comes within the
            // patience again (`tasker_shared::db`).
            let patience = db.patience();
            if tokio::time::timeout(patience, write(db.pool(), jobs, &batch_size))
                .await
                .is_err()
            {
                tracing::warn!(
                    ?patience,
                    "PostgreSQL did not answer a batch of creations in time"
                );
            }
            lock_running(&running).retain(|(b, _)| *b != batch);
            drop(slot);
        });
    }
}

fn lock_running(
    running: &Mutex<Vec<(u64, Instant)>>,
) -> std::sync::MutexGuard<'_, Vec<(u64, Instant)>> {
    running
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn write(pool: &PgPool, jobs: Vec<Job>, batch_size: &Histogram) {
    let mut creations = Vec::with_capacity(jobs.len());
    let mut replies = Vec::with_capacity(jobs.len());
    for job in jobs {
        creations.push(job.creation);
        // Each permit goes with its reply: given back once its creation is answered.
        replies.push((job.reply, job.admitted));
    }
    if creations.len() > 1 {
        match tasks::create_many(pool, &creations).await {
            Ok(outcomes) => {
                batch_size.observe(creations.len() as f64);
                for ((reply, _admitted), outcome) in replies.into_iter().zip(outcomes) {
                    // The request may have gone; its task stays created.
                    let _ = reply.send(outcome);
                }
                return;
            }
            Err(error) => {
                // No connection to be had: each alone would wait as long again, one
                // after the other, while every creation behind them waits too.
                if tasker_shared::db::unreachable(&error) {
                    tracing::warn!(%error, creations = creations.len(),
                        "the database is not reachable; a batch of creations refused");
                    // Each is answered as the database's absence is (503).
                    for (reply, _admitted) in replies {
                        let _ = reply.send(Err(sqlx::Error::PoolTimedOut));
                    }
                    return;
                }
                tracing::debug!(
                    %error,
                    creations = creations.len(),
                    "batch of creations refused; writing each on its own"
                );
            }
        }
    }
    for (creation, (reply, _admitted)) in creations.iter().zip(replies) {
        batch_size.observe(1.0);
        let _ = reply.send(tasks::create(pool, creation).await);
    }
}
