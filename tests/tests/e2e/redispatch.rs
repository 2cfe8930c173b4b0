//! Re-dispatch only what may be lost: a confirmed step waits in its queue however long
//! the queue is, and a step whose queue was deleted (and perhaps declared again, empty)
//! is dispatched again.

use std::time::{Duration, Instant};

use serde_json::json;
use tasker_tests::{EnvOptions, StatusCode, TestEnv, amqp_url, metric};

const TEMPLATE: &str =
    "namespace: backlog\nname: one\nsteps:\n  - name: only\n    handler: tasker.noop\n";
const TASKS: usize = 20;

/// A coordinator whose dispatch lease (1 s) is far shorter than the time its steps wait.
async fn short_lease(test: &str) -> TestEnv {
    let options = EnvOptions {
        coordinator_env: vec![("TASKER_DISPATCH_LEASE_MS".into(), "1000".into())],
        ..EnvOptions::default()
    };
    let env = TestEnv::start_with(test, options).await.unwrap();
    env.register_template(TEMPLATE).await.unwrap();
    env
}

async fn create_tasks(env: &TestEnv) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..TASKS {
        let (status, task) = env
            .create_task(json!({"namespace": "backlog", "name": "one", "context": {"i": i}}))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::CREATED, "{task}");
        ids.push(task["task_id"].as_str().unwrap().to_owned());
    }
    ids
}

/// Steps `enqueued` with no lease: their publish was confirmed.
async fn confirmed(env: &TestEnv) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM steps WHERE status = 'enqueued' AND lease_expires_at IS NULL",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

async fn reasons(env: &TestEnv, reason: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM step_transitions WHERE reason = $1")
        .bind(reason)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

async fn wait_until_confirmed(env: &TestEnv) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while confirmed(env).await < TASKS as i64 {
        assert!(Instant::now() < deadline, "steps not confirmed in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run_all(env: &mut TestEnv, ids: &[String]) {
    env.start_worker("drainer", &["backlog"]).await.unwrap();
    for id in ids {
        let task = env
            .wait_for_task(id, &["complete", "error"], Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(task["status"], "complete");
    }
}

#[tokio::test]
async fn a_confirmed_step_waits_in_its_queue_past_the_dispatch_lease_and_runs_once() {
    let mut env = short_lease("confirmed-waits").await;
    let ids = create_tasks(&env).await;
    wait_until_confirmed(&env).await;
    // No worker: the steps wait. Several leases and sweeps (every 500 ms here) go by;
    // the queue check runs each sweep and finds every message in the queue.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        confirmed(&env).await,
        TASKS as i64,
        "still waiting, no lease"
    );
    assert_eq!(
        reasons(&env, "lease_lost").await,
        0,
        "nothing dispatched again"
    );

    run_all(&mut env, &ids).await;
    let metrics = format!("{}/metrics", env.base_url);
    assert_eq!(
        metric(&metrics, "tasker_stale_results_dropped_total").await,
        0.0
    );
    assert_eq!(
        metric(
            &metrics,
            "tasker_leases_expired_total{reason=\"lease_lost\"}"
        )
        .await,
        0.0
    );
    assert_eq!(reasons(&env, "lease_lost").await, 0);
    env.finish().await.unwrap();
}

/// Delete the namespace's queue (with every step message in it), and declare it again
/// empty when `declare_again`, as a worker starting meanwhile would.
async fn lose_queue(env: &TestEnv, declare_again: bool) {
    let connection =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let deleted = channel
        .queue_delete(env.queue("backlog").into(), Default::default())
        .await
        .unwrap();
    assert_eq!(deleted, TASKS as u32, "the queue held every step");
    if declare_again {
        tasker_shared::broker::Topology::new(env.prefix.clone())
            .declare_namespace(&channel, "backlog")
            .await
            .unwrap();
    }
    let _ = connection.close(200, "OK".into()).await;
}

/// Wait until the coordinator counted every step as lost for `reason`, then run them.
async fn lost_then_run(env: &mut TestEnv, ids: &[String], reason: &str) {
    let metrics = format!("{}/metrics", env.base_url);
    let sample = format!("tasker_lost_messages_total{{reason=\"{reason}\"}}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&metrics, &sample).await < TASKS as f64 {
        assert!(
            Instant::now() < deadline,
            "the lost messages ({reason}) were not noticed in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run_all(env, ids).await;
    assert_eq!(
        reasons(env, "lease_lost").await,
        TASKS as i64,
        "each lost step dispatched again once"
    );
    let attempts: i64 = sqlx::query_scalar("SELECT sum(attempts)::bigint FROM steps")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(attempts, TASKS as i64, "a lost message costs no attempt");
}

#[tokio::test]
async fn steps_whose_queue_was_deleted_are_dispatched_again() {
    let mut env = short_lease("queue-deleted").await;
    let ids = create_tasks(&env).await;
    wait_until_confirmed(&env).await;
    lose_queue(&env, false).await;
    lost_then_run(&mut env, &ids, "queue_missing").await;
    env.finish().await.unwrap();
}

#[tokio::test]
async fn steps_whose_queue_was_deleted_and_declared_again_are_dispatched_again() {
    let mut env = short_lease("queue-redeclared").await;
    let ids = create_tasks(&env).await;
    wait_until_confirmed(&env).await;
    lose_queue(&env, true).await;
    lost_then_run(&mut env, &ids, "queue_short").await;
    env.finish().await.unwrap();
}
