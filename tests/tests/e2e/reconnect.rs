//! A worker's broker connection cut at each stage of a step: the worker reconnects by
//! itself, consumes again within 30 s, and the task completes with every step applied
//! once. The connection is closed from the broker's side (`rabbitmqctl close_connection`),
//! as a network fault or an operator would; a failpoint holds the step at the stage until
//! the connection is gone.

use std::time::Duration;

use serde_json::json;
use tasker_tests::relay::Relay;
use tasker_tests::{TaskStatus, TestEnv, binary, close_broker_connections, wait_for_consumers};

const TEMPLATE: &str = "namespace: cut\nname: pair\nsteps:\n  - name: first\n    handler: tasker.sleep\n    config: {ms: 1500}\n  - name: second\n    handler: tasker.noop\n    depends_on: [first]\n";

async fn cut_at(stage: &str) {
    let mut env = TestEnv::start(&format!("cut-{stage}")).await.unwrap();
    env.register_template(TEMPLATE).await.unwrap();
    let worker_id = format!("{}-{stage}", env.prefix);
    env.start_worker_with(
        binary("tasker-worker"),
        &worker_id,
        &["cut"],
        4,
        &[
            ("TASKER_FAILPOINT_PAUSE_AT", stage),
            ("TASKER_HEARTBEAT_INTERVAL_MS", "200"),
        ],
    )
    .await
    .unwrap();
    let task = env
        .api
        .create_task(&json!({"namespace": "cut", "name": "pair", "context": {}}))
        .await
        .unwrap();
    env.workers[0]
        .wait_for_log(
            &format!("failpoint: paused at {stage}"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let closed = close_broker_connections(&format!("tasker-worker {worker_id}"))
        .await
        .unwrap();
    assert_eq!(closed, 1, "the worker has one connection");

    let back = wait_for_consumers(&env.queue("cut"), 1, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("cut at {stage}: the worker did not consume again: {e}"));
    let task = env
        .api
        .wait_for_task(
            task.task_id,
            &[TaskStatus::Complete, TaskStatus::Error],
            Duration::from_secs(90),
        )
        .await
        .unwrap();
    assert_eq!(
        task.status,
        TaskStatus::Complete,
        "cut at {stage}: {task:#?}"
    );
    assert!(
        env.workers[0].running(),
        "cut at {stage}: the worker exited"
    );
    assert!(
        env.workers[0].log().contains("reconnected to RabbitMQ"),
        "cut at {stage}: no reconnect logged"
    );
    let twice: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
        "SELECT step_id, count(*) FROM step_transitions WHERE to_status = 'complete'
         GROUP BY step_id HAVING count(*) > 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert!(twice.is_empty(), "cut at {stage}: applied twice: {twice:?}");
    eprintln!(
        "cut at {stage}: consuming again {:.1} s after the cut",
        back.as_secs_f64()
    );
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_worker_comes_back_after_its_connection_is_cut_while_receiving() {
    cut_at("received").await;
}

#[tokio::test]
async fn a_worker_comes_back_after_its_connection_is_cut_while_running() {
    cut_at("running").await;
}

#[tokio::test]
async fn a_worker_comes_back_after_its_connection_is_cut_while_publishing() {
    cut_at("publishing").await;
}

#[tokio::test]
async fn a_worker_comes_back_after_its_connection_is_cut_while_acking() {
    cut_at("acking").await;
}

#[tokio::test]
async fn a_worker_comes_back_after_its_connection_is_cut_while_heartbeating() {
    cut_at("heartbeating").await;
}

/// The broker closes a channel, not the connection, when a publish names an exchange that
/// is gone (here an operator deleted the steps exchange). The coordinator notices its
/// closed channel, connects again, declares what is missing, and publishes the step it
/// could not: the task completes. (A closed channel never opens again: without that, no
/// step would be dispatched until the coordinator restarted.)
#[tokio::test]
async fn the_coordinator_comes_back_after_the_broker_closes_its_publishing_channel() {
    let mut env = TestEnv::start("cut-channel").await.unwrap();
    let (status, body) = env
        .register_template(
            "namespace: lone\nname: one\nsteps:\n  - {name: only, handler: tasker.noop}\n",
        )
        .await
        .unwrap();
    assert!(status.is_success(), "{body}");
    env.start_worker("channel-worker", &["lone"]).await.unwrap();
    let run = || {
        env.run_task(
            json!({"namespace": "lone", "name": "one"}),
            Duration::from_secs(60),
        )
    };
    assert_eq!(run().await.unwrap()["status"], "complete");

    let (connection, channel) = tasker_tests::confirm_channel().await;
    channel
        .exchange_delete(
            format!("{}.steps", env.prefix).as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "OK".into()).await;

    for _ in 0..2 {
        let task = run().await.unwrap();
        assert_eq!(task["status"], "complete", "{task:#}");
        assert_eq!(TestEnv::step(&task, "only")["attempts"], 1, "{task:#}");
    }
    env.finish().await.unwrap();
}

/// A coordinator that reconnects declares every namespace's queue again before it
/// publishes: a queue the broker lost meanwhile (an operator deleted it, a node came
/// back without its definitions) is there again at once, not at its first publish.
#[tokio::test]
async fn a_coordinator_declares_the_namespaces_queues_again_when_it_reconnects() {
    let env = TestEnv::start("redeclare").await.unwrap();
    let (status, body) = env
        .register_template(
            "namespace: again\nname: one\nsteps:\n  - {name: only, handler: tasker.noop}\n",
        )
        .await
        .unwrap();
    assert!(status.is_success(), "{body}");
    let queue = env.queue("again");
    assert!(tasker_tests::queue_exists(&queue).await.unwrap());
    tasker_tests::delete_queue(&queue).await.unwrap();
    assert!(!tasker_tests::queue_exists(&queue).await.unwrap());

    let coordinator = format!("tasker-coordinator {}", env.prefix);
    let closed = tasker_tests::close_broker_connections(&coordinator)
        .await
        .unwrap();
    assert_eq!(closed, 1, "the coordinator has one broker connection");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !tasker_tests::queue_exists(&queue).await.unwrap() {
        assert!(
            std::time::Instant::now() < deadline,
            "{queue} not declared again 30 s after the coordinator lost its connection"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.finish().await.unwrap();
}

/// A worker whose every handler slot is busy still watches its connection: cut while a
/// long step runs and the next delivery waits for the slot, it reconnects at once (not
/// when the step ends), goes on beating for the running step on the new connection, and
/// the waiting step runs from the copy the broker hands back.
#[tokio::test]
async fn a_worker_with_every_slot_busy_comes_back_at_once_after_its_connection_is_cut() {
    let options = tasker_tests::EnvOptions {
        coordinator_env: vec![("TASKER_HEARTBEAT_LEASE_MS".into(), "12000".into())],
        ..Default::default()
    };
    let mut env = TestEnv::start_with("cut-busy", options).await.unwrap();
    env.register_template(
        "namespace: busy\nname: long\nsteps:\n  - name: one\n    handler: tasker.sleep\n    config: {ms: 25000}\n",
    )
    .await
    .unwrap();
    let worker_id = format!("{}-busy", env.prefix);
    env.start_worker_with(
        binary("tasker-worker"),
        &worker_id,
        &["busy"],
        1,
        &[("TASKER_HEARTBEAT_INTERVAL_MS", "300")],
    )
    .await
    .unwrap();
    let create = json!({"namespace": "busy", "name": "long", "context": {}});
    let first = env.api.create_task(&create).await.unwrap().task_id;
    let second = env.api.create_task(&create).await.unwrap().task_id;
    env.api
        .wait_until(first, "step one running", Duration::from_secs(30), |t| {
            t.step("one").status == tasker_tests::StepStatus::InProgress
        })
        .await
        .unwrap();
    // The second step's message is delivered (the prefetch is twice the concurrency) and
    // waits for the one slot: none is left ready in the queue.
    tasker_tests::wait_until_taken(&env.queue("busy"), Duration::from_secs(30))
        .await
        .expect("the worker takes the second step's message");

    let closed = close_broker_connections(&format!("tasker-worker {worker_id}"))
        .await
        .unwrap();
    assert_eq!(closed, 1, "the worker has one connection");
    // The running step has about 20 s left.
    env.workers[0]
        .wait_for_log("reconnected to RabbitMQ", Duration::from_secs(12))
        .await
        .expect("the worker reconnects while its one slot is still busy");

    for task_id in [first, second] {
        let task = env
            .api
            .wait_for_task(
                task_id,
                &[TaskStatus::Complete, TaskStatus::Error],
                Duration::from_secs(120),
            )
            .await
            .unwrap();
        assert_eq!(task.status, TaskStatus::Complete, "{task:#?}");
        let history = crate::step_history(&env.pool, task_id).await;
        assert!(
            history
                .iter()
                .all(|(_, _, _, reason, _)| reason != "lease_expired"),
            "the running step's heartbeats went on over the new connection: {history:?}"
        );
    }
    env.finish().await.unwrap();
}

/// The broker closes a worker's channel, not its connection, on a channel error: here the
/// control exchange its heartbeats report to was deleted. The worker notices the closed
/// channel, connects again (declaring the exchange anew) and its running step completes.
#[tokio::test]
async fn a_worker_comes_back_after_the_broker_closes_one_of_its_channels() {
    let mut env = TestEnv::start("cut-worker-channel").await.unwrap();
    env.register_template(
        "namespace: beat\nname: one\nsteps:\n  - name: only\n    handler: tasker.sleep\n    config: {ms: 3000}\n",
    )
    .await
    .unwrap();
    env.start_worker_with(
        binary("tasker-worker"),
        "channel-worker",
        &["beat"],
        4,
        &[("TASKER_HEARTBEAT_INTERVAL_MS", "200")],
    )
    .await
    .unwrap();
    let task = env
        .api
        .create_task(&json!({"namespace": "beat", "name": "one", "context": {}}))
        .await
        .unwrap();
    env.api
        .wait_until(task.task_id, "step running", Duration::from_secs(30), |t| {
            t.step("only").status == tasker_tests::StepStatus::InProgress
        })
        .await
        .unwrap();

    let (connection, channel) = tasker_tests::confirm_channel().await;
    channel
        .exchange_delete(
            format!("{}.control", env.prefix).as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "OK".into()).await;

    env.workers[0]
        .wait_for_log("reconnected to RabbitMQ", Duration::from_secs(30))
        .await
        .expect("the worker reconnects after the broker closed its heartbeat channel");
    let task = env
        .api
        .wait_for_task(
            task.task_id,
            &[TaskStatus::Complete, TaskStatus::Error],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(task.status, TaskStatus::Complete, "{task:#?}");
    env.finish().await.unwrap();
}

/// A relay to RabbitMQ, to cut: the broker is then away for whoever connects through it
/// (a network outage), while the tests beside go on.
async fn broker_relay() -> Relay {
    let broker = reqwest::Url::parse(&tasker_tests::amqp_url()).unwrap();
    let broker = format!(
        "{}:{}",
        broker.host_str().unwrap(),
        broker.port().unwrap_or(5672)
    );
    Relay::start(broker).await
}

/// While RabbitMQ stays away, a worker counts a broker error at every attempt to connect
/// again, not once: an alert on the errors' increase holds for the whole outage.
#[tokio::test]
async fn broker_errors_keep_counting_while_the_broker_stays_away() {
    let mut env = TestEnv::start("away").await.unwrap();
    let relay = broker_relay().await;
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", relay.port);
    let (_, metrics) = env
        .start_metered_worker_with("away", &["away"], 2, &[("AMQP_URL", url.as_str())])
        .await
        .unwrap();
    relay.cut();
    let errors =
        tasker_tests::wait_for_metric(&metrics, "tasker_worker_broker_errors_total", 3.0).await;
    assert!(errors >= 3.0, "{errors}");
    env.finish().await.unwrap();
}

/// A coordinator that loses RabbitMQ drops its queue gauges instead of exporting the
/// last values it read (a `max` over coordinators would let an old consumer count hide
/// a queue nobody consumes any more), and reads them again once it is back.
#[tokio::test]
async fn a_coordinator_without_its_broker_drops_its_queue_gauges() {
    let relay = broker_relay().await;
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", relay.port);
    let env = TestEnv::start_with(
        "gauges-away",
        tasker_tests::EnvOptions {
            coordinator_env: vec![
                ("AMQP_URL".into(), url),
                ("TASKER_GAUGE_INTERVAL_MS".into(), "200".into()),
            ],
            ..tasker_tests::EnvOptions::default()
        },
    )
    .await
    .unwrap();
    env.register_template(TEMPLATE).await.unwrap();
    let results = format!("tasker_queue_consumers{{queue=\"{}.results\"}}", env.prefix);
    tasker_tests::wait_for_metric(&env.metrics_url(), &results, 1.0).await;
    relay.cut();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = reqwest::get(env.metrics_url())
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if !text.contains("tasker_queue_consumers{") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue gauges stayed:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.finish().await.unwrap();
}

/// A step that fails once, so its task needs the dispatcher to claim its retry.
const SILENT_TEMPLATE: &str = r"
name: after_silence
namespace: silent
version: 1.0.0
steps:
  - {name: flaky, handler: tasker.fail, config: {times: 1}, retry_limit: 3, backoff: {schedule: [0.2]}}
  - {name: last, handler: tasker.noop, depends_on: [flaky]}
";

/// PostgreSQL's host vanishing without closing its sockets (a failover that moves its
/// address elsewhere, a dropped NAT mapping) leaves every statement a coordinator had
/// sent without an answer, for ever: TCP tells nothing, and the driver sets no keepalive.
/// The coordinator gives up on them after `TASKER_DB_ANSWER_TIMEOUT_MS`, closes those
/// connections and goes on with new ones: tasks are created again, a retry is claimed,
/// and the events relay catches up.
#[tokio::test]
async fn a_coordinator_goes_on_when_postgresql_stops_answering_its_connections() {
    let (relay, mut env) = behind_a_database_relay("silent-database").await;
    env.register_templates(&[SILENT_TEMPLATE]).await;
    env.start_worker("silent", &["silent"]).await.unwrap();

    // Statements in flight: the loops' next ones wait for a lock the test holds, over the
    // relay, until both connections of the pool are taken by such waits. Silenced for
    // ever, they would leave the coordinator no connection at all.
    let mut hold = env.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE steps IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *hold)
        .await
        .unwrap();
    tasker_tests::wait_for_lock_waiters(&env.pool, "", 2).await;
    relay.silence();
    // Their answers now go nowhere.
    hold.commit().await.unwrap();

    // Created once a connection is to be had; the key makes a retried request one task.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let task_id = loop {
        let (status, body) = env
            .create_task(json!({
                "namespace": "silent",
                "name": "after_silence",
                "version": "1.0.0",
                "context": {},
                "idempotency_key": "after-silence",
            }))
            .await
            .unwrap();
        if status.is_success() {
            break body["task_id"].as_str().unwrap().to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no task created within 90 s of PostgreSQL going silent: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let task = env
        .wait_for_task(&task_id, &["complete", "error"], Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(task["status"], "complete", "{task:#}");
    assert_eq!(TestEnv::step(&task, "flaky")["attempts"], 2, "{task:#}");
    let newest = env.newest_transition_id().await.unwrap();
    env.wait_for_relay(newest, Duration::from_secs(30))
        .await
        .unwrap();
    env.coordinator
        .wait_for_log(
            "PostgreSQL did not answer within 2s",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    env.finish().await.unwrap();
}

/// A task that waits for a signal, for ever.
const HELD_TEMPLATE: &str = "namespace: silent\nname: held\nversion: 1.0.0\nsteps:\n  \
    - {name: hold, handler: tasker.wait, config: {signal: go}}\n";

/// An API request whose statement PostgreSQL stops answering (its host vanished) is
/// answered 503 `database_unavailable` once `TASKER_DB_ANSWER_TIMEOUT_MS` has passed,
/// rather than waiting for ever; and the connection it held, still owed its answer, is
/// closed after as long again rather than waited on, so the API serves again (without
/// that, the driver's check of a returned connection holds it until TCP gives up).
#[tokio::test]
async fn api_requests_end_when_postgresql_stops_answering_them() {
    let (relay, mut env) = behind_a_database_relay("silent-requests").await;
    env.register_templates(&[HELD_TEMPLATE]).await;
    let (status, body) = env
        .create_task(json!({"namespace": "silent", "name": "held", "context": {}}))
        .await
        .unwrap();
    assert!(status.is_success(), "{status} {body}");
    let task_id = body["task_id"].as_str().unwrap().to_owned();
    // Started, its step waiting for its signal: no loop touches the task's row any more.
    env.wait_for_task(&task_id, &["in_progress"], Duration::from_secs(30))
        .await
        .unwrap();

    // Two cancels, each waiting for the task's row over the relay: the pool's two
    // connections. Silenced, their answers go nowhere.
    let mut hold = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM tasks WHERE task_id = $1::uuid FOR UPDATE")
        .bind(&task_id)
        .execute(&mut *hold)
        .await
        .unwrap();
    let cancels: Vec<_> = (0..2)
        .map(|_| {
            let request = env
                .http
                .post(format!("{}/v1/tasks/{task_id}/cancel", env.base_url))
                .timeout(Duration::from_secs(60))
                .json(&json!({}));
            tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                let response = request.send().await.expect("an answer within 60 s");
                let status = response.status();
                let body: serde_json::Value = response.json().await.unwrap();
                (status, body, started.elapsed())
            })
        })
        .collect();
    tasker_tests::wait_for_lock_waiters(&env.pool, "FROM tasks WHERE task_id = $1 FOR UPDATE", 2)
        .await;
    relay.silence();
    hold.commit().await.unwrap();
    for cancel in cancels {
        let (status, body, took) = cancel.await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "database_unavailable", "{body}");
        // 2 s of patience, from when the request asked the pool for its connection.
        assert!(took < Duration::from_secs(20), "answered after {took:?}");
    }

    // Both connections were owed answers that never come: closed, and the pool serves.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, task) = env.get(&format!("/v1/tasks/{task_id}")).await.unwrap();
        if status == 200 {
            assert_eq!(task["task_id"], task_id.as_str(), "{task:#}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the API still answers {status} 30 s after its requests were given up: {task}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    env.coordinator
        .wait_for_log(
            "PostgreSQL did not answer within 2s (a connection from the pool included)",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    env.finish().await.unwrap();
}

/// A coordinator (a process: its log is read) whose pool of two reaches PostgreSQL
/// through a relay the test can silence, giving up on work after 2 s.
async fn behind_a_database_relay(name: &str) -> (Relay, TestEnv) {
    let server = reqwest::Url::parse(&tasker_tests::postgres_server()).unwrap();
    let relay = Relay::start(format!(
        "{}:{}",
        server.host_str().unwrap(),
        server.port().unwrap_or(5432)
    ))
    .await;
    let mut through_relay = server.clone();
    through_relay.set_host(Some("127.0.0.1")).unwrap();
    through_relay.set_port(Some(relay.port)).unwrap();
    let env = TestEnv::start_with(
        name,
        tasker_tests::EnvOptions {
            database_server: Some(through_relay.as_str().trim_end_matches('/').to_owned()),
            coordinator_env: vec![
                ("TASKER_DB_ANSWER_TIMEOUT_MS".into(), "2000".into()),
                ("TASKER_DB_POOL_SIZE".into(), "2".into()),
                ("TASKER_POLL_INTERVAL_MS".into(), "200".into()),
            ],
            binary_coordinator: true,
            ..tasker_tests::EnvOptions::default()
        },
    )
    .await
    .unwrap();
    (relay, env)
}
