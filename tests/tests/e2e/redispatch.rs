//! Re-dispatch only what may be lost: a confirmed step waits in its queue however long
//! the queue is (also when the coordinator that published it stops before its usual
//! lift of the lease), and a step whose queue was deleted, or emptied (as a queue lost
//! and declared again is), is dispatched again.

use std::time::{Duration, Instant};

use serde_json::json;
use tasker_tests::{
    EnvOptions, StatusCode, TaskStatus, TestEnv, amqp_url, metric, wait_for_metric,
};
use uuid::Uuid;

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

/// `count` tasks of the backlog's template `name`.
async fn create_tasks(env: &TestEnv, name: &str, count: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for i in 0..count {
        let task = env
            .api
            .create_task(&json!({"namespace": "backlog", "name": name, "context": {"i": i}}))
            .await
            .unwrap();
        ids.push(task.task_id);
    }
    ids
}

/// Steps of the backlog `enqueued` with no lease: their publish was confirmed.
async fn confirmed(env: &TestEnv) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM steps s JOIN tasks t USING (task_id)
         WHERE t.namespace = 'backlog' AND s.status = 'enqueued' AND s.lease_expires_at IS NULL",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

/// Step transitions of `namespace` for `reason`.
async fn reasons_in(env: &TestEnv, namespace: &str, reason: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM step_transitions h JOIN tasks t USING (task_id)
         WHERE t.namespace = $1 AND h.reason = $2",
    )
    .bind(namespace)
    .bind(reason)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

/// Step transitions of the backlog for `reason`.
async fn reasons(env: &TestEnv, reason: &str) -> i64 {
    reasons_in(env, "backlog", reason).await
}

async fn wait_until_confirmed(env: &TestEnv, steps: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while confirmed(env).await < steps as i64 {
        assert!(Instant::now() < deadline, "steps not confirmed in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run_all(env: &mut TestEnv, ids: &[Uuid]) {
    env.start_worker("drainer", &["backlog"]).await.unwrap();
    for id in ids {
        let task = env
            .api
            .wait_for_task(
                *id,
                &[TaskStatus::Complete, TaskStatus::Error],
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(task.status, TaskStatus::Complete, "{task:#?}");
    }
}

/// A one-step task of namespace `canary`, whose step message is confirmed when this
/// returns.
async fn canary(env: &TestEnv, canary: &str) {
    let template = TEMPLATE.replace("backlog", canary);
    let (status, body) = env.register_template(&template).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let task = env
        .api
        .create_task(&json!({"namespace": canary, "name": "one"}))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM steps WHERE task_id = $1
             AND status = 'enqueued' AND lease_expires_at IS NULL",
        )
        .bind(task.task_id)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        if waiting == 1 {
            return;
        }
        assert!(Instant::now() < deadline, "{canary}: not confirmed in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Delete `canary`'s queue, and wait until a sweep has found its message lost and
/// dispatched its step again: a sweep that compared every namespace whose confirmed
/// steps waited past the lease with its queue, and then expired leases.
async fn sweep_past(env: &TestEnv, canary: &str) {
    assert_eq!(
        lose_messages(&env.queue(canary), Loss::Deleted).await,
        1,
        "{canary}'s message"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while reasons_in(env, canary, "lease_lost").await == 0 {
        assert!(
            Instant::now() < deadline,
            "{canary}: the lost message was not noticed in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_confirmed_step_waits_in_its_queue_past_the_dispatch_lease_and_runs_once() {
    let mut env = short_lease("confirmed-waits").await;
    let ids = create_tasks(&env, "one", TASKS).await;
    wait_until_confirmed(&env, TASKS).await;
    // No worker: the steps wait. Proof that sweeps looked at them past their lease: two
    // canaries, confirmed after the backlog, whose queues are deleted one after the
    // other. The sweep that notices the second one's loss runs after the one that
    // noticed the first one's had finished, and both compared the backlog's queue (its
    // steps waited longer than the canaries') and expired leases: two queue checks in a
    // row, enough to act on a shortfall, and two lease sweeps.
    canary(&env, "canary1").await;
    canary(&env, "canary2").await;
    sweep_past(&env, "canary1").await;
    sweep_past(&env, "canary2").await;
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
    let metrics = env.metrics_url();
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
        2.0,
        "the canaries' steps, and nothing else, dispatched again"
    );
    assert_eq!(reasons(&env, "lease_lost").await, 0);
    env.finish().await.unwrap();
}

/// How a test loses a step queue's messages behind Tasker's back.
#[derive(Clone, Copy)]
enum Loss {
    /// The queue is deleted with them.
    Deleted,
    /// The queue stays, empty: as one lost and declared again (by a worker starting
    /// meanwhile), or purged. Emptied in one step, with a purge: a delete then a declare
    /// lets a queue check that falls in between find the queue missing instead.
    Emptied,
}

/// Lose `queue`'s messages behind Tasker's back (`loss` says how); returns how many it
/// held.
async fn lose_messages(queue: &str, loss: Loss) -> u32 {
    let connection =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let lost = match loss {
        Loss::Deleted => channel.queue_delete(queue.into(), Default::default()).await,
        Loss::Emptied => channel.queue_purge(queue.into(), Default::default()).await,
    };
    let _ = connection.close(200, "OK".into()).await;
    lost.unwrap()
}

/// Lose the backlog queue's step messages; checks that it held every step.
async fn lose_queue(env: &TestEnv, loss: Loss) {
    let queue = env.queue("backlog");
    let carried = tasker_tests::queued_steps(&queue).await.unwrap();
    assert_eq!(
        carried.iter().sum::<usize>(),
        TASKS,
        "the queue held every step"
    );
    let lost = lose_messages(&queue, loss).await;
    assert_eq!(lost as usize, carried.len(), "in these messages");
}

/// Wait until the coordinator counted every step as lost for `reason`, then run them.
async fn lost_then_run(env: &mut TestEnv, ids: &[Uuid], reason: &str) {
    let metrics = env.metrics_url();
    let sample = format!("tasker_lost_messages_total{{reason=\"{reason}\"}}");
    wait_for_metric(&metrics, &sample, TASKS as f64).await;
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
    let ids = create_tasks(&env, "one", TASKS).await;
    wait_until_confirmed(&env, TASKS).await;
    lose_queue(&env, Loss::Deleted).await;
    lost_then_run(&mut env, &ids, "queue_missing").await;
    env.finish().await.unwrap();
}

#[tokio::test]
async fn steps_whose_queue_was_emptied_are_dispatched_again() {
    let mut env = short_lease("queue-emptied").await;
    let ids = create_tasks(&env, "one", TASKS).await;
    wait_until_confirmed(&env, TASKS).await;
    lose_queue(&env, Loss::Emptied).await;
    lost_then_run(&mut env, &ids, "queue_short").await;
    env.finish().await.unwrap();
}

/// Announce (or, with `interval_ms` 1, retire at once) a worker of the backlog that
/// consumes nothing: the queue check counts twice its `concurrency` in messages as held.
async fn announce_worker(env: &TestEnv, concurrency: u16, interval_ms: u64) {
    let (connection, channel) = tasker_tests::confirm_channel().await;
    let status = json!({"type": "worker_status", "worker_id": "holder", "namespaces": ["backlog"],
                        "all_namespaces": false, "concurrency": concurrency, "in_flight": 0,
                        "interval_ms": interval_ms});
    tasker_tests::publish(
        &channel,
        &format!("{}.control", env.prefix),
        "",
        status.to_string().as_bytes(),
    )
    .await;
    let _ = connection.close(200, "OK".into()).await;
}

/// Steps of the backlog dispatched again because their queue was found short.
const QUEUE_SHORT: &str = "tasker_lost_messages_total{reason=\"queue_short\"}";

/// Its value now.
async fn lost(env: &TestEnv) -> f64 {
    metric(&env.metrics_url(), QUEUE_SHORT).await
}

#[tokio::test]
async fn a_short_queue_is_counted_in_messages_whatever_each_carries() {
    // Ten tasks whose two first steps travel together: ten messages of two steps. The
    // queue is emptied (as one lost and declared again is) while a worker that may hold
    // two messages (concurrency 1) is announced. Eight messages are missing beyond what
    // it may hold: their sixteen steps are dispatched again, and no more while it is there.
    let options = EnvOptions {
        coordinator_env: vec![
            ("TASKER_DISPATCH_LEASE_MS".into(), "1000".into()),
            ("TASKER_SWEEP_INTERVAL_MS".into(), "500".into()),
        ],
        ..EnvOptions::default()
    };
    let mut env = TestEnv::start_with("queue-short-messages", options)
        .await
        .unwrap();
    env.register_template(
        "namespace: backlog\nname: pair\nsteps:\n  - {name: a, handler: tasker.noop}\n  - {name: b, handler: tasker.noop}\n",
    )
    .await
    .unwrap();
    // One at a time, each published before the next is created: steps claimed while
    // a publish waits for its confirm would join the next message (on a busy machine,
    // three tasks' steps in one).
    let mut ids = Vec::new();
    for i in 0..TASKS / 2 {
        ids.extend(create_tasks(&env, "pair", 1).await);
        wait_until_confirmed(&env, 2 * (i + 1)).await;
    }
    let carried = tasker_tests::queued_steps(&env.queue("backlog"))
        .await
        .unwrap();
    assert_eq!(
        carried,
        vec![2; TASKS / 2],
        "a task's first steps in one message"
    );

    announce_worker(&env, 1, 60_000).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, health) = env.get("/health/status").await.unwrap();
        if health["workers"].to_string().contains("holder") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker was never listed: {health}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lose_queue(&env, Loss::Emptied).await;
    let held = 2;
    let expected = ((TASKS / 2 - held) * 2) as f64;
    assert_eq!(
        wait_for_metric(&env.metrics_url(), QUEUE_SHORT, expected).await,
        expected,
        "the steps of the eight oldest messages"
    );
    // Several checks later, still those: the two others may be the worker's.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(lost(&env).await, expected);

    // Without that worker, they are missing too.
    announce_worker(&env, 1, 1).await;
    wait_for_metric(&env.metrics_url(), QUEUE_SHORT, TASKS as f64).await;
    run_all(&mut env, &ids).await;
    assert_eq!(lost(&env).await, TASKS as f64);
    assert_eq!(
        reasons(&env, "lease_lost").await,
        TASKS as i64,
        "each lost step dispatched again once"
    );
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_coordinator_that_stops_lifts_the_leases_of_its_confirmed_steps_first() {
    // A coordinator lifts a confirmed step's lease seconds after the confirm (5-10 s with
    // this lease), unless the step started meanwhile. Stopped before then, it lifts them
    // all on its way out: its backlog then waits in the queue without a lease, and no
    // coordinator dispatches it again.
    let env = TestEnv::start("redispatch-stop").await.unwrap();
    env.register_template(TEMPLATE).await.unwrap();
    let (mut second, url) = env
        .start_coordinator("stopping", &[("TASKER_DISPATCH_LEASE_MS", "600000")])
        .await
        .unwrap();
    let api = tasker_tests::Api::new(url);
    for i in 0..TASKS {
        api.create_task(&json!({"namespace": "backlog", "name": "one", "context": {"i": i}}))
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while tasker_tests::queued_steps(&env.queue("backlog"))
        .await
        .unwrap()
        .iter()
        .sum::<usize>()
        < TASKS
    {
        assert!(Instant::now() < deadline, "steps not published in 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = second.terminate().await.unwrap();
    assert!(status.success(), "{status:?}: {}", second.log());
    assert_eq!(
        confirmed(&env).await,
        TASKS as i64,
        "every step waits in its queue, its lease lifted"
    );
    assert_eq!(reasons(&env, "lease_lost").await, 0);
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_step_queue_deleted_while_no_worker_reads_it_is_declared_again_for_the_next_step() {
    let options = EnvOptions {
        coordinator_env: vec![
            ("TASKER_GAUGE_INTERVAL_MS".into(), "200".into()),
            ("TASKER_SWEEP_INTERVAL_MS".into(), "200".into()),
            ("TASKER_DISPATCH_LEASE_MS".into(), "1000".into()),
        ],
        ..EnvOptions::default()
    };
    let env = TestEnv::start_with("queue-deleted-idle", options)
        .await
        .unwrap();
    env.register_template(TEMPLATE).await.unwrap();
    let queue = env.queue("backlog");
    // Declared when its first template was registered.
    assert!(tasker_tests::broker::queue_exists(&queue).await.unwrap());
    lose_messages(&queue, Loss::Deleted).await;

    // Reading the gauges does not bring it back unbound.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !tasker_tests::broker::queue_exists(&queue).await.unwrap(),
        "the gauges declared the deleted queue"
    );

    // The next step's publish finds no queue; it is dispatched again, to a queue
    // declared and bound again, where a worker will find it.
    let ids = create_tasks(&env, "one", 1).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tasker_tests::broker::queue_messages(&queue).await.unwrap() == 0 {
        assert!(
            Instant::now() < deadline,
            "the step never reached its queue"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut env = env;
    run_all(&mut env, &ids).await;
    env.finish().await.unwrap();
}
