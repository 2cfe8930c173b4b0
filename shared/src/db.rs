//! PostgreSQL: the pool, and the migrations (embedded from the workspace's `migrations/`).

use anyhow::Context;
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use std::str::FromStr;
use std::time::Duration;

use crate::config::DatabaseSettings;

/// The schema, compiled into every binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Open a pool. Connections are made lazily, so a database that is down at start does not
/// stop the process: `/health/ready` reports it and work resumes when it is back.
pub fn connect_lazy(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    connect_lazy_with(settings, &[])
}

/// The setting (`tasker.max_gathered_bytes`) that tells Tasker's statements how many bytes
/// of JSON a step completed with the results of others may hold (see
/// `fan_out/gather.sql`); a coordinator sets it to its `TASKER_MAX_STEP_MESSAGE_BYTES`.
pub const MAX_GATHERED_BYTES: &str = "tasker.max_gathered_bytes";

/// [`connect_lazy`], with `settings` of Tasker's own (such as [`MAX_GATHERED_BYTES`]) set
/// on every connection.
pub fn connect_lazy_with(
    settings: &DatabaseSettings,
    tasker_settings: &[(&str, String)],
) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(settings.database_url.expose())
        .with_context(|| format!("invalid DATABASE_URL {}", settings.database_url))?
        .application_name("tasker")
        // Plan every execution with its real parameters. Tasker's statements are
        // prepared once per connection, often when the tables are still empty; a generic
        // plan cached then (estimating a handful of rows) turns into minutes-long nested
        // loops once the tables hold tens of thousands of rows. Measured with
        // tasker-bench: claims stuck for minutes with the default `auto`.
        //
        // No JIT compilation: Tasker's statements touch a few hundred rows by key, where
        // compiling costs more than it saves. Over-estimated row counts (statistics not
        // yet gathered, `unnest` of a batch) crossed `jit_above_cost` and spent 25-30 ms
        // compiling statements that ran in 5-10 ms (BENCHMARKS.md).
        //
        // A connection left idle inside a transaction (its process paused or cut off)
        // is ended by PostgreSQL after the configured time, releasing its row locks.
        .options([
            ("plan_cache_mode", "force_custom_plan".to_string()),
            ("jit", "off".to_string()),
            (
                "idle_in_transaction_session_timeout",
                settings.db_idle_in_transaction_timeout_ms.to_string(),
            ),
        ])
        .options(tasker_settings.iter().cloned());
    let patience = Duration::from_millis(settings.db_answer_timeout_ms);
    Ok(PgPoolOptions::new()
        .max_connections(settings.db_pool_size)
        .acquire_timeout(Duration::from_secs(10))
        .after_release(move |conn, _| Box::pin(finish_answer(conn, patience)))
        .after_connect(|conn, _| {
            Box::pin(async move {
                // A startup option, unknown to PostgreSQL 13, would refuse the connection.
                if conn.server_version_num().is_some_and(|v| v >= 140_000) {
                    let set = format!(
                        "SET client_connection_check_interval = {CLIENT_CHECK_INTERVAL_MS}"
                    );
                    sqlx::raw_sql(sqlx::AssertSqlSafe(set))
                        .execute(conn)
                        .await?;
                }
                Ok(())
            })
        })
        .connect_lazy_with(options))
}

/// Before a connection goes back to the pool: wait, at most `patience`, for the answers to
/// what was sent on it. Work dropped before its answer came (a request whose client left,
/// work given up past its patience) returns its connection still owed that answer, and
/// the driver's own check of a returned connection waits for it without a bound: on a
/// host that vanished, until TCP gives up (about 15 minutes with Linux's default
/// `tcp_retries2`), the connection holding its place in the pool all the while. Past
/// `patience` the connection is closed instead (the error makes the pool close it without
/// a goodbye, which could wait too). A connection owed nothing is done with at once: no
/// round trip is added to the driver's check, which follows without a bound (a host that
/// vanishes just then still holds the connection until TCP gives up).
async fn finish_answer(conn: &mut sqlx::PgConnection, patience: Duration) -> sqlx::Result<bool> {
    use sqlx::Connection;
    // `flush` is the driver's wait for the answers outstanding (`wait_until_ready`).
    match tokio::time::timeout(patience, conn.flush()).await {
        Ok(answered) => answered.map(|()| true),
        Err(_) => Err(unanswered(
            patience,
            " what was sent for work given up on; the connection is closed",
        )),
    }
}

/// PostgreSQL as a coordinator uses it: the pool, and how long each piece of its work (a
/// loop's pass, an API request's read or write) waits for an answer.
///
/// TCP tells nothing when the database's host vanishes without closing its sockets (a
/// failover that moves its address, a dropped NAT mapping, a host cut off), and the driver
/// sets no keepalive: a statement already sent then waits for ever for its answer, and the
/// loop or request that sent it with it. [`Database::run`] bounds a piece of work on one
/// connection, [`Database::bounded`] one that takes its connections from the pool; past
/// the patience the work is abandoned, and a connection left waiting for its answer is
/// closed rather than used again (its next user would wait on it too).
#[derive(Debug, Clone)]
pub struct Database {
    pool: PgPool,
    patience: Duration,
}

impl Database {
    /// `pool`, whose work waits at most `patience` for PostgreSQL.
    pub fn new(pool: PgPool, patience: Duration) -> Self {
        Database { pool, patience }
    }

    /// How long work waits for PostgreSQL.
    pub fn patience(&self) -> Duration {
        self.patience
    }

    /// The pool, for work bounded otherwise: the reads a piece of work makes beside its
    /// own connection (bounded with it), a batch of task creations and start-up's reads
    /// (each bounded by a timeout of its own). A
    /// connection such work held when it was dropped goes back to the pool, which waits
    /// at most the patience for the answer owed to it.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Run `work` on a connection of the pool, waiting at most the patience for it; past
    /// it, an I/O error of kind `TimedOut` that says so, and the connection is closed.
    /// Work that ends on its own, with an error or not, returns its connection to the pool.
    ///
    /// # Errors
    ///
    /// No connection to be had (the pool's acquire timeout), `work`'s own, or no answer
    /// in time.
    pub async fn run<T, E: From<sqlx::Error>>(
        &self,
        work: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut held = Held {
            conn: self.pool.acquire().await?,
            done: false,
        };
        let answered = tokio::time::timeout(self.patience, work(&mut held.conn)).await;
        held.done = answered.is_ok();
        answered.unwrap_or_else(|_| {
            Err(unanswered(
                self.patience,
                " (or, for work that publishes inside its transaction, RabbitMQ did not \
                 confirm); the connection is closed",
            )
            .into())
        })
    }

    /// Wait at most the patience for `work`, which takes its connections from the pool
    /// itself (an API request's reads and writes), the wait for them included; past it,
    /// an I/O error of kind `TimedOut` as [`run`](Self::run)'s, and `work` is dropped. A connection it held goes back to the
    /// pool, which waits at most the patience again for the answer owed to it and
    /// otherwise closes it.
    ///
    /// # Errors
    ///
    /// `work`'s own, or no answer in time.
    pub async fn bounded<'a, T, E: From<sqlx::Error>, W>(
        &'a self,
        work: impl FnOnce(&'a PgPool) -> W,
    ) -> Result<T, E>
    where
        W: Future<Output = Result<T, E>> + 'a,
    {
        tokio::time::timeout(self.patience, work(&self.pool))
            .await
            .unwrap_or_else(|_| {
                Err(unanswered(
                    self.patience,
                    " (a connection from the pool included); the work is given up",
                )
                .into())
            })
    }
}

/// The error of work PostgreSQL did not answer within `patience` (`then` says what
/// follows): an I/O error of kind `TimedOut`, which [`unreachable`] counts.
fn unanswered(patience: Duration, then: &str) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("PostgreSQL did not answer within {patience:?}{then}"),
    ))
}

/// A connection [`Database::run`] works on: closed when dropped before its work ended
/// (past the patience, or given up by whoever awaited the run), not returned to the
/// pool. An answer may still come to it (a statement slow, not lost), and sqlx would
/// wait on a returned connection for it, without a bound, before its next use.
struct Held {
    conn: sqlx::pool::PoolConnection<Postgres>,
    done: bool,
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.done {
            self.conn.close_on_drop();
        }
    }
}

/// How often a PostgreSQL backend running a statement for Tasker checks that its client
/// is still there (`client_connection_check_interval`, PostgreSQL 14 and later): a
/// statement [`Database::run`] gave up on ends soon after its connection is closed,
/// instead of running on (or waiting on a lock) and holding a server connection and the
/// rows it locked while the work is tried again beside it.
const CLIENT_CHECK_INTERVAL_MS: u32 = 2_000;

/// A `BEGIN` (for `begin_with`) whose transaction plans its statements once per
/// connection, as index probes whatever the tables' statistics say: what the claim
/// function does for its own statements (migration 0011), for a transaction of
/// statements that each touch rows by key (a batch of results, the events relay's read).
/// The pool plans every execution anew (`force_custom_plan`, above), which for these
/// statements cost more than running them (BENCHMARKS.md); a plan for index probes is
/// right at every table size. One round trip, as a plain `BEGIN`.
pub const BEGIN_PLANNED_BY_KEY: &str = "BEGIN; \
    SET LOCAL plan_cache_mode = force_generic_plan; \
    SET LOCAL enable_seqscan = off; \
    SET LOCAL enable_hashjoin = off; \
    SET LOCAL enable_mergejoin = off";

/// Create the database if it is missing, then apply every pending migration.
pub async fn migrate(settings: &DatabaseSettings) -> anyhow::Result<()> {
    let url = settings.database_url.expose();
    if !database_exists(url)
        .await
        .with_context(|| format!("cannot reach PostgreSQL at {}", settings.database_url))?
    {
        tracing::info!(database = %settings.database_url, "creating database");
        if let Err(error) = Postgres::create_database(url).await {
            // Another process may have created it a moment ago.
            if !database_exists(url).await.unwrap_or(false) {
                return Err(error).context("creating the database");
            }
        }
    }
    let pool = connect_lazy(settings)?;
    MIGRATOR.run(&pool).await.context("applying migrations")?;
    pool.close().await;
    Ok(())
}

/// How long the start-up's first connection may take.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

/// Whether the database of `url` exists, asked of that database: a role may be allowed to
/// connect to its own database only (no CONNECT on `postgres`, a pooler that knows one
/// database), where sqlx's own check connects to `postgres`. Only a missing one
/// (`3D000`) is created, through the server's maintenance database.
async fn database_exists(url: &str) -> anyhow::Result<bool> {
    use sqlx::Connection;
    // A server (or a pooler in front of it) that takes the socket and never answers must
    // not hold a start-up for ever: the process exits, and its supervisor starts it again.
    let connected = tokio::time::timeout(CONNECT_PATIENCE, sqlx::PgConnection::connect(url))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {CONNECT_PATIENCE:?}"))?;
    match connected {
        Ok(connection) => {
            let _ = tokio::time::timeout(CONNECT_PATIENCE, connection.close()).await;
            Ok(true)
        }
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("3D000") => Ok(false),
        Err(error) => Err(error.into()),
    }
}

/// Whether `error` says the database could not be reached (no connection from the pool
/// in time, the pool closed, the connection broken), rather than that it refused
/// something.
pub fn unreachable(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)
    )
}
