//! `tasker-bench`: Tasker's benchmark. Measures, against the configured PostgreSQL and
//! RabbitMQ, the raw ceilings of this machine (durable broker round trips, batched
//! PostgreSQL step writes) and what Tasker does with them: throughput over many diamonds
//! and chains, latency per stage of a long chain, a diamond's end-to-end latency when
//! idle, ready-to-started latency, database statements per step, the idle cost, the
//! processes' peak memory and CPU time, and throughput with a large stored history.
//!
//! Last, the burst workload (`--burst N`, 0 skips it): the coordinators are restarted
//! with a dispatch lease much shorter than the drain (`--burst-lease-ms`), N diamonds are
//! created at once (every submitter busy, no pacing), and the run reports the creation
//! and drain times, steps/s against the steady diamonds figure of the same run, the
//! re-dispatches (`tasker_leases_expired_total` by reason, `lease_expired` aside), the
//! stale results dropped (goal: at most 0.1 % of the steps), each process's peak memory
//! and the deepest the step queue got.
//!
//! After it, retention (`--prune N`, 0 skips it): N finished diamonds 40 days old are
//! stored, the diamonds' throughput is measured while the coordinators' retention loop
//! prunes them and without, with the loop's prune rate, then `tasker-coordinator prune`
//! alone on N more.
//!
//! Build in release first: `cargo build --release --workspace --bins`, then run
//! `target/release/tasker-bench` (see BENCHMARKS.md). It uses its own database
//! (`tasker_bench`, recreated) and queue prefix (`bench`).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::migrate::MigrateDatabase;
use tasker_tests::{Process, binary, delete_broker_objects};
use tokio::process::Command;
use uuid::Uuid;

#[derive(Parser, Clone)]
#[command(about = "Tasker's benchmark: prints the figures BENCHMARKS.md quotes")]
struct Args {
    /// Diamond tasks (4 steps each) for the throughput run.
    #[arg(long, default_value_t = 10_000)]
    diamonds: usize,
    /// After the diamonds: as many diamonds again with a concurrency limit of 2 on every
    /// step, keyed by task over this many keys (0 skips the run).
    #[arg(long, default_value_t = 1_000)]
    limit_keys: usize,
    /// After the diamonds: one task whose step fans out (`for_each`) over this many no-op
    /// instances, then fans in, against the diamonds' steps/s (0 skips the run).
    #[arg(long, default_value_t = 10_000)]
    fan_out: usize,
    /// After the idle measure: this many schedules none of which is due, the idle
    /// statements again, then one schedule firing every second for `schedule_seconds`,
    /// its fire-to-task lateness (0 skips it).
    #[arg(long, default_value_t = 1_000)]
    schedules: usize,
    /// How long the every-second schedule fires, in seconds.
    #[arg(long, default_value_t = 30)]
    schedule_seconds: u64,
    /// Linear chains for the second throughput run (0 skips it).
    #[arg(long, default_value_t = 1_000)]
    chains: usize,
    /// Steps per chain in that run.
    #[arg(long, default_value_t = 10)]
    chain_length: usize,
    /// Steps of the long chain timed end to end.
    #[arg(long, default_value_t = 40)]
    long_chain: usize,
    /// Completed tasks stored before the history run (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    stored: usize,
    /// Last of all: store this many finished diamonds 40 days old, then measure the
    /// diamonds' throughput while the coordinators' retention loop (`TASKER_RETENTION=30d`)
    /// prunes them against without, the loop's prune rate, and `tasker-coordinator
    /// prune`'s alone on as many again (0 skips it).
    #[arg(long, default_value_t = 0)]
    prune: usize,
    /// Coordinator processes.
    #[arg(long, default_value_t = 1)]
    coordinators: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Steps each worker runs at once.
    #[arg(long, default_value_t = 64)]
    concurrency: u16,
    /// Concurrent task-creation requests while submitting.
    #[arg(long, default_value_t = 16)]
    submitters: usize,
    /// Publish lifecycle events during the runs (`TASKER_EVENTS`; on, as shipped):
    /// `--events false` turns them off.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    events: bool,
    /// With events on, run the diamonds once more with them off and print the difference:
    /// what the events cost.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    events_cost: bool,
    /// With the events' cost measured, run the diamonds once more publishing only the
    /// events these routing-key patterns match (`TASKER_EVENTS=task.*`) and print what
    /// they cost.
    #[arg(long, value_name = "PATTERNS")]
    events_only: Option<String>,
    /// Soak instead of the standard runs: push this many diamond tasks through in rounds
    /// and print every process's resident memory after each round.
    #[arg(long, default_value_t = 0)]
    soak: usize,
    /// Tasks per soak round.
    #[arg(long, default_value_t = 5_000)]
    soak_round: usize,
    /// Diamond tasks created at once after the standard runs, on coordinators restarted
    /// with a short dispatch lease (0 skips the burst).
    #[arg(long, default_value_t = 20_000)]
    burst: usize,
    /// `TASKER_DISPATCH_LEASE_MS` of the coordinators during the burst: much shorter than
    /// the drain, so steps wait in the queue past their lease.
    #[arg(long, default_value_t = 5_000)]
    burst_lease_ms: u64,
    /// PostgreSQL server (the benchmark creates its own database there).
    #[arg(
        long,
        env = "TASKER_TEST_POSTGRES",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    postgres: String,
    /// RabbitMQ.
    #[arg(long, env = "AMQP_URL", default_value = tasker_shared::config::DEFAULT_AMQP_URL)]
    amqp_url: String,
}

const PREFIX: &str = "bench";

/// The fan-out's list is built from a context list this long, repeated: a list of
/// 10,000 in the context would ride in every instance's message.
const FAN_OUT_PART: usize = 100;

/// The fan-out template: a first step over `n` elements (the context's list repeated,
/// the last part cut short), then a step after it.
fn fan_out(n: usize) -> String {
    let part = FAN_OUT_PART.min(n.max(1));
    let mut terms = vec!["context.l"; n / part];
    let rest = n % part;
    let rest_term = format!("context.l.filter(x, x < {rest})");
    if rest > 0 {
        terms.push(&rest_term);
    }
    format!(
        "namespace: bench\nname: fan_out\nsteps:\n  - {{name: items, handler: tasker.noop, for_each: \"{}\"}}\n  - {{name: after, handler: tasker.noop, depends_on: [items]}}\n",
        terms.join(" + ")
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "# tasker-bench  ({} coordinator(s), {} worker(s) × {} concurrency, events {})",
        args.coordinators,
        args.workers,
        args.concurrency,
        if args.events { "on" } else { "off" }
    );

    let broker = broker_ceiling(&args.amqp_url, 20_000).await?;
    let database_url = format!("{}/tasker_bench", args.postgres);
    let _ = sqlx::Postgres::force_drop_database(&database_url).await;
    sqlx::Postgres::create_database(&database_url).await?;
    let pool = PgPool::connect(&database_url).await?;
    let postgres = postgres_ceiling(&pool, 20_000).await?;
    println!(
        "ceiling  broker durable round trips      {broker:>9.0} /s  (publish+confirm, consume, ack)"
    );
    println!(
        "ceiling  batched PostgreSQL step writes  {postgres:>9.0} /s  (update + audit row, batches of 100)"
    );
    println!(
        "ceiling  steps/s the broker allows       {:>9.0} /s  (two durable messages per step)",
        broker / 2.0
    );
    drop(pool);
    let _ = sqlx::Postgres::force_drop_database(&database_url).await;

    let mut system = System::start(&args, &database_url).await?;
    system.register_templates(&args).await?;
    if system.autovacuum_off().await? {
        println!(
            "warning  autovacuum is off on this server: each run leaves dead row versions to the next (the soak and the burst vacuum first)"
        );
    }
    if args.soak > 0 {
        system.soak(args.soak, args.soak_round.max(1)).await?;
        system.stop().await?;
        return Ok(());
    }

    // Idle latencies first, on a quiet system.
    let diamond = system.sequential("diamond", 50).await?;
    println!(
        "latency  diamond end to end, idle        p50 {:>6.1} ms   p99 {:>6.1} ms   (50 in a row)",
        percentile(&diamond, 0.5),
        percentile(&diamond, 0.99)
    );
    let long = system.sequential("long_chain", 3).await?;
    let long_ms = percentile(&long, 0.5);
    println!(
        "latency  {}-step chain end to end        {:>6.1} ms   = {:.1} ms per stage",
        args.long_chain,
        long_ms,
        long_ms / args.long_chain as f64
    );

    let idle = system.idle_statements(Duration::from_secs(20)).await?;
    println!("idle     coordinator statements          {idle:>9.2} /s  (over 20 s, nothing to do)");

    if args.schedules > 0 {
        system.idle_schedules(args.schedules).await?;
        let idle = system.idle_statements(Duration::from_secs(20)).await?;
        println!(
            "idle     coordinator statements          {idle:>9.2} /s  (over 20 s, {} schedules none of which is due)",
            args.schedules
        );
        let lateness = system
            .schedule_lateness(Duration::from_secs(args.schedule_seconds))
            .await?;
        println!(
            "latency  schedule fire time → task      p50 {:>6.1} ms   p99 {:>6.1} ms   max {:>6.1} ms   ({} fires, one a second)",
            percentile(&lateness, 0.5),
            percentile(&lateness, 0.99),
            percentile(&lateness, 1.0),
            lateness.len()
        );
    }

    let run = system.throughput("diamond", args.diamonds, 4, None).await?;
    run.print("diamonds", broker);
    if args.events && args.events_cost {
        system
            .restart_coordinators("coordinator-no-events", &[("TASKER_EVENTS", "false")])
            .await?;
        // The run above left its dead row versions: without them, as it found the tables.
        system.vacuum().await?;
        let mut quiet = system.throughput("diamond", args.diamonds, 4, None).await?;
        quiet.events_behind = None;
        quiet.print("diamonds, lifecycle events off", broker);
        // Nobody wanted this run's events: the relay starts after them, as the runs
        // below would otherwise carry their burst.
        system.relay_from_now().await?;
        let cost = |with: &Run| {
            format!(
                "steps/s {:+.1} %, CPU µs per step {:+.0} ({:+.1} %)",
                (with.steps_per_s / quiet.steps_per_s - 1.0) * 100.0,
                with.cpu_per_step() - quiet.cpu_per_step(),
                (with.cpu_per_step() / quiet.cpu_per_step() - 1.0) * 100.0
            )
        };
        println!("events   cost of lifecycle events: {}", cost(&run));
        if let Some(patterns) = &args.events_only {
            system
                .restart_coordinators("coordinator-some-events", &[("TASKER_EVENTS", patterns)])
                .await?;
            system.vacuum().await?;
            let some = system.throughput("diamond", args.diamonds, 4, None).await?;
            some.print(&format!("diamonds, only the events {patterns}"), broker);
            println!(
                "events   cost of the events {patterns} alone: {}",
                cost(&some)
            );
            system.relay_from_now().await?;
        }
        system.restart_coordinators("coordinator", &[]).await?;
    }
    let max_tasks_per_s = run.steps_per_s / 4.0;
    if args.limit_keys > 0 {
        let limited = system
            .throughput("limited_diamond", args.diamonds, 4, None)
            .await?;
        limited.print(
            &format!(
                "diamonds, every step limited to 2 at once per key ({} keys)",
                args.limit_keys
            ),
            broker,
        );
        println!(
            "         against the unlimited diamonds  {:>9.2}",
            limited.steps_per_s / run.steps_per_s
        );
    }
    if args.fan_out > 0 {
        // The instances and the step after them run on workers; the fanned-out step
        // itself does not.
        let fan = system
            .throughput("fan_out", 1, args.fan_out + 1, None)
            .await?;
        fan.print(
            &format!(
                "one fan-out of {} no-op instances, then a fan-in",
                args.fan_out
            ),
            broker,
        );
        println!(
            "         against the diamonds            {:>9.2}",
            fan.steps_per_s / run.steps_per_s
        );
    }
    let half = system
        .throughput(
            "diamond",
            (args.diamonds / 4).max(100),
            4,
            Some(max_tasks_per_s / 2.0),
        )
        .await?;
    println!(
        "latency  ready→started at half throughput p50 {:>6.1} ms   p99 {:>6.1} ms   ({:.0} steps/s offered)",
        half.ready_to_started_p50_ms, half.ready_to_started_p99_ms, half.steps_per_s
    );
    if args.chains > 0 {
        let chains = system
            .throughput("chain", args.chains, args.chain_length, None)
            .await?;
        chains.print(&format!("chains of {}", args.chain_length), broker);
    }

    if args.stored > 0 {
        let started = Instant::now();
        system.store_history(args.stored, "1 day").await?;
        println!(
            "history  stored {} completed diamonds    in {:.1} s",
            args.stored,
            started.elapsed().as_secs_f64()
        );
        let with_history = system.throughput("diamond", args.diamonds, 4, None).await?;
        with_history.print("diamonds, with history", broker);
        println!(
            "history  throughput with history / without  {:>6.2}",
            with_history.steps_per_s / run.steps_per_s
        );
        system.history_timings().await?;
    }

    let duplicates = system.duplicate_dispatches().await?;
    println!("safety   step attempts dispatched twice   {duplicates:>9}");
    system.print_resources();

    // Last: re-dispatching a step whose lease ran out dispatches its attempt again, so
    // the safety count above is taken before.
    if args.burst > 0 {
        system
            .burst(args.burst, args.burst_lease_ms, run.steps_per_s)
            .await?;
    }
    if args.prune > 0 {
        system.prune(args.prune, args.diamonds, broker).await?;
    }
    system.stop().await?;
    Ok(())
}

/// Durable round trips per second: publish persistent messages with confirms (at most
/// 1,000 unconfirmed), consume them with manual acks.
async fn broker_ceiling(url: &str, messages: usize) -> anyhow::Result<f64> {
    let connection =
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let publisher = tasker_shared::broker::confirm_channel(&connection).await?;
    let consumer_channel = connection.create_channel().await?;
    let queue = format!("bench.ceiling.{}", Uuid::new_v4().simple());
    publisher
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?;
    consumer_channel
        .basic_qos(1_000, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await?;
    let started = Instant::now();
    let consuming = tokio::spawn(async move {
        let mut received = 0;
        while received < messages {
            let Some(Ok(delivery)) = consumer.next().await else {
                break;
            };
            delivery.acker.ack(BasicAckOptions::default()).await?;
            received += 1;
        }
        anyhow::Ok(received)
    });
    let mut pending = VecDeque::new();
    for n in 0..messages {
        let body = format!("{{\"n\": {n}, \"padding\": \"{}\"}}", "x".repeat(400));
        pending.push_back(
            publisher
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    tasker_shared::broker::persistent(),
                )
                .await?,
        );
        if pending.len() >= 1_000 {
            pending.pop_front().context("confirm")?.await?;
        }
    }
    for confirm in pending {
        confirm.await?;
    }
    let received = consuming.await??;
    let rate = received as f64 / started.elapsed().as_secs_f64();
    publisher
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    let _ = connection.close(200, "OK".into()).await;
    Ok(rate)
}

/// Step writes per second as Tasker makes them: update a row and append an audit row,
/// 100 steps per transaction.
async fn postgres_ceiling(pool: &PgPool, rows: i64) -> anyhow::Result<f64> {
    sqlx::query("CREATE TABLE bench_steps (id BIGINT PRIMARY KEY, status TEXT NOT NULL, attempts INT NOT NULL, results JSONB, updated_at TIMESTAMPTZ)")
        .execute(pool).await?;
    sqlx::query("CREATE TABLE bench_audit (id BIGSERIAL PRIMARY KEY, step_id BIGINT NOT NULL, to_status TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        .execute(pool).await?;
    sqlx::query(
        "INSERT INTO bench_steps SELECT g, 'pending', 0, NULL, now() FROM generate_series(1, $1) g",
    )
    .bind(rows)
    .execute(pool)
    .await?;
    let started = Instant::now();
    for batch in 0..rows / 100 {
        let ids: Vec<i64> = (batch * 100 + 1..=batch * 100 + 100).collect();
        let mut tx = pool.begin().await?;
        sqlx::query("UPDATE bench_steps SET status = 'complete', attempts = attempts + 1, results = '{}', updated_at = now() WHERE id = ANY($1)")
            .bind(&ids).execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO bench_audit (step_id, to_status) SELECT unnest($1::bigint[]), 'complete'",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

struct System {
    pool: PgPool,
    http: reqwest::Client,
    bases: Vec<String>,
    coordinators: Vec<Process>,
    workers: Vec<Process>,
    /// Each worker's `/metrics` URL.
    worker_metrics: Vec<String>,
    submitters: usize,
    /// What started the coordinators, to start them again.
    args: Args,
    database_url: String,
    log_dir: PathBuf,
}

/// Counters of the burst, summed over the coordinators, from one scrape of each.
#[derive(Default)]
struct BurstCounts {
    /// `tasker_leases_expired_total` by `reason`, every reason but `lease_expired` (a lost
    /// worker): each is a step dispatched again without having run.
    redispatches: BTreeMap<String, f64>,
    /// `tasker_stale_results_dropped_total`, every label set.
    stale: f64,
}

/// Counters the coordinators export, summed over them.
#[derive(Default)]
struct Counts {
    /// `tasker_db_statements_total`.
    statements: f64,
    /// Tasks written by creating statements (`tasker_create_batch_size_sum`).
    creations: f64,
    /// Creating statements (`tasker_create_batch_size_count`).
    creating_statements: f64,
    /// Results the workers published (`tasker_worker_result_batch_size_sum`).
    results: f64,
    /// Messages they published them in (`tasker_worker_result_batch_size_count`).
    result_messages: f64,
    /// Steps the coordinators published (`tasker_step_message_batch_size_sum`).
    steps_published: f64,
    /// Step messages they published them in (`tasker_step_message_batch_size_count`).
    step_messages: f64,
}

/// One sample without labels, by name, from a `/metrics` page.
fn sample(text: &str, name: &str) -> anyhow::Result<f64> {
    samples(text, name)
        .into_iter()
        .find_map(|(labels, value)| labels.is_empty().then_some(value))
        .with_context(|| format!("no {name}"))
}

struct Run {
    tasks: usize,
    steps: usize,
    seconds: f64,
    /// From the first creation request to the answer to the last.
    submit_seconds: f64,
    steps_per_s: f64,
    submit_per_s: f64,
    ready_to_started_p50_ms: f64,
    ready_to_started_p99_ms: f64,
    statements_per_step: f64,
    /// Tasks the coordinators wrote per creating statement (`tasker_create_batch_size`).
    tasks_per_create_statement: f64,
    /// Results per message the workers published them in.
    results_per_message: f64,
    /// Steps per step message the coordinators published them in.
    steps_per_message: f64,
    /// CPU seconds each part of the system spent during the run.
    cpu: Vec<(&'static str, f64)>,
    /// With events on: transitions the relay had not yet published when the last task
    /// completed (work the run's time does not include).
    events_behind: Option<i64>,
    /// Updates of `steps` rows per step (PostgreSQL's table statistics).
    step_updates_per_step: f64,
    /// Bytes of write-ahead log per step: every row and index entry written.
    wal_bytes_per_step: f64,
}

/// What PostgreSQL wrote so far: `steps` row updates and bytes of write-ahead log.
struct Written {
    step_updates: f64,
    wal_bytes: f64,
}

impl Run {
    fn print(&self, what: &str, broker: f64) {
        println!(
            "throughput  {what}: {} tasks, {} steps in {:.1} s",
            self.tasks, self.steps, self.seconds
        );
        println!(
            "         completed steps                {:>9.0} /s  (tasks submitted at {:.0} /s)",
            self.steps_per_s, self.submit_per_s
        );
        println!(
            "         steps/s ÷ half the broker rate  {:>9.2}",
            self.steps_per_s / (broker / 2.0)
        );
        println!(
            "         ready→started                  p50 {:>6.1} ms   p99 {:>6.1} ms",
            self.ready_to_started_p50_ms, self.ready_to_started_p99_ms
        );
        println!(
            "         database statements per step   {:>9.2}  (coordinator's own count, API included)",
            self.statements_per_step
        );
        println!(
            "         tasks per creating statement   {:>9.1}  (creations that arrive together are written together)",
            self.tasks_per_create_statement
        );
        if self.results_per_message.is_finite() {
            println!(
                "         results per result message     {:>9.1}  (results that finish together leave together)",
                self.results_per_message
            );
        } else {
            println!(
                "         results per result message          n/a  (the workers do not count them)"
            );
        }
        if self.steps_per_message.is_finite() {
            println!(
                "         steps per step message         {:>9.1}  (steps of a namespace claimed together travel together)",
                self.steps_per_message
            );
        } else {
            println!(
                "         steps per step message              n/a  (the coordinators do not count them)"
            );
        }
        println!(
            "         step row updates per step      {:>9.2}  (WAL {:.0} bytes per step)",
            self.step_updates_per_step, self.wal_bytes_per_step
        );
        let per_step: Vec<String> = self
            .cpu
            .iter()
            .map(|(part, seconds)| format!("{part} {:.0}", seconds * 1e6 / self.steps as f64))
            .collect();
        println!(
            "         CPU µs per step                {:>9.0}  ({})",
            self.cpu_per_step(),
            per_step.join(", ")
        );
        self.print_events_behind();
    }

    /// CPU µs per step, every part together.
    fn cpu_per_step(&self) -> f64 {
        let total: f64 = self.cpu.iter().map(|(_, seconds)| seconds).sum();
        total * 1e6 / self.steps as f64
    }

    fn print_events_behind(&self) {
        if let Some(behind) = self.events_behind {
            println!(
                "         events not yet published       {behind:>9}  transitions, when the last task completed"
            );
        }
    }
}

impl System {
    async fn start(args: &Args, database_url: &str) -> anyhow::Result<Self> {
        let log_dir = std::env::temp_dir().join("tasker-bench");
        std::fs::create_dir_all(&log_dir)?;
        let _ = delete_broker_objects(PREFIX, &["bench".to_owned()]).await;
        let mut coordinators = Vec::new();
        let mut bases = Vec::new();
        for n in 0..args.coordinators {
            let (process, base) = spawn_coordinator(
                args,
                database_url,
                &log_dir,
                &format!("coordinator-{n}"),
                &[],
            )
            .await?;
            bases.push(base);
            coordinators.push(process);
        }
        let mut workers = Vec::new();
        let mut worker_metrics = Vec::new();
        for n in 0..args.workers {
            // A free port, for the worker's metrics.
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            worker_metrics.push(format!("http://127.0.0.1:{port}/metrics"));
            let mut command = Command::new(binary("tasker-worker"));
            command
                .env("TASKER_METRICS_ADDR", format!("127.0.0.1:{port}"))
                .env("AMQP_URL", &args.amqp_url)
                .env("TASKER_AMQP_PREFIX", PREFIX)
                .env("TASKER_NAMESPACES", "bench")
                .env("TASKER_CONCURRENCY", args.concurrency.to_string())
                .env("TASKER_WORKER_ID", format!("bench-worker-{n}"))
                .env("RUST_LOG", "warn");
            let mut process = Process::spawn(command, format!("worker-{n}"), &log_dir)?;
            process
                .wait_for_log("worker started", Duration::from_secs(30))
                .await?;
            workers.push(process);
        }
        Ok(System {
            pool: PgPool::connect(database_url).await?,
            http: reqwest::Client::new(),
            bases,
            coordinators,
            workers,
            worker_metrics,
            submitters: args.submitters,
            args: args.clone(),
            database_url: database_url.to_owned(),
            log_dir,
        })
    }

    /// Stop the coordinators and start as many again, named `{name}-{n}`, with extra
    /// environment. Nothing may be in flight: every run before waited for its tasks.
    async fn restart_coordinators(
        &mut self,
        name: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        for coordinator in &mut self.coordinators {
            coordinator.terminate().await?;
        }
        self.coordinators.clear();
        self.bases.clear();
        for n in 0..self.args.coordinators {
            let (process, base) = spawn_coordinator(
                &self.args,
                &self.database_url,
                &self.log_dir,
                &format!("{name}-{n}"),
                env,
            )
            .await?;
            self.bases.push(base);
            self.coordinators.push(process);
        }
        Ok(())
    }

    async fn register_templates(&self, args: &Args) -> anyhow::Result<()> {
        let chain = |name: &str, n: usize| {
            let mut yaml = format!(
                "namespace: bench\nname: {name}\nsteps:\n  - {{name: s0, handler: tasker.noop}}\n"
            );
            for i in 1..n {
                yaml.push_str(&format!(
                    "  - {{name: s{i}, handler: tasker.noop, depends_on: [s{}]}}\n",
                    i - 1
                ));
            }
            yaml
        };
        for template in [
            "namespace: bench\nname: diamond\nsteps:\n  - {name: a, handler: tasker.noop}\n  - {name: b, handler: tasker.noop, depends_on: [a]}\n  - {name: c, handler: tasker.noop, depends_on: [a]}\n  - {name: d, handler: tasker.noop, depends_on: [b, c]}\n".to_owned(),
            "namespace: bench\nname: limited_diamond\nsteps:\n  - {name: a, handler: tasker.noop, concurrency: {key: context.k, limit: 2}}\n  - {name: b, handler: tasker.noop, depends_on: [a], concurrency: {key: context.k, limit: 2}}\n  - {name: c, handler: tasker.noop, depends_on: [a], concurrency: {key: context.k, limit: 2}}\n  - {name: d, handler: tasker.noop, depends_on: [b, c], concurrency: {key: context.k, limit: 2}}\n".to_owned(),
            chain("chain", args.chain_length),
            chain("long_chain", args.long_chain),
            fan_out(args.fan_out),
        ] {
            if template.contains("limited_diamond") && args.limit_keys == 0
                || template.contains("fan_out") && args.fan_out == 0
            {
                continue;
            }
            let response = self.http.post(format!("{}/v1/templates", self.bases[0])).body(template).send().await?;
            anyhow::ensure!(response.status().is_success(), "registering a template: {}", response.text().await?);
        }
        // Let every worker see the namespace before timing anything.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    }

    async fn create(&self, name: &str, n: usize) -> anyhow::Result<Uuid> {
        let base = &self.bases[n % self.bases.len()];
        let body: Value = self
            .http
            .post(format!("{base}/v1/tasks"))
            .json(&if name == "limited_diamond" {
                let keys = self.args.limit_keys.max(1);
                json!({"namespace": "bench", "name": name, "context": {"k": n % keys}})
            } else if name == "fan_out" {
                let part: Vec<usize> = (0..FAN_OUT_PART.min(self.args.fan_out)).collect();
                json!({"namespace": "bench", "name": name, "context": {"l": part}})
            } else {
                json!({"namespace": "bench", "name": name})
            })
            .send()
            .await?
            .json()
            .await?;
        Ok(Uuid::parse_str(
            body["task_id"]
                .as_str()
                .with_context(|| format!("no task_id in {body}"))?,
        )?)
    }

    /// Wait until no task is unfinished. The benchmark's database holds only its own
    /// tasks, so this reads the small index range of unfinished tasks, not the ids: a
    /// poll must not load the database it measures.
    async fn wait_done(&self, ids: &[Uuid]) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(1_800);
        let poll = if ids.len() == 1 {
            Duration::from_millis(2)
        } else {
            Duration::from_millis(100)
        };
        loop {
            let unfinished: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM tasks WHERE status IN ('pending', 'in_progress')",
            )
            .fetch_one(&self.pool)
            .await?;
            if unfinished == 0 {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{unfinished} tasks did not finish"
            );
            tokio::time::sleep(poll).await;
        }
    }

    /// End-to-end milliseconds (created → completed, database clock) of `n` tasks run
    /// one after another.
    async fn sequential(&self, name: &str, n: usize) -> anyhow::Result<Vec<f64>> {
        let mut ids = Vec::new();
        for i in 0..n {
            let id = self.create(name, i).await?;
            self.wait_done(&[id]).await?;
            ids.push(id);
        }
        let durations: Vec<f64> = sqlx::query_scalar("SELECT extract(epoch FROM completed_at - created_at)::float8 * 1000 FROM tasks WHERE task_id = ANY($1)")
            .bind(&ids).fetch_all(&self.pool).await?;
        Ok(durations)
    }

    async fn statements(&self) -> anyhow::Result<f64> {
        Ok(self.counts().await?.statements)
    }

    /// A `/metrics` page.
    async fn scrape(&self, url: &str) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// The coordinators' counts, summed, from one scrape of each.
    async fn counts(&self) -> anyhow::Result<Counts> {
        let mut counts = Counts::default();
        for base in &self.bases {
            let text = self.scrape(&format!("{base}/metrics")).await?;
            counts.statements += sample(&text, "tasker_db_statements_total")?;
            counts.creations += sample(&text, "tasker_create_batch_size_sum")?;
            counts.creating_statements += sample(&text, "tasker_create_batch_size_count")?;
            // Coordinators built before steps travelled together have no such metric.
            counts.steps_published +=
                sample(&text, "tasker_step_message_batch_size_sum").unwrap_or(0.0);
            counts.step_messages +=
                sample(&text, "tasker_step_message_batch_size_count").unwrap_or(0.0);
        }
        // Workers built before results were batched have no such metric: none counted
        // (the line then says so), so the bench can measure those builds too.
        for url in &self.worker_metrics {
            let text = self.scrape(url).await?;
            counts.results += sample(&text, "tasker_worker_result_batch_size_sum").unwrap_or(0.0);
            counts.result_messages +=
                sample(&text, "tasker_worker_result_batch_size_count").unwrap_or(0.0);
        }
        Ok(counts)
    }

    /// Create `n` schedules of diamonds that fire once a year on 1 January.
    async fn idle_schedules(&self, n: usize) -> anyhow::Result<()> {
        for i in 0..n {
            let base = &self.bases[i % self.bases.len()];
            let response = self
                .http
                .post(format!("{base}/v1/schedules"))
                .json(&json!({"name": format!("yearly_{i}"), "namespace": "bench",
                              "template": "diamond", "cron": "0 0 1 1 *"}))
                .send()
                .await?;
            anyhow::ensure!(
                response.status().is_success(),
                "creating a schedule: {}",
                response.text().await?
            );
        }
        Ok(())
    }

    /// A schedule firing every second for `over`: each fire's lateness, from its fire
    /// time to its task's creation, in milliseconds.
    async fn schedule_lateness(&self, over: Duration) -> anyhow::Result<Vec<f64>> {
        let base = &self.bases[0];
        let response = self
            .http
            .post(format!("{base}/v1/schedules"))
            .json(&json!({"name": "every_second", "namespace": "bench",
                          "template": "diamond", "cron": "* * * * * *"}))
            .send()
            .await?;
        anyhow::ensure!(response.status().is_success(), "{}", response.text().await?);
        tokio::time::sleep(over).await;
        self.http
            .patch(format!("{base}/v1/schedules/every_second"))
            .json(&json!({"paused": true}))
            .send()
            .await?;
        let late: Vec<f64> = sqlx::query_scalar(
            "SELECT (extract(epoch FROM t.created_at - f.fire_at) * 1000)::FLOAT8 \
             FROM schedule_fires f JOIN tasks t ON t.task_id = f.task_id \
             WHERE f.schedule = 'every_second'",
        )
        .fetch_all(&self.pool)
        .await?;
        // Its tasks finish before the next run starts.
        let deadline = Instant::now() + Duration::from_secs(60);
        while sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM tasks WHERE status IN ('pending', 'in_progress')",
        )
        .fetch_one(&self.pool)
        .await?
            > 0
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the scheduled tasks did not finish"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(late)
    }

    async fn idle_statements(&self, over: Duration) -> anyhow::Result<f64> {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = self.statements().await?;
        tokio::time::sleep(over).await;
        let after = self.statements().await?;
        // Two scrapes of /metrics issue no statements; subtract nothing.
        Ok((after - before) / over.as_secs_f64() / self.bases.len() as f64)
    }

    /// Submit `tasks` tasks (at most `rate` per second when given) and wait for all.
    async fn throughput(
        &self,
        name: &str,
        tasks: usize,
        steps_per_task: usize,
        rate: Option<f64>,
    ) -> anyhow::Result<Run> {
        let before = self.counts().await?;
        let written_before = self.written().await?;
        let cpu_before = self.cpu_by_part();
        let started = Instant::now();
        let mut ids = Vec::with_capacity(tasks);
        let mut inflight = FuturesUnordered::new();
        for n in 0..tasks {
            if let Some(rate) = rate {
                let due = started + Duration::from_secs_f64(n as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            inflight.push(self.create(name, n));
            if inflight.len() >= self.submitters {
                ids.push(inflight.next().await.context("submitter")??);
            }
        }
        while let Some(id) = inflight.next().await {
            ids.push(id?);
        }
        let submit_seconds = started.elapsed().as_secs_f64();
        let submit_per_s = tasks as f64 / submit_seconds;
        self.wait_done(&ids).await?;
        let seconds = started.elapsed().as_secs_f64();
        let cpu = self
            .cpu_by_part()
            .into_iter()
            .zip(cpu_before)
            .map(|((part, after), (_, before))| (part, after - before))
            .collect();
        let after = self.counts().await?;
        let written = self.written().await?;
        let events_behind = if self.args.events {
            Some(
                sqlx::query_scalar(
                    "SELECT (SELECT last_value FROM transition_ids) - last_transition_id FROM event_relay",
                )
                .fetch_one(&self.pool)
                .await?,
            )
        } else {
            None
        };
        let steps = tasks * steps_per_task;
        let (p50, p99): (f64, f64) = sqlx::query_as(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY l), percentile_cont(0.99) WITHIN GROUP (ORDER BY l)
             FROM (SELECT extract(epoch FROM started_at - ready_at)::float8 * 1000 AS l FROM steps WHERE task_id = ANY($1)) x",
        )
        .bind(&ids)
        .fetch_one(&self.pool)
        .await?;
        Ok(Run {
            tasks,
            steps,
            seconds,
            submit_seconds,
            steps_per_s: steps as f64 / seconds,
            submit_per_s,
            ready_to_started_p50_ms: p50,
            ready_to_started_p99_ms: p99,
            statements_per_step: (after.statements - before.statements) / steps as f64,
            tasks_per_create_statement: (after.creations - before.creations)
                / (after.creating_statements - before.creating_statements),
            results_per_message: (after.results - before.results)
                / (after.result_messages - before.result_messages),
            steps_per_message: (after.steps_published - before.steps_published)
                / (after.step_messages - before.step_messages),
            cpu,
            events_behind,
            step_updates_per_step: (written.step_updates - written_before.step_updates)
                / steps as f64,
            wal_bytes_per_step: (written.wal_bytes - written_before.wal_bytes) / steps as f64,
        })
    }

    /// What PostgreSQL has written so far. A server process reports its table statistics
    /// at most once a second (an idle one within a second or so): this reads them until
    /// two readings 600 ms apart agree, so a run's counts are complete.
    async fn written(&self) -> anyhow::Result<Written> {
        let read = || async {
            sqlx::query_as::<_, (f64, f64)>(
                "SELECT (SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'steps')::float8,
                        pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8",
            )
            .fetch_one(&self.pool)
            .await
        };
        let (mut step_updates, _) = read().await?;
        let mut wal_bytes;
        let mut readings = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(600)).await;
            let (updates, wal) = read().await?;
            wal_bytes = wal;
            readings += 1;
            if updates == step_updates || readings == 20 {
                break;
            }
            step_updates = updates;
        }
        Ok(Written {
            step_updates,
            wal_bytes,
        })
    }

    /// Store `n` completed diamonds (tasks, steps, edges, history) directly in SQL.
    /// Retention, measured: `n` finished diamonds 40 days old, pruned by the coordinators'
    /// loop while `diamonds` new ones run, against the same run without pruning; then
    /// `tasker-coordinator prune` alone on `n` more.
    async fn prune(&mut self, n: usize, diamonds: usize, broker: f64) -> anyhow::Result<()> {
        self.restart_coordinators("retention-off", &[("TASKER_RETENTION", "off")])
            .await?;
        let started = Instant::now();
        self.store_history(n, "40 days").await?;
        println!(
            "prune    stored {n} finished diamonds, 40 days old, in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let without = self.throughput("diamond", diamonds, 4, None).await?;
        without.print("diamonds, retention off", broker);

        self.restart_coordinators("retention-30d", &[("TASKER_RETENTION", "30d")])
            .await?;
        let started = Instant::now();
        let during = self.throughput("diamond", diamonds, 4, None).await?;
        during.print("diamonds, while pruning", broker);
        let pruned_during = self.pruned().await?;
        let deadline = Instant::now() + Duration::from_secs(3_600);
        while self.pruned().await? < n as f64 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the retention loop did not finish"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "prune    retention loop: {n} tasks in {seconds:.1} s, {:.0} tasks/s ({pruned_during:.0} pruned while the diamonds ran)",
            n as f64 / seconds
        );
        println!(
            "prune    throughput while pruning / without  {:>6.2}",
            during.steps_per_s / without.steps_per_s
        );

        self.restart_coordinators("retention-off", &[("TASKER_RETENTION", "off")])
            .await?;
        self.store_history(n, "40 days").await?;
        let output = Command::new(binary("tasker-coordinator"))
            .args(["prune", "--older-than", "30d"])
            .env("DATABASE_URL", &self.database_url)
            .env("TASKER_EVENTS", self.args.events.to_string())
            .env("RUST_LOG", "warn")
            .output()
            .await?;
        anyhow::ensure!(
            output.status.success(),
            "tasker-coordinator prune failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        print!(
            "prune    tasker-coordinator prune alone: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        Ok(())
    }

    /// `tasker_pruned_tasks_total`, summed over the coordinators.
    async fn pruned(&self) -> anyhow::Result<f64> {
        let mut pruned = 0.0;
        for base in &self.bases {
            let text = self.scrape(&format!("{base}/metrics")).await?;
            pruned += samples(&text, "tasker_pruned_tasks_total")
                .iter()
                .map(|(_, value)| value)
                .sum::<f64>();
        }
        Ok(pruned)
    }

    /// Store `n` completed diamonds, finished `age` ago (an SQL interval), with task ids
    /// of that time (UUIDv7 order, as the coordinators make them). Their history counts
    /// as published: the events relay's cursor moves past it.
    async fn store_history(&self, n: usize, age: &str) -> anyhow::Result<()> {
        let template_id: i64 =
            sqlx::query_scalar("SELECT template_id FROM templates WHERE name = 'diamond'")
                .fetch_one(&self.pool)
                .await?;
        for chunk in 0..n.div_ceil(10_000) {
            let count = (n - chunk * 10_000).min(10_000) as i64;
            sqlx::query(
                r#"
                WITH t AS (
                    INSERT INTO tasks (task_id, template_id, namespace, name, version, status, context, created_at, updated_at, completed_at)
                    SELECT encode(overlay(uuid_send(gen_random_uuid()) placing
                               substring(int8send((extract(epoch FROM now() - $3::interval) * 1000)::bigint) FROM 3)
                               FROM 1 FOR 6), 'hex')::uuid,
                           $1, 'bench', 'diamond', '0.1.0', 'complete', '{}', now() - $3::interval, now() - $3::interval, now() - $3::interval
                    FROM generate_series(1, $2)
                    RETURNING task_id
                ),
                s AS (
                    INSERT INTO steps (step_id, task_id, name, position, handler, status, remaining_parents, attempts, retry_limit, retryable, timeout_ms, results, started_at, completed_at, ready_at)
                    SELECT gen_random_uuid(), t.task_id, x.name, x.position, 'tasker.noop', 'complete', 0, 1, 3, true, 300000, '{}', now() - $3::interval, now() - $3::interval, now() - $3::interval
                    FROM t CROSS JOIN (VALUES ('a', 0), ('b', 1), ('c', 2), ('d', 3)) AS x(name, position)
                    RETURNING step_id, task_id, name
                ),
                e AS (
                    INSERT INTO step_edges (task_id, from_step, to_step)
                    SELECT p.task_id, p.step_id, c.step_id FROM s p JOIN s c ON c.task_id = p.task_id
                    WHERE (p.name, c.name) IN (('a', 'b'), ('a', 'c'), ('b', 'd'), ('c', 'd'))
                ),
                h AS (
                    INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason)
                    SELECT step_id, task_id, x.f, x.t, x.r FROM s CROSS JOIN (VALUES
                        ('pending', 'enqueued', 'dispatched'), ('enqueued', 'in_progress', 'started'), ('in_progress', 'complete', 'succeeded')) AS x(f, t, r)
                )
                INSERT INTO task_transitions (task_id, from_status, to_status, reason)
                SELECT task_id, x.f, x.t, x.r FROM t CROSS JOIN (VALUES
                    (NULL, 'pending', 'created'), ('pending', 'in_progress', 'first_step_dispatched'), ('in_progress', 'complete', 'all_steps_done')) AS x(f, t, r)
                "#,
            )
            .bind(template_id)
            .bind(count)
            .bind(age)
            .execute(&self.pool)
            .await?;
        }
        self.relay_from_now().await?;
        sqlx::query("ANALYZE").execute(&self.pool).await?;
        Ok(())
    }

    /// Time each analytics call over a window holding the stored history, and the calls
    /// the console's pages make (with their files): the first call, and the median of
    /// five more.
    async fn history_timings(&self) -> anyhow::Result<()> {
        let steps: i64 = sqlx::query_scalar("SELECT count(*) FROM steps")
            .fetch_one(&self.pool)
            .await?;
        let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
            .fetch_one(&self.pool)
            .await?;
        let task_id: uuid::Uuid = sqlx::query_scalar(
            "SELECT task_id FROM tasks ORDER BY task_id OFFSET (SELECT count(*) / 2 FROM tasks) LIMIT 1",
        )
        .fetch_one(&self.pool)
        .await?;
        let since = (chrono::Utc::now() - chrono::TimeDelta::days(2))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let base = &self.bases[0];
        for (what, path) in [
            (
                "analytics templates",
                format!("/v1/analytics/templates?since={since}"),
            ),
            (
                "analytics steps",
                format!("/v1/analytics/steps?namespace=bench&name=diamond&since={since}"),
            ),
            (
                "analytics bottlenecks",
                format!("/v1/analytics/bottlenecks?namespace=bench&name=diamond&since={since}"),
            ),
            (
                "ui files",
                "/ui/ /ui/app.js /ui/graph.js /ui/style.css".to_owned(),
            ),
            ("ui whoami", "/v1/whoami".to_owned()),
            ("ui tasks", "/v1/tasks?limit=50".to_owned()),
            (
                "ui filtered",
                "/v1/tasks?limit=50&namespace=bench&name=diamond&status=error".to_owned(),
            ),
            (
                "ui a task",
                format!("/v1/tasks/{task_id} /v1/tasks/{task_id}/transitions"),
            ),
            ("ui workers", "/health/status".to_owned()),
        ] {
            let mut times = Vec::new();
            for _ in 0..6 {
                let started = Instant::now();
                // A page's calls, one after another as a browser's first load would.
                for path in path.split(' ') {
                    let response = self.http.get(format!("{base}{path}")).send().await?;
                    anyhow::ensure!(
                        response.status().is_success(),
                        "{path}: {}",
                        response.text().await?
                    );
                    response.bytes().await?;
                }
                times.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            let first = times[0];
            let mut rest = times[1..].to_vec();
            rest.sort_by(f64::total_cmp);
            println!(
                "history  {what:<21} first {first:>7.1} ms   median of 5 {:>7.1} ms   ({tasks} stored tasks, {steps} steps)",
                rest[2]
            );
        }
        Ok(())
    }

    async fn duplicate_dispatches(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT step_id, metadata->>'attempt' FROM step_transitions
             WHERE reason = 'dispatched' GROUP BY 1, 2 HAVING count(*) > 1) d",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// CPU seconds used so far by each part of the system on this machine: PostgreSQL
    /// (every `postgres` process, plus the exited backends the postmaster reaped),
    /// RabbitMQ (`beam.smp`), the coordinators, the workers and this benchmark.
    fn cpu_by_part(&self) -> [(&'static str, f64); 5] {
        let ours = |processes: &[Process]| -> f64 {
            processes
                .iter()
                .filter_map(|p| cpu_seconds(p.pid()?, false))
                .sum()
        };
        let (mut postgres, mut rabbitmq) = (0.0, 0.0);
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            match std::fs::read_to_string(format!("/proc/{pid}/comm")).as_deref() {
                Ok("postgres\n") => postgres += cpu_seconds(pid, true).unwrap_or(0.0),
                Ok("beam.smp\n") => rabbitmq += cpu_seconds(pid, false).unwrap_or(0.0),
                _ => {}
            }
        }
        [
            ("postgres", postgres),
            ("rabbitmq", rabbitmq),
            ("coordinator", ours(&self.coordinators)),
            ("workers", ours(&self.workers)),
            (
                "bench",
                cpu_seconds(std::process::id(), false).unwrap_or(0.0),
            ),
        ]
    }

    /// Every process's resident memory now (MB), by name.
    fn rss_now(&self) -> Vec<(String, f64)> {
        self.coordinators
            .iter()
            .chain(&self.workers)
            .filter_map(|p| Some((p.name.clone(), p.pid().and_then(current_rss)?)))
            .collect()
    }

    /// Run `tasks` diamonds in rounds; after each, print throughput and every process's
    /// RSS; at the end, each process's growth from the end of the warm-up (round 2).
    async fn soak(&self, tasks: usize, round: usize) -> anyhow::Result<()> {
        let rounds = tasks.div_ceil(round);
        let vacuum = self.autovacuum_off().await?;
        if vacuum {
            println!(
                "soak     autovacuum is off on this server: VACUUM (ANALYZE) after each round"
            );
        }
        let started = Instant::now();
        let mut after_warmup: Vec<(String, f64)> = Vec::new();
        let mut last = Vec::new();
        println!("soak     {tasks} diamond tasks in {rounds} rounds of {round}");
        for r in 1..=rounds {
            let n = round.min(tasks - (r - 1) * round);
            let run = self.throughput("diamond", n, 4, None).await?;
            if vacuum {
                self.vacuum().await?;
            }
            let rss = self.rss_now();
            let listed: Vec<String> = rss
                .iter()
                .map(|(name, mb)| format!("{name} {mb:.1}"))
                .collect();
            println!(
                "soak     round {r:>3}/{rounds}  t={:>6.1} s  {:>6.0} steps/s  RSS MB: {}",
                started.elapsed().as_secs_f64(),
                run.steps_per_s,
                listed.join("  ")
            );
            if r == 2.min(rounds) {
                after_warmup = rss.clone();
            }
            last = rss;
        }
        for ((name, warm), (_, end)) in after_warmup.iter().zip(&last) {
            println!(
                "soak     {name:<14} RSS after warm-up {warm:>6.1} MB, at the end {end:>6.1} MB ({:+.1}%)",
                (end - warm) / warm * 100.0
            );
        }
        self.print_resources();
        Ok(())
    }

    /// Whether this PostgreSQL server runs without autovacuum (some test machines switch
    /// it off). Every step row is updated several times; without vacuum its dead versions
    /// pile up and every claim and result walks over them: a burst after the standard
    /// runs then drained at about half the steady rate (BENCHMARKS.md, eighth session).
    async fn autovacuum_off(&self) -> anyhow::Result<bool> {
        let autovacuum: String = sqlx::query_scalar("SHOW autovacuum")
            .fetch_one(&self.pool)
            .await?;
        Ok(autovacuum != "on")
    }

    /// Move the events relay's cursor past every transition recorded so far: history no
    /// one will consume (stored, or from a run whose events were not the point) is not
    /// published in the runs after.
    async fn relay_from_now(&self) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE event_relay SET last_transition_id = GREATEST(last_transition_id,
                 (SELECT last_value FROM transition_ids))",
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// What autovacuum does between runs, where it is switched off.
    async fn vacuum(&self) -> anyhow::Result<()> {
        sqlx::query(
            "VACUUM (ANALYZE) steps, tasks, step_edges, step_transitions, task_transitions",
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The burst workload: restart the coordinators with a dispatch lease of `lease_ms`,
    /// create `tasks` diamonds at once (every submitter busy, no pacing), wait for all of
    /// them, and print what the backlog cost against `steady_steps_per_s`, the diamonds
    /// figure of this run.
    async fn burst(
        &mut self,
        tasks: usize,
        lease_ms: u64,
        steady_steps_per_s: f64,
    ) -> anyhow::Result<()> {
        let lease = lease_ms.to_string();
        self.restart_coordinators(
            "burst-coordinator",
            &[("TASKER_DISPATCH_LEASE_MS", lease.as_str())],
        )
        .await?;
        // The runs before left dead row versions that autovacuum would have cleaned
        // by now; where it is off, clean them, and say so.
        let vacuumed = self.autovacuum_off().await?;
        if vacuumed {
            self.vacuum().await?;
        }
        let before = self.burst_counts().await?;
        // Peak memory of the burst alone: the coordinators are new, the workers' peak is
        // reset (where the kernel allows it).
        let reset: Vec<bool> = self
            .coordinators
            .iter()
            .chain(&self.workers)
            .map(|p| p.pid().is_some_and(reset_peak_rss))
            .collect();
        let depth = QueueDepth::watch(&self.args.amqp_url, format!("{PREFIX}.steps.bench"));
        let run = self.throughput("diamond", tasks, 4, None).await?;
        let max_depth = depth.stop().await;
        let after = self.burst_counts().await?;

        println!(
            "throughput  burst: {tasks} diamonds created at once, {} steps, dispatch lease {lease_ms} ms",
            run.steps
        );
        if vacuumed {
            println!(
                "         autovacuum is off on this server: VACUUM (ANALYZE) before the burst"
            );
        }
        println!(
            "         creation                       {:>9.1} s   ({:.0} tasks/s, {} requests at a time)",
            run.submit_seconds, run.submit_per_s, self.submitters
        );
        println!(
            "         drain                          {:>9.1} s   (first creation to last completion)",
            run.seconds
        );
        println!(
            "         completed steps                {:>9.0} /s  = {:.0} % of the steady diamonds' {:.0} /s",
            run.steps_per_s,
            run.steps_per_s / steady_steps_per_s * 100.0,
            steady_steps_per_s
        );
        println!(
            "         ready→started                  p50 {:>6.1} ms   p99 {:>6.1} ms",
            run.ready_to_started_p50_ms, run.ready_to_started_p99_ms
        );
        run.print_events_behind();
        let mut reasons: Vec<&String> = before
            .redispatches
            .keys()
            .chain(after.redispatches.keys())
            .collect();
        reasons.sort();
        reasons.dedup();
        let by_reason: Vec<(&String, f64)> = reasons
            .into_iter()
            .map(|reason| {
                let count = |c: &BurstCounts| c.redispatches.get(reason).copied().unwrap_or(0.0);
                (reason, count(&after) - count(&before))
            })
            .collect();
        let listed: Vec<String> = by_reason
            .iter()
            .map(|(reason, n)| format!("{reason} {n:.0}"))
            .collect();
        println!(
            "         re-dispatches                  {:>9.0}  ({}; tasker_leases_expired_total but lease_expired)",
            by_reason.iter().map(|(_, n)| n).sum::<f64>(),
            if listed.is_empty() {
                "no reason reported".to_owned()
            } else {
                listed.join(", ")
            }
        );
        let stale = after.stale - before.stale;
        let stale_pct = stale / run.steps as f64 * 100.0;
        println!(
            "         stale results dropped          {stale:>9.0}  = {stale_pct:.3} % of the steps (goal ≤ 0.1 %: {})",
            if stale_pct <= 0.1 { "met" } else { "NOT met" }
        );
        match max_depth {
            Ok(depth) => println!(
                "         step queue depth, max          {depth:>9}  messages (sampled every {} ms)",
                QueueDepth::EVERY.as_millis()
            ),
            Err(error) => println!("         step queue depth, max            unknown ({error:#})"),
        }
        for (process, reset) in self.coordinators.iter().chain(&self.workers).zip(reset) {
            if let Some((rss_mb, _)) = process.pid().and_then(resources) {
                println!(
                    "         peak RSS {:<22} {rss_mb:>9.1} MB{}",
                    process.name,
                    if reset {
                        ""
                    } else {
                        "  (since the process started)"
                    }
                );
            }
        }
        Ok(())
    }

    /// The burst's counters, summed over the coordinators, from one scrape of each.
    async fn burst_counts(&self) -> anyhow::Result<BurstCounts> {
        let mut counts = BurstCounts::default();
        for base in &self.bases {
            let text = self.scrape(&format!("{base}/metrics")).await?;
            for (labels, value) in samples(&text, "tasker_leases_expired_total") {
                let reason = label(&labels, "reason").unwrap_or("");
                if reason != "lease_expired" {
                    *counts.redispatches.entry(reason.to_owned()).or_default() += value;
                }
            }
            counts.stale += samples(&text, "tasker_stale_results_dropped_total")
                .iter()
                .map(|(_, value)| value)
                .sum::<f64>();
        }
        Ok(counts)
    }

    fn print_resources(&self) {
        for (kind, processes) in [
            ("coordinator", &self.coordinators),
            ("worker", &self.workers),
        ] {
            for process in processes {
                if let Some((rss_mb, cpu_s)) = process.pid().and_then(resources) {
                    println!(
                        "process  {kind:<11} {:<14} peak RSS {rss_mb:>6.1} MB   CPU {cpu_s:>7.1} s",
                        process.name
                    );
                }
            }
        }
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        for worker in &mut self.workers {
            worker.terminate().await?;
        }
        for coordinator in &mut self.coordinators {
            coordinator.terminate().await?;
        }
        self.pool.close().await;
        let _ = delete_broker_objects(PREFIX, &["bench".to_owned()]).await;
        Ok(())
    }
}

/// Start a coordinator (`name` names it and its log) and wait until it listens; returns it
/// and its base URL.
async fn spawn_coordinator(
    args: &Args,
    database_url: &str,
    log_dir: &std::path::Path,
    name: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<(Process, String)> {
    let mut command = Command::new(binary("tasker-coordinator"));
    command
        .arg("serve")
        .env("DATABASE_URL", database_url)
        .env("AMQP_URL", &args.amqp_url)
        .env("TASKER_AMQP_PREFIX", PREFIX)
        .env("TASKER_HTTP_ADDR", "127.0.0.1:0")
        .env("TASKER_EVENTS", args.events.to_string())
        .env("RUST_LOG", "warn,tasker_coordinator=info");
    for (key, value) in env {
        command.env(key, value);
    }
    let (process, address) = tasker_tests::spawn_coordinator(command, name, log_dir).await?;
    Ok((process, format!("http://{address}")))
}

/// Every sample of the metric `name` on a Prometheus text page, with its labels (none
/// for a sample without). [`tasker_tests::metric`] reads one sample whose labels are
/// known in advance; this finds them all, to be summed over the label values wanted.
fn samples<'a>(text: &'a str, name: &str) -> Vec<(Vec<(&'a str, &'a str)>, f64)> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => {
                    let (labels, value) = rest.rsplit_once('}')?;
                    (parse_labels(labels)?, value)
                }
                None if rest.starts_with(' ') => (Vec::new(), rest),
                None => return None, // another metric whose name starts with `name`
            };
            let value = value.split_whitespace().next()?.parse().ok()?;
            Some((labels, value))
        })
        .collect()
}

/// `a="x",b="y"` as pairs (values still escaped, which comparing plain values ignores).
fn parse_labels(mut text: &str) -> Option<Vec<(&str, &str)>> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start_matches([',', ' ']);
        if text.is_empty() {
            return Some(labels);
        }
        let (key, rest) = text.split_once('=')?;
        let rest = rest.strip_prefix('"')?;
        // The closing quote is the first one not escaped by a backslash.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in rest.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let end = end?;
        labels.push((key.trim(), &rest[..end]));
        text = &rest[end + 1..];
    }
}

/// The value of one label of a sample.
fn label<'a>(labels: &[(&str, &'a str)], key: &str) -> Option<&'a str> {
    labels.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// Watches how deep a queue gets: a passive declare on its own connection every
/// [`QueueDepth::EVERY`], until stopped.
struct QueueDepth {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<u32>>,
}

impl QueueDepth {
    const EVERY: Duration = Duration::from_millis(200);

    fn watch(url: &str, queue: String) -> Self {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let url = url.to_owned();
        let task = tokio::spawn(async move {
            let connection =
                lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            let mut deepest = 0;
            loop {
                let declared = channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        Default::default(),
                    )
                    .await?;
                deepest = deepest.max(declared.message_count());
                tokio::select! {
                    _ = &mut stopped => break,
                    () = tokio::time::sleep(Self::EVERY) => {}
                }
            }
            let _ = connection.close(200, "OK".into()).await;
            Ok(deepest)
        });
        QueueDepth { stop, task }
    }

    /// Stop watching; the deepest the queue was seen.
    async fn stop(self) -> anyhow::Result<u32> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

/// Reset a process's peak resident memory (`VmHWM`) to its current size, so the next
/// peak read covers only what follows (Linux 4.0 and later). Whether it worked.
fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Peak resident memory (MB) and CPU seconds (user + system) of a process, from /proc.
fn resources(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let peak_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((peak_kb / 1024.0, cpu_seconds(pid, false)?))
}

/// CPU seconds (user + system) of a process, from /proc; with `children`, also those of
/// its exited children it has waited for.
fn cpu_seconds(pid: u32, children: bool) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // utime, stime, cutime, cstime: fields 14-17, counted after the parenthesised name.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let count = if children { 4 } else { 2 };
    let mut ticks = 0.0;
    for field in fields.get(11..11 + count)? {
        ticks += field.parse::<f64>().ok()?;
    }
    Some(ticks / 100.0)
}

/// Resident memory (MB) of a process now, from /proc.
fn current_rss(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}

#[cfg(test)]
mod tests {
    use super::{sample, samples};

    #[test]
    fn metrics_are_read_by_exact_name_with_and_without_labels() {
        let text = "# HELP tasker_a_total A.\n\
                    tasker_a_total 3\n\
                    tasker_a_total_more 9\n\
                    tasker_b{reason=\"x\"} 2\n\
                    tasker_b{reason=\"y\"} 5\n";
        assert_eq!(sample(text, "tasker_a_total").unwrap(), 3.0);
        assert!(sample(text, "tasker_b").is_err(), "only labelled samples");
        assert!(sample(text, "tasker_c").is_err());
        let b: Vec<f64> = samples(text, "tasker_b").iter().map(|(_, v)| *v).collect();
        assert_eq!(b, [2.0, 5.0]);
        assert_eq!(samples(text, "tasker_b")[1].0, [("reason", "y")]);
    }
}
