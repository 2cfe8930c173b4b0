//! `tasker-example`: the README's first command. Starts a coordinator and two workers
//! against the configured PostgreSQL and RabbitMQ, registers the example templates in
//! `deploy/templates/`, submits a batch of tasks, shows progress, and prints a summary.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde_json::{Value, json};
use tasker_tests::{Process, binary, spawn_coordinator};
use tokio::process::Command;
use uuid::Uuid;

#[derive(Parser)]
#[command(about = "Run Tasker's example workflows end to end and watch them")]
struct Args {
    /// Tasks to submit (spread over the example templates).
    #[arg(long, default_value_t = 60)]
    tasks: usize,
    /// Worker processes to start.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// PostgreSQL database for the example.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/tasker_example"
    )]
    database_url: String,
    /// RabbitMQ.
    #[arg(long, env = "AMQP_URL", default_value = tasker_shared::config::DEFAULT_AMQP_URL)]
    amqp_url: String,
    /// Folder of templates to register.
    #[arg(long, default_value = "deploy/templates")]
    templates: PathBuf,
    /// After the batch, keep the coordinator and workers running (until Ctrl-C) to look
    /// around in the web console.
    #[arg(long)]
    keep: bool,
    /// The coordinator's address (`TASKER_HTTP_ADDR`); port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    http_addr: String,
}

/// (namespace, name, context for task i)
fn workload(i: usize) -> (&'static str, &'static str, Value) {
    match i % 4 {
        0 => (
            "ecommerce",
            "order_fulfillment",
            json!({"order_id": 1000 + i, "customer": format!("customer-{i}")}),
        ),
        1 => ("data", "etl_pipeline", json!({"run": i})),
        2 => {
            let files: Vec<String> = (0..i % 12)
                .map(|n| format!("batch-{i}/part-{n}.csv"))
                .collect();
            ("data", "file_import", json!({"files": files}))
        }
        _ => ("ops", "flaky_sync", json!({"batch": i})),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let log_dir = std::env::temp_dir().join("tasker-example");
    std::fs::create_dir_all(&log_dir)?;
    let prefix = "tasker_example";
    // The example's queues are its own: start from none, so a run with another
    // TASKER_QUEUE_TYPE than the last finds no queue of the other type.
    let namespaces = ["ecommerce", "data", "ops"].map(str::to_owned);
    tasker_tests::delete_broker_objects_at(&args.amqp_url, prefix, &namespaces).await?;

    let mut coordinator = Command::new(binary("tasker-coordinator"));
    coordinator
        .arg("serve")
        .env("DATABASE_URL", &args.database_url)
        .env("AMQP_URL", &args.amqp_url)
        .env("TASKER_AMQP_PREFIX", prefix)
        .env("TASKER_HTTP_ADDR", &args.http_addr)
        .env("TASKER_TEMPLATES_DIR", &args.templates);
    let (mut coordinator, address) =
        spawn_coordinator(coordinator, "coordinator", &log_dir).await?;
    let base = format!("http://{address}");
    println!("coordinator   {base}   (logs in {})", log_dir.display());
    println!("console       {base}/ui/   (live while the example runs; --keep keeps it up)");

    let mut workers = Vec::new();
    for n in 1..=args.workers {
        let mut command = Command::new(binary("tasker-worker"));
        command
            .env("AMQP_URL", &args.amqp_url)
            .env("TASKER_AMQP_PREFIX", prefix)
            .env("TASKER_WORKER_ID", format!("example-worker-{n}"))
            .env("TASKER_CONCURRENCY", "8");
        let mut worker = Process::spawn(command, format!("worker-{n}"), &log_dir)?;
        worker
            .wait_for_log("worker started", Duration::from_secs(30))
            .await?;
        println!("worker {n}      serving every namespace, 8 steps at a time");
        workers.push(worker);
    }

    let http = reqwest::Client::new();
    let templates: Value = http
        .get(format!("{base}/v1/templates"))
        .send()
        .await?
        .json()
        .await?;
    for template in templates["templates"].as_array().into_iter().flatten() {
        println!(
            "template      {}/{} v{} ({} steps)",
            template["namespace"].as_str().unwrap_or("?"),
            template["name"].as_str().unwrap_or("?"),
            template["version"].as_str().unwrap_or("?"),
            template["step_count"]
        );
    }

    let started = Instant::now();
    let mut task_ids = Vec::with_capacity(args.tasks);
    for i in 0..args.tasks {
        let (namespace, name, context) = workload(i);
        let response = http
            .post(format!("{base}/v1/tasks"))
            .json(&json!({"namespace": namespace, "name": name, "context": context, "initiator": "tasker-example"}))
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        anyhow::ensure!(
            status.is_success(),
            "creating a task failed: {status} {body}"
        );
        task_ids.push(Uuid::parse_str(
            body["task_id"].as_str().context("task_id")?,
        )?);
    }
    println!("submitted     {} tasks\n", task_ids.len());

    let pool = sqlx::PgPool::connect(&args.database_url).await?;
    let terminal = std::io::stdout().is_terminal();
    let mut last_print = Instant::now() - Duration::from_secs(10);
    loop {
        let tasks = counts(&pool, "tasks", &task_ids).await?;
        let steps = counts(&pool, "steps", &task_ids).await?;
        let finished: i64 = ["complete", "error", "cancelled"]
            .iter()
            .map(|s| tasks.get(*s).copied().unwrap_or(0))
            .sum();
        let line = format!(
            "tasks {:>4}/{} done ({} error) | steps: {} complete, {} running, {} queued, {} waiting to retry, {} pending | {:.1}s",
            finished,
            task_ids.len(),
            tasks.get("error").unwrap_or(&0),
            steps.get("complete").unwrap_or(&0),
            steps.get("in_progress").unwrap_or(&0),
            steps.get("enqueued").unwrap_or(&0),
            steps.get("waiting_for_retry").unwrap_or(&0),
            steps.get("pending").unwrap_or(&0),
            started.elapsed().as_secs_f64()
        );
        let done = finished as usize == task_ids.len();
        if terminal {
            print!("\r\x1b[2K{line}");
            std::io::stdout().flush()?;
        } else if done || last_print.elapsed() >= Duration::from_secs(1) {
            println!("{line}");
            last_print = Instant::now();
        }
        if done {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "the example did not finish in 5 minutes; see the logs in {}",
            log_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let wall = started.elapsed();
    println!("\n");
    summary(&pool, &task_ids, wall).await?;

    if args.keep {
        println!("\nthe coordinator and workers keep running: {base}/ui/ (Ctrl-C stops them)");
        tokio::signal::ctrl_c().await?;
    }

    for worker in &mut workers {
        worker.terminate().await?;
    }
    coordinator.terminate().await?;
    println!(
        "\nstopped the coordinator and workers (SIGTERM, graceful). Logs: {}",
        log_dir.display()
    );
    Ok(())
}

async fn counts(
    pool: &sqlx::PgPool,
    table: &str,
    ids: &[Uuid],
) -> anyhow::Result<BTreeMap<String, i64>> {
    let sql =
        format!("SELECT status, count(*) FROM {table} WHERE task_id = ANY($1) GROUP BY status");
    let rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(ids)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().collect())
}

async fn summary(pool: &sqlx::PgPool, ids: &[Uuid], wall: Duration) -> anyhow::Result<()> {
    let rows: Vec<(String, i64, i64, f64, f64, i64, i64)> = sqlx::query_as(
        r#"
        SELECT t.namespace || '/' || t.name,
               count(DISTINCT t.task_id),
               count(DISTINCT t.task_id) FILTER (WHERE t.status = 'complete'),
               percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM t.completed_at - t.created_at)) * 1000,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM t.completed_at - t.created_at)) * 1000,
               (SELECT count(*) FROM steps s WHERE s.task_id = ANY(array_agg(t.task_id))),
               (SELECT coalesce(sum(greatest(s.attempts - 1, 0)), 0) FROM steps s WHERE s.task_id = ANY(array_agg(t.task_id)))
        FROM tasks t
        WHERE t.task_id = ANY($1) OR t.parent_task_id = ANY($1)
        GROUP BY 1
        ORDER BY 1
        "#,
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    println!(
        "{:<28} {:>6} {:>9} {:>10} {:>10} {:>7} {:>8}",
        "template", "tasks", "complete", "p50 ms", "p95 ms", "steps", "retries"
    );
    let (mut total_tasks, mut total_steps) = (0, 0);
    for (template, tasks, complete, p50, p95, steps, retries) in rows {
        total_tasks += tasks;
        total_steps += steps;
        println!(
            "{template:<28} {tasks:>6} {complete:>9} {p50:>10.0} {p95:>10.0} {steps:>7} {retries:>8}"
        );
    }
    println!(
        "\n{total_tasks} tasks ({} submitted, the rest child tasks), {total_steps} steps in {:.1}s ({:.0} steps/s, debug build, including the retries' backoff)",
        ids.len(),
        wall.as_secs_f64(),
        total_steps as f64 / wall.as_secs_f64()
    );
    Ok(())
}
