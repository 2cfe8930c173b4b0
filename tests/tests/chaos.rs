//! The chaos suite: break things on purpose during a run of multi-step workflows and
//! check that nothing is lost and nothing is applied twice.
//!
//! One run of at least 2,000 tasks, submitted
//! steadily while these faults are injected one at a time, each after the previous one
//! healed. Eight in ten are diamonds (four `tasker.sleep` steps); one in ten fans out
//! (`for_each`) over five parts and back in, and one in ten starts a diamond as a child
//! task (`tasker.task`), so instances, the fan-in and child tasks go through every fault
//! too:
//!
//! 1. a worker is killed with SIGKILL while it runs steps (then a new one is started);
//! 2. a second coordinator is killed with SIGKILL between committing a claim and
//!    publishing it (a failpoint holds it exactly there), then started again;
//! 3. one worker's broker connection is closed by the broker (`rabbitmqctl
//!    close_connection`), the broker and the other processes staying up;
//! 4. RabbitMQ is stopped and started again (`deploy/services.sh restart-broker`);
//! 5. PostgreSQL is stopped and started again (`deploy/services.sh restart-database`).
//!
//! Only the killed processes are restarted by the test: every other process must
//! reconnect by itself, and every worker must be consuming its queue again within 30 s of
//! the end of each fault. Afterwards every task is `complete`, no step has more than one
//! `complete` transition, no step used more attempts than its retry limit, every fan-in
//! has its five results, and every parent has exactly one child, whose leaf results its
//! step holds. The run
//! prints each fault, when it was injected, how long it lasted (a service restart), how
//! long after it the work in flight at the injection took to finish, and the extra
//! attempts it caused.
//!
//! The run is made twice: on classic queues and on quorum queues.
//!
//! It restarts the machine's PostgreSQL and RabbitMQ, so it is a test binary of its own
//! (cargo runs test binaries one after another) and must not run beside other tests (its
//! two runs take turns):
//! `cargo test -p tasker-tests --test chaos -- --nocapture`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::PgPool;
use tasker_tests::{
    EnvOptions, Process, StatusCode, TestEnv, binary, close_broker_connections, metric,
    wait_for_consumers,
};
use uuid::Uuid;

/// Tasks submitted in the run (at least; a few more go through the second coordinator).
const TASKS: usize = 2_000;
/// Submission pace: enough to keep every fault inside a busy system.
const SUBMIT_EVERY: Duration = Duration::from_millis(20);
const RETRY_LIMIT: i32 = 5;

fn template() -> String {
    let mut yaml = String::from("namespace: chaos\nname: diamond\nversion: 1.0.0\nsteps:\n");
    for (step, parents, ms) in [
        ("reserve", "", 40),
        ("charge", "reserve", 60),
        ("pack", "reserve", 30),
        ("ship", "charge, pack", 20),
    ] {
        yaml.push_str(&format!(
            "  - name: {step}\n    handler: tasker.sleep\n    depends_on: [{parents}]\n    \
             retry_limit: {RETRY_LIMIT}\n    config: {{ms: {ms}}}\n"
        ));
    }
    yaml
}

/// The fan-out: five parts between a split and a join.
const FAN: &str = "namespace: chaos\nname: fan\nversion: 1.0.0\nsteps:\n  \
    - {name: split, handler: tasker.sleep, config: {ms: 20}, retry_limit: 5}\n  \
    - {name: part, handler: tasker.sleep, config: {ms: 30}, retry_limit: 5, depends_on: [split], for_each: \"context.parts\"}\n  \
    - {name: join, handler: tasker.sleep, config: {ms: 10}, retry_limit: 5, depends_on: [part]}\n";
/// Steps of a fan task: split, part, its five instances, join.
const FAN_STEPS: i64 = 8;

/// A parent: its `sub` step starts a diamond as its child task.
const PARENT: &str = "namespace: chaos\nname: parent\nversion: 1.0.0\nsteps:\n  \
    - {name: prep, handler: tasker.sleep, config: {ms: 20}, retry_limit: 5}\n  \
    - {name: sub, handler: tasker.task, retry_limit: 5, depends_on: [prep], config: {namespace: chaos, name: diamond, context: '{\"order\": context.order, \"child\": true}'}}\n  \
    - {name: after, handler: tasker.sleep, config: {ms: 10}, retry_limit: 5, depends_on: [sub]}\n";
/// Steps of a parent task (its child is a diamond of its own).
const PARENT_STEPS: i64 = 3;

/// Create one task, idempotently: a failed or unanswered request is repeated with the
/// same key until the coordinator answers 200 or 201 (it may be without its database for
/// a while).
async fn submit(http: &reqwest::Client, base_url: &str, key: &str, n: usize) -> Duration {
    let started = Instant::now();
    let body = if n % 10 == 5 {
        json!({
            "namespace": "chaos", "name": "fan",
            "context": {"order": n, "parts": [1, 2, 3, 4, 5]}, "idempotency_key": key,
        })
    } else if n % 10 == 8 {
        json!({
            "namespace": "chaos", "name": "parent",
            "context": {"order": n}, "idempotency_key": key,
        })
    } else {
        json!({
            "namespace": "chaos", "name": "diamond",
            "context": {"order": n}, "idempotency_key": key,
        })
    };
    loop {
        let response = http
            .post(format!("{base_url}/v1/tasks"))
            .json(&body)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match response {
            Ok(r) if r.status() == StatusCode::CREATED || r.status() == StatusCode::OK => {
                return started.elapsed();
            }
            Ok(r) if r.status().is_client_error() => {
                panic!(
                    "task {key} refused: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Run a query until the database answers (it is restarted during the run).
async fn query_until_ok<T, F, Fut>(what: &str, f: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = sqlx::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match f().await {
            Ok(value) => return value,
            Err(error) if Instant::now() < deadline => {
                eprintln!("chaos: {what}: {error}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => panic!("{what}: {error}"),
        }
    }
}

/// Steps in flight now (claimed or running), with their attempts.
async fn in_flight(pool: &PgPool) -> Vec<(Uuid, i32)> {
    query_until_ok("steps in flight", || {
        sqlx::query_as(
            "SELECT step_id, attempts FROM steps WHERE status IN ('enqueued', 'in_progress')",
        )
        .fetch_all(pool)
    })
    .await
}

/// Wait until every worker consumes `queue` again, within [`CONSUMING_AGAIN_WITHIN`] of
/// the end of a fault; returns how long it took. Past it, the failure carries each
/// worker's last connection events, to tell which one stayed away and where it stood.
async fn every_worker_consuming(env: &TestEnv, queue: &str) -> Duration {
    let error = match wait_for_consumers(queue, WORKERS, CONSUMING_AGAIN_WITHIN).await {
        Ok(took) => return took,
        Err(error) => error,
    };
    let events = [
        "session lost",
        "lost the connection",
        "not reachable",
        "reconnected",
        "consuming",
    ];
    let workers: Vec<String> = env
        .workers
        .iter()
        .map(|worker| {
            let log = worker.log();
            let lines: Vec<&str> = log
                .lines()
                .filter(|line| events.iter().any(|event| line.contains(event)))
                .collect();
            let last = &lines[lines.len().saturating_sub(8)..];
            format!("{}:\n  {}", worker.name, last.join("\n  "))
        })
        .collect();
    panic!(
        "not every worker consumes again: {error}\n{}",
        workers.join("\n")
    )
}

/// Wait until every step of `snapshot` is complete; returns how long that took from
/// `since` and the attempts spent beyond those counted in the snapshot.
async fn healed(pool: &PgPool, snapshot: &[(Uuid, i32)], since: Instant) -> (Duration, i64) {
    let ids: Vec<Uuid> = snapshot.iter().map(|(id, _)| *id).collect();
    let before: i64 = snapshot.iter().map(|(_, a)| i64::from(*a)).sum();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (open, attempts): (i64, Option<i64>) = query_until_ok("healing", || {
            sqlx::query_as(
                "SELECT count(*) FILTER (WHERE status <> 'complete'), sum(attempts)::bigint
                 FROM steps WHERE step_id = ANY($1)",
            )
            .bind(&ids)
            .fetch_one(pool)
        })
        .await;
        if open == 0 {
            return (since.elapsed(), attempts.unwrap_or(0) - before);
        }
        assert!(
            Instant::now() < deadline,
            "{open} steps in flight at the fault did not complete within 180 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Workers consuming the chaos queue at every moment outside a fault.
const WORKERS: u32 = 3;

/// Every worker consumes again within this long after a fault ends.
const CONSUMING_AGAIN_WITHIN: Duration = Duration::from_secs(30);

struct FaultReport {
    fault: &'static str,
    at: Duration,
    /// How long the fault itself lasted (a service restart), zero for a kill.
    outage: Duration,
    /// From the end of the fault until every worker consumed again.
    consuming_again: Duration,
    in_flight: usize,
    recovered: Duration,
    extra_attempts: i64,
}

async fn services(action: &str) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("deploy/services.sh");
    let status = tokio::process::Command::new(script)
        .arg(action)
        .status()
        .await
        .expect("running deploy/services.sh");
    assert!(status.success(), "deploy/services.sh {action} failed");
}

/// The two runs restart the machine's services: one at a time.
static ONE_RUN_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_lost_or_applied_twice_under_crashes_and_restarts() {
    let _alone = ONE_RUN_AT_A_TIME.lock().await;
    run("classic").await;
}

/// The same faults with quorum queues (`TASKER_QUEUE_TYPE=quorum`), RabbitMQ's
/// replicated queue type: consumers, acks and redeliveries go through Raft.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_lost_or_applied_twice_on_quorum_queues() {
    let _alone = ONE_RUN_AT_A_TIME.lock().await;
    run("quorum").await;
}

async fn run(queue_type: &str) {
    eprintln!("chaos: {queue_type} queues");
    let options = EnvOptions {
        coordinator_env: [
            // A claim whose coordinator died is dispatched again after this long.
            ("TASKER_DISPATCH_LEASE_MS", "8000"),
            ("TASKER_HEARTBEAT_LEASE_MS", "3000"),
            ("TASKER_POLL_INTERVAL_MS", "1000"),
            ("TASKER_GAUGE_INTERVAL_MS", "1000"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        queue_type: Some(queue_type.to_owned()),
        // Processes: coordinators are killed and restarted, and paused at a failpoint.
        binary_coordinator: true,
        ..EnvOptions::default()
    };
    let mut env = TestEnv::start_with(&format!("chaos-{queue_type}"), options)
        .await
        .unwrap();
    for template in [template(), FAN.to_owned(), PARENT.to_owned()] {
        let (status, body) = env.register_template(&template).await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let worker_env = [("TASKER_HEARTBEAT_INTERVAL_MS", "500")];
    for id in ["w1", "w2", "w3"] {
        env.start_worker_with(binary("tasker-worker"), id, &["chaos"], 16, &worker_env)
            .await
            .unwrap();
    }
    let run_started = Instant::now();

    // The feeder: one task every SUBMIT_EVERY until the faults are done and TASKS are in.
    let submitted = Arc::new(AtomicUsize::new(0));
    let faults_done = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (http, base_url) = (env.http.clone(), env.base_url.clone());
        let (submitted, faults_done) = (submitted.clone(), faults_done.clone());
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let mut ticks = tokio::time::interval(SUBMIT_EVERY);
            loop {
                let n = submitted.load(Ordering::SeqCst);
                if n >= TASKS && faults_done.load(Ordering::SeqCst) {
                    return slowest;
                }
                ticks.tick().await;
                slowest = slowest.max(submit(&http, &base_url, &format!("chaos-{n}"), n).await);
                submitted.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let busy = |at_least: usize| {
        let submitted = submitted.clone();
        async move {
            while submitted.load(Ordering::SeqCst) < at_least {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let mut reports = Vec::new();
    let queue = env.queue("chaos");
    let mut coordinators: Vec<Process> = Vec::new();

    // 1. A worker killed with SIGKILL mid-step.
    busy(250).await;
    // Wait for a moment when it runs steps (started, as the coordinator recorded).
    let running_on_w1 = loop {
        let running: i64 = query_until_ok("steps running on w1", || {
            sqlx::query_scalar(
                "SELECT count(*) FROM steps s WHERE s.status = 'in_progress' AND EXISTS (
                     SELECT 1 FROM step_transitions t WHERE t.step_id = s.step_id
                     AND t.to_status = 'in_progress' AND t.metadata->>'worker_id' = 'w1')",
            )
            .fetch_one(&env.pool)
        })
        .await;
        if running > 0 {
            break running;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let snapshot = in_flight(&env.pool).await;
    let injected = Instant::now();
    env.workers[0].kill().await;
    env.start_worker_with(
        binary("tasker-worker"),
        "w1-restarted",
        &["chaos"],
        16,
        &worker_env,
    )
    .await
    .unwrap();
    let consuming_again = every_worker_consuming(&env, &queue).await;
    let (recovered, extra) = healed(&env.pool, &snapshot, injected).await;
    eprintln!("chaos: killed w1 while it ran {running_on_w1} steps");
    reports.push(FaultReport {
        fault: "worker SIGKILL mid-step",
        at: injected - run_started,
        outage: Duration::ZERO,
        consuming_again,
        in_flight: snapshot.len(),
        recovered,
        extra_attempts: extra,
    });

    // 2. A coordinator killed between committing a claim and publishing it. Tasks created
    // through it wake its dispatcher, which claims them and stops at the failpoint.
    let (mut doomed, doomed_url) = env
        .start_coordinator(
            "coordinator-2",
            &[("TASKER_FAILPOINT_PAUSE_AFTER_CLAIMS", "1")],
        )
        .await
        .unwrap();
    for k in 0..5 {
        submit(
            &env.http,
            &doomed_url,
            &format!("chaos-c2-{k}"),
            100_000 + k,
        )
        .await;
    }
    doomed
        .wait_for_log("failpoint: paused after claim", Duration::from_secs(30))
        .await
        .unwrap();
    let snapshot = in_flight(&env.pool).await;
    let injected = Instant::now();
    doomed.kill().await;
    let (restarted, _) = env
        .start_coordinator("coordinator-2-restarted", &[])
        .await
        .unwrap();
    coordinators.push(restarted);
    let consuming_again = every_worker_consuming(&env, &queue).await;
    let (recovered, extra) = healed(&env.pool, &snapshot, injected).await;
    reports.push(FaultReport {
        fault: "coordinator SIGKILL after claim",
        at: injected - run_started,
        outage: Duration::ZERO,
        consuming_again,
        in_flight: snapshot.len(),
        recovered,
        extra_attempts: extra,
    });

    // 3. One worker's broker connection closed by the broker.
    busy(submitted.load(Ordering::SeqCst) + 100).await;
    let snapshot = in_flight(&env.pool).await;
    let injected = Instant::now();
    let closed = close_broker_connections("tasker-worker w2").await.unwrap();
    assert_eq!(closed, 1, "w2 has one broker connection");
    let consuming_again = every_worker_consuming(&env, &queue).await;
    let (recovered, extra) = healed(&env.pool, &snapshot, injected).await;
    reports.push(FaultReport {
        fault: "worker connection closed",
        at: injected - run_started,
        outage: Duration::ZERO,
        consuming_again,
        in_flight: snapshot.len(),
        recovered,
        extra_attempts: extra,
    });

    // 4. RabbitMQ restarted, then 5. PostgreSQL restarted.
    for (fault, action) in [
        ("RabbitMQ restart", "restart-broker"),
        ("PostgreSQL restart", "restart-database"),
    ] {
        busy(submitted.load(Ordering::SeqCst) + 200).await;
        let snapshot = in_flight(&env.pool).await;
        let injected = Instant::now();
        services(action).await;
        let outage = injected.elapsed();
        let consuming_again = every_worker_consuming(&env, &queue).await;
        let (recovered, extra) = healed(&env.pool, &snapshot, injected).await;
        reports.push(FaultReport {
            fault,
            at: injected - run_started,
            outage,
            consuming_again,
            in_flight: snapshot.len(),
            recovered,
            extra_attempts: extra,
        });
    }

    faults_done.store(true, Ordering::SeqCst);
    let slowest_submit = feeder.await.unwrap();

    // Everything finishes.
    let deadline = Instant::now() + Duration::from_secs(300);
    let (tasks, open): (i64, i64) = loop {
        let counts: (i64, i64) = query_until_ok("task counts", || {
            sqlx::query_as(
                "SELECT count(*), count(*) FILTER (WHERE status <> 'complete') FROM tasks",
            )
            .fetch_one(&env.pool)
        })
        .await;
        if counts.1 == 0 || Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let elapsed = run_started.elapsed();
    let not_complete: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT task_id, status FROM tasks WHERE status <> 'complete' LIMIT 10")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let twice: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT step_id, count(*) FROM step_transitions WHERE to_status = 'complete'
         GROUP BY step_id HAVING count(*) > 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let (steps, extra_attempts, over_limit, max_attempts): (i64, i64, i64, i32) = sqlx::query_as(
        // A fanned-out step never runs itself (no attempt): only its instances do.
        "SELECT count(*), (sum(attempts) - count(*) FILTER (WHERE instances IS NULL))::bigint,
                count(*) FILTER (WHERE attempts > retry_limit), max(attempts)
         FROM steps",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let (fans, fanned_wrong): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM tasks WHERE name = 'fan'),
                (SELECT count(*) FROM steps
                 WHERE name = 'part' AND (results IS NULL OR jsonb_array_length(results) <> 5
                                          OR instances <> 5))",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    // Each parent has one child, a complete diamond whose leaf (`ship`) its step holds.
    let (parents, children, orphans, unheld): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM tasks WHERE name = 'parent'),
                (SELECT count(*) FROM tasks WHERE parent_task_id IS NOT NULL),
                (SELECT count(*) FROM tasks p WHERE p.name = 'parent'
                 AND (SELECT count(*) FROM tasks c WHERE c.parent_task_id = p.task_id) <> 1),
                (SELECT count(*) FROM steps s WHERE s.name = 'sub'
                 AND (s.results -> 'ship' ->> 'slept_ms' IS DISTINCT FROM '20'
                      OR s.child_task_id IS NULL))",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let reconnects = metric(
        &format!("{}/metrics", env.base_url),
        "tasker_broker_reconnects_total",
    )
    .await;

    let url = format!("{}/metrics", env.base_url);
    let redispatched = metric(&url, "tasker_leases_expired_total{reason=\"lease_lost\"}").await;
    let stale = metric(&url, "tasker_stale_results_dropped_total").await;
    println!(
        "\nchaos run: {tasks} tasks ({fans} fanning out, {parents} starting {children} child tasks), {steps} steps, 3 workers, 2 coordinators, {:.1} s",
        elapsed.as_secs_f64()
    );
    println!(
        "{:<32} {:>11} {:>9} {:>17} {:>10} {:>18} {:>14}",
        "fault",
        "injected at",
        "outage",
        "consuming again",
        "in flight",
        "healed after it",
        "extra attempts"
    );
    for r in &reports {
        println!(
            "{:<32} {:>9.1} s {:>7.1} s {:>15.1} s {:>10} {:>16.1} s {:>14}",
            r.fault,
            r.at.as_secs_f64(),
            r.outage.as_secs_f64(),
            r.consuming_again.as_secs_f64(),
            r.in_flight,
            r.recovered.saturating_sub(r.outage).as_secs_f64(),
            r.extra_attempts
        );
    }
    println!(
        "faults injected: {}; extra attempts in all: {}; most attempts of one step: {max_attempts} (limit {RETRY_LIMIT}); \
         steps completed twice: {}; tasks not complete: {open}; coordinator reconnects to RabbitMQ: {reconnects}; \
         slowest task submission: {:.1} s",
        reports.len(),
        extra_attempts,
        twice.len(),
        slowest_submit.as_secs_f64()
    );
    println!(
        "first coordinator: steps dispatched again (lease_lost): {redispatched}; stale results dropped: {stale}"
    );

    assert!(tasks >= TASKS as i64, "only {tasks} tasks were created");
    assert_eq!(open, 0, "tasks not complete: {not_complete:?}");
    assert!(
        twice.is_empty(),
        "steps with more than one complete transition: {twice:?}"
    );
    assert_eq!(
        over_limit, 0,
        "steps used more attempts than their retry limit"
    );
    assert!(fans > 0, "no task fanned out");
    assert!(parents > 0, "no task started a child");
    assert_eq!(
        steps,
        (tasks - fans - parents) * 4 + fans * FAN_STEPS + parents * PARENT_STEPS
    );
    assert_eq!(fanned_wrong, 0, "fan-ins without their five results");
    assert_eq!(
        children, parents,
        "child tasks: {children} for {parents} parents"
    );
    assert_eq!(orphans, 0, "parents without exactly one child");
    assert_eq!(
        unheld, 0,
        "child-task steps without their child's leaf results"
    );
    // Nobody restarted these: they reconnected by themselves.
    assert!(env.coordinator.running(), "the first coordinator exited");
    assert!(
        env.workers[1].running() && env.workers[2].running(),
        "a worker exited"
    );
    assert!(
        coordinators[0].running(),
        "the restarted coordinator exited"
    );
    assert!(
        reconnects >= 1.0,
        "the coordinator never reconnected to RabbitMQ"
    );
    for mut c in coordinators {
        let _ = c.terminate().await;
    }
    env.finish().await.unwrap();
}
