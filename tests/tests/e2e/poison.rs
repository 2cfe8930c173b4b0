//! Poison messages and oversized results, end to end.
//!
//! Messages are published straight to the broker, the way a buggy or hostile producer
//! would: bodies that are not JSON, JSON of the wrong shape, a step for an unknown
//! handler, a step of an unknown `schema_version`, a result for a dispatch nobody made,
//! and garbage on the control exchange. Each undecodable step or result lands in
//! `<prefix>.dead_letter` with an `x-tasker-reason` header; a result with an unknown
//! dispatch token is dropped by the fence and counted; control garbage is dropped and
//! logged (control messages are advisory and fanned out to every process, so there is
//! nothing to dead-letter or retry). The counters move by exactly the number of poison
//! messages, no process stops, and a normal task still completes.
//!
//! A handler whose result is over the worker's `TASKER_MAX_RESULT_BYTES` fails its step
//! permanently with code `result_too_large`: not a broker failure, not a retry loop. One
//! holding U+0000 fails with `result_not_storable`. A result PostgreSQL refuses for its
//! data, sent by another producer, is dead-lettered without holding up the results beside
//! it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use tasker_shared::broker::Topology;
use tasker_tests::http_stub::{Answer, HttpStub};
use tasker_tests::{
    EnvOptions, StatusCode, TestEnv, assert_no_dead_letters, confirm_channel, metric, publish,
    take_dead_letters,
};
use uuid::Uuid;

const NAMESPACE: &str = "poison";
const TEMPLATE: &str = "namespace: poison\nname: ok\nsteps:\n  - {name: one, handler: tasker.noop}\n  - {name: two, handler: tasker.echo, depends_on: [one]}\n";

/// Wait until every sample has reached its target, then check none went past it.
///
/// Called again after a barrier (a task that went through the same queues afterwards),
/// it checks that nothing late pushed a counter past its exact target.
async fn assert_metrics_reach(targets: &[(&str, &str, f64)]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut pending = Vec::new();
        for (url, sample, target) in targets {
            let value = metric(url, sample).await;
            assert!(value <= *target, "{sample} = {value}, past {target}");
            if value != *target {
                pending.push(format!("{sample} = {value}, expected {target}"));
            }
        }
        if pending.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics did not settle:\n{}",
            pending.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A well-formed step message of this build's protocol for a step nobody dispatched.
fn step_message(handler: &str, schema_version: u32) -> Value {
    json!({
        "schema_version": schema_version,
        "task_id": Uuid::new_v4(),
        "step_id": Uuid::new_v4(),
        "step_name": "ghost",
        "namespace": NAMESPACE,
        "template": "ok@0.1.0",
        "handler": handler,
        "config": {},
        "context": {},
        "parents": {},
        "attempt": 1,
        "retry_limit": 3,
        "deferrals": 0,
        "dispatch_token": Uuid::new_v4(),
        "timeout_ms": 10_000,
        "dispatched_at": chrono::Utc::now(),
    })
}

/// A well-formed result for a step and dispatch nobody made.
fn result_message(schema_version: u32) -> Value {
    json!({
        "type": "result",
        "schema_version": schema_version,
        "task_id": Uuid::new_v4(),
        "step_id": Uuid::new_v4(),
        "dispatch_token": Uuid::new_v4(),
        "outcome": "success",
        "results": {"forged": true},
        "started_at": chrono::Utc::now(),
        "finished_at": chrono::Utc::now(),
        "worker_id": "impostor",
    })
}

async fn assert_alive(env: &TestEnv, worker_metrics: &str) {
    let (status, _) = env.get("/health/live").await.expect("coordinator answers");
    assert_eq!(status, StatusCode::OK, "the coordinator is alive");
    let live = reqwest::get(worker_metrics.replace("/metrics", "/health/live"))
        .await
        .expect("the worker answers");
    assert!(live.status().is_success(), "the worker is alive");
    let task = env
        .run_task(
            json!({"namespace": NAMESPACE, "name": "ok"}),
            Duration::from_secs(30),
        )
        .await
        .expect("a normal task runs");
    assert_eq!(task["status"], "complete", "{task:#}");
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_or_dropped_counted_and_survived() {
    // A process: the test reads its log.
    let options = EnvOptions {
        binary_coordinator: true,
        ..EnvOptions::default()
    };
    let mut env = TestEnv::start_with("poison", options).await.unwrap();
    let (status, body) = env.register_template(TEMPLATE).await.unwrap();
    assert!(status.is_success(), "{body}");
    let (index, worker_metrics) = env
        .start_metered_worker("poison-worker", &[NAMESPACE], 4)
        .await
        .unwrap();
    let coordinator_metrics = format!("{}/metrics", env.base_url);
    // Warm up: everything is wired before the poison arrives.
    assert_alive(&env, &worker_metrics).await;

    let dead_lettered = "tasker_dead_lettered_total";
    let stale = "tasker_stale_results_dropped_total";
    let undecodable = "tasker_worker_dead_lettered_total{reason=\"undecodable\"}";
    let unknown_handler = "tasker_worker_dead_lettered_total{reason=\"unknown_handler\"}";
    let control_dropped = "tasker_control_messages_dropped_total";
    let worker_control_dropped = "tasker_worker_control_messages_dropped_total";
    let before = [
        metric(&coordinator_metrics, dead_lettered).await,
        metric(&coordinator_metrics, stale).await,
        metric(&worker_metrics, undecodable).await,
        metric(&worker_metrics, unknown_handler).await,
        metric(&coordinator_metrics, control_dropped).await,
        metric(&worker_metrics, worker_control_dropped).await,
    ];

    let (connection, channel) = confirm_channel().await;
    let prefix = env.prefix.clone();
    let steps_exchange = format!("{prefix}.steps");
    let results_queue = format!("{prefix}.results");
    let control_exchange = format!("{prefix}.control");
    let step_queue = env.queue(NAMESPACE);

    // To the namespace's step queue (through the steps exchange, as the coordinator does).
    let unknown_handler_step = step_message("no.such.handler", 1);
    let future_step = step_message("tasker.noop", 99);
    let to_steps: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "step: not JSON",
            b"this is not JSON {".to_vec(),
            "undecodable message".into(),
        ),
        (
            "step: wrong shape",
            json!({"task_id": 42, "handler": ["tasker.noop"], "poison": true})
                .to_string()
                .into_bytes(),
            "undecodable message".into(),
        ),
        (
            "step: unknown handler",
            unknown_handler_step.to_string().into_bytes(),
            "unknown handler `no.such.handler`".into(),
        ),
        (
            "step: unknown schema_version",
            future_step.to_string().into_bytes(),
            "unsupported schema_version 99".into(),
        ),
    ];
    // Through the steps exchange, and every other one straight to the queue through the
    // default exchange: the dead letter names the queue either way.
    for (i, (_, body, _)) in to_steps.iter().enumerate() {
        if i % 2 == 0 {
            publish(&channel, &steps_exchange, NAMESPACE, body).await;
        } else {
            publish(&channel, "", &step_queue, body).await;
        }
    }
    // To the results queue (through the default exchange, as workers do).
    let forged = result_message(1);
    let to_results: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "result: not JSON",
            b"\x00\x01\x02 definitely not JSON".to_vec(),
            "undecodable message".into(),
        ),
        (
            "result: wrong shape",
            json!({"type": "result", "step_id": 7, "outcome": ["success"]})
                .to_string()
                .into_bytes(),
            "undecodable message".into(),
        ),
        (
            "result: unknown schema_version",
            result_message(2).to_string().into_bytes(),
            "unsupported schema_version 2".into(),
        ),
    ];
    for (_, body, _) in &to_results {
        publish(&channel, "", &results_queue, body).await;
    }
    // Well-formed, but for a dispatch nobody made: dropped by the fence, not dead-lettered.
    publish(&channel, "", &results_queue, forged.to_string().as_bytes()).await;
    // Garbage on the fanout control exchange reaches the coordinator and the worker.
    publish(&channel, &control_exchange, "", b"\xff\xfe garbage").await;
    publish(
        &channel,
        &control_exchange,
        "",
        br#"{"type": "reboot_everything", "now": true}"#,
    )
    .await;

    // Every undecodable step and result is in the dead-letter queue, with its reason.
    let dead_letter_queue = format!("{prefix}.dead_letter");
    let letters = take_dead_letters(
        &channel,
        &dead_letter_queue,
        to_steps.len() + to_results.len(),
    )
    .await;
    let by_body: BTreeMap<Vec<u8>, (String, String)> = letters
        .into_iter()
        .map(|letter| (letter.body, (letter.reason, letter.source_queue)))
        .collect();
    for (sent, source_queue) in [(&to_steps, &step_queue), (&to_results, &results_queue)] {
        for (what, body, expected_reason) in sent {
            let (reason, source) = by_body
                .get(body)
                .unwrap_or_else(|| panic!("{what}: not dead-lettered; have {by_body:?}"));
            assert!(
                reason.contains(expected_reason.as_str()),
                "{what}: reason {reason:?} should mention {expected_reason:?}"
            );
            assert_eq!(&source, &source_queue, "{what}: source queue");
        }
    }

    // Counted exactly: the coordinator dead-lettered the three bad results and dropped two
    // stale ones (the forged result, and the worker's permanent failure for the step of
    // the unknown handler, which nobody dispatched); the worker dead-lettered three
    // undecodable steps and one of an unknown handler.
    let targets = [
        (coordinator_metrics.as_str(), dead_lettered, before[0] + 3.0),
        (coordinator_metrics.as_str(), stale, before[1] + 2.0),
        (worker_metrics.as_str(), undecodable, before[2] + 3.0),
        (worker_metrics.as_str(), unknown_handler, before[3] + 1.0),
        // Both control messages (not JSON; JSON of an unknown type), by every receiver.
        (
            coordinator_metrics.as_str(),
            control_dropped,
            before[4] + 2.0,
        ),
        (
            worker_metrics.as_str(),
            worker_control_dropped,
            before[5] + 2.0,
        ),
    ];
    assert_metrics_reach(&targets).await;
    // Every poison message has now been dealt with: none was dead-lettered twice.
    assert_no_dead_letters(&channel, &dead_letter_queue).await;

    // Control garbage is dropped and logged by every receiver.
    env.coordinator
        .wait_for_log(
            "dropped an undecodable control message",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    env.workers[index]
        .wait_for_log(
            "dropped an undecodable control message",
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    // Nobody stopped, and the system still works. The task went through the step and
    // results queues after the poison: nothing of it was counted or dead-lettered late.
    assert_alive(&env, &worker_metrics).await;
    assert_metrics_reach(&targets).await;
    assert_no_dead_letters(&channel, &dead_letter_queue).await;
    let _ = connection.close(200, "OK".into()).await;
    env.finish().await.unwrap();
}

#[tokio::test]
async fn an_oversized_result_is_a_permanent_step_error_not_a_broker_failure() {
    const LIMIT: usize = 2048;
    let mut env = TestEnv::start("result_too_large").await.unwrap();
    let (status, body) = env
        .register_template(
            "namespace: poison\nname: echo\nsteps:\n  - {name: echo, handler: tasker.echo, retry_limit: 3}\n",
        )
        .await
        .unwrap();
    assert!(status.is_success(), "{body}");
    let (status, body) = env.register_template(TEMPLATE).await.unwrap();
    assert!(status.is_success(), "{body}");
    let limit = LIMIT.to_string();
    let (_, worker_metrics) = env
        .start_metered_worker_with(
            "small-results",
            &[NAMESPACE],
            4,
            &[("TASKER_MAX_RESULT_BYTES", limit.as_str())],
        )
        .await
        .unwrap();

    // tasker.echo answers with its config, the context and its parents' results.
    let context = json!({"blob": "x".repeat(10 * LIMIT)});
    let size = json!({"config": {}, "context": context, "parents": {}})
        .to_string()
        .len();
    let task = env
        .run_task(
            json!({"namespace": NAMESPACE, "name": "echo", "context": context}),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(task["status"], "error", "{task:#}");
    let step = TestEnv::step(&task, "echo");
    assert_eq!(step["status"], "error", "{step:#}");
    assert_eq!(
        step["attempts"], 1,
        "a permanent error is not retried: {step:#}"
    );
    assert_eq!(step["last_error"]["code"], "result_too_large", "{step:#}");
    assert_eq!(step["last_error"]["kind"], "permanent", "{step:#}");
    let message = step["last_error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{size} bytes"))
            && message.contains(&format!("limit of {LIMIT} bytes"))
            && message.contains("TASKER_MAX_RESULT_BYTES"),
        "the message names the size and the limit: {message}"
    );
    assert!(step["results"].is_null(), "{step:#}");

    // A result within the limit, from the same worker, goes through.
    let task = env
        .run_task(
            json!({"namespace": NAMESPACE, "name": "echo", "context": {"blob": "small"}}),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(task["status"], "complete", "{task:#}");
    assert_eq!(
        TestEnv::step(&task, "echo")["results"]["context"]["blob"],
        "small"
    );

    // Not a broker failure: nothing was handed back, published twice or dead-lettered.
    assert_eq!(
        metric(&worker_metrics, "tasker_worker_broker_errors_total").await,
        0.0
    );
    let topology = Topology::new(env.prefix.clone());
    let dead_letters = tasker_tests::broker::queue_messages(&topology.dead_letter_queue())
        .await
        .unwrap();
    assert_eq!(dead_letters, 0);
    assert_alive(&env, &worker_metrics).await;
    env.finish().await.unwrap();
}

/// Results whose data PostgreSQL cannot store, from a producer that is not Tasker's
/// worker: a NUL character (refused as the message is decoded), and a start time outside
/// PostgreSQL's timestamps (refused by PostgreSQL inside a batch: the coordinator then
/// applies that batch's messages one at a time). Each lands in the dead-letter queue with
/// why, exactly once; the results sent beside them are applied; the refused steps keep
/// the state they had, and results keep flowing.
#[tokio::test]
async fn results_the_database_cannot_store_are_dead_lettered_and_the_rest_applied() {
    let mut env = TestEnv::start("poison-unstorable").await.unwrap();
    let (status, body) = env.register_template(TEMPLATE).await.unwrap();
    assert!(status.is_success(), "{body}");
    // No worker serves this namespace: its steps wait, enqueued, for the results forged here.
    let (status, body) = env
        .register_template(
            "namespace: unserved\nname: one\nsteps:\n  - {name: only, handler: tasker.noop}\n",
        )
        .await
        .unwrap();
    assert!(status.is_success(), "{body}");
    let (_, worker_metrics) = env
        .start_metered_worker("poison-worker", &[NAMESPACE], 4)
        .await
        .unwrap();
    assert_alive(&env, &worker_metrics).await;
    let coordinator_metrics = format!("{}/metrics", env.base_url);
    let dead_lettered = "tasker_dead_lettered_total";
    let before = metric(&coordinator_metrics, dead_lettered).await;

    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (status, task) = env
            .create_task(json!({"namespace": "unserved", "name": "one"}))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::CREATED, "{task}");
        tasks.push(task["task_id"].as_str().unwrap().parse::<Uuid>().unwrap());
    }
    // Each task's step as dispatched: (task, step, dispatch token).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let dispatched: Vec<(Uuid, Uuid, Uuid)> = loop {
        let rows: Vec<(Uuid, Uuid, Uuid)> = sqlx::query_as(
            "SELECT task_id, step_id, dispatch_token FROM steps \
             WHERE task_id = ANY($1) AND status = 'enqueued' AND dispatch_token IS NOT NULL \
             ORDER BY array_position($1, task_id)",
        )
        .bind(&tasks)
        .fetch_all(&env.pool)
        .await
        .unwrap();
        if rows.len() == tasks.len() {
            break rows;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "steps not dispatched: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let result =
        |(task_id, step_id, token): (Uuid, Uuid, Uuid), results: Value, started_at: &str| {
            json!({
            "type": "result", "schema_version": 1, "task_id": task_id, "step_id": step_id,
            "dispatch_token": token, "outcome": "success", "results": results,
            "started_at": started_at, "finished_at": chrono::Utc::now(), "worker_id": "impostor",
        })
        .to_string()
        .into_bytes()
        };
    let now = chrono::Utc::now().to_rfc3339();
    let with_nul = result(dispatched[0], json!({"text": "a\u{0}b"}), &now);
    // chrono reads years up to ±262,143; PostgreSQL's timestamps begin in 4713 BC.
    let out_of_range = result(
        dispatched[1],
        json!({"ok": true}),
        "-200000-01-01T00:00:00Z",
    );
    let fine = [
        result(dispatched[2], json!({"n": 2}), &now),
        result(dispatched[3], json!({"n": 3}), &now),
    ];

    // Published together, confirmed after: the coordinator takes what has arrived as one
    // batch, so the refused result usually shares a batch with the fine ones.
    let (connection, channel) = confirm_channel().await;
    let results_queue = format!("{}.results", env.prefix);
    let mut confirms = Vec::new();
    for body in [&with_nul, &out_of_range, &fine[0], &fine[1]] {
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    results_queue.as_str().into(),
                    lapin::options::BasicPublishOptions::default(),
                    body,
                    lapin::BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap(),
        );
    }
    for confirm in confirms {
        assert!(confirm.await.unwrap().is_ack());
    }

    let dead_letter_queue = format!("{}.dead_letter", env.prefix);
    let letters = take_dead_letters(&channel, &dead_letter_queue, 2).await;
    let reason_of = |body: &[u8]| {
        letters
            .iter()
            .find(|letter| letter.body == body)
            .map(|letter| letter.reason.clone())
            .unwrap_or_else(|| panic!("not dead-lettered: {}", String::from_utf8_lossy(body)))
    };
    let reason = reason_of(&with_nul);
    assert!(reason.contains("U+0000"), "{reason}");
    let reason = reason_of(&out_of_range);
    assert!(
        reason.contains("refused by PostgreSQL") && reason.contains("out of range"),
        "{reason}"
    );
    assert!(
        letters
            .iter()
            .all(|letter| letter.source_queue == results_queue),
        "{letters:?}"
    );

    // The fine results were applied; the refused ones changed nothing.
    for (task, n) in [(tasks[2], 2), (tasks[3], 3)] {
        let task = env
            .wait_for_task(&task.to_string(), &["complete"], Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(
            TestEnv::step(&task, "only")["results"],
            json!({"n": n}),
            "{task:#}"
        );
    }
    for task in &tasks[..2] {
        let (_, task) = env.get(&format!("/v1/tasks/{task}")).await.unwrap();
        let step = TestEnv::step(&task, "only");
        assert_eq!(step["status"], "enqueued", "{task:#}");
        assert!(step["results"].is_null(), "{task:#}");
    }
    // Counted once each, and nothing behind them is held up.
    assert_metrics_reach(&[(coordinator_metrics.as_str(), dead_lettered, before + 2.0)]).await;
    assert_alive(&env, &worker_metrics).await;
    assert_metrics_reach(&[(coordinator_metrics.as_str(), dead_lettered, before + 2.0)]).await;
    assert_no_dead_letters(&channel, &dead_letter_queue).await;
    let _ = connection.close(200, "OK".into()).await;
    env.finish().await.unwrap();
}

/// A handler's answer that holds a NUL character (U+0000), which PostgreSQL cannot store:
/// the worker fails the step permanently with code `result_not_storable`, naming where,
/// instead of sending a result the coordinator would have to refuse.
#[tokio::test]
async fn a_result_holding_a_nul_is_a_permanent_step_error() {
    let mut env = TestEnv::start("poison-nul-result").await.unwrap();
    // JSON's escape and a raw NUL in a text body.
    let stub = HttpStub::start(vec![
        Answer::new(200, r#"{"text": "a\u0000b"}"#).header("content-type", "application/json"),
        Answer::new(200, "raw \0 text").header("content-type", "text/plain"),
    ])
    .await
    .unwrap();
    let template = json!({"namespace": "nul", "name": "call", "steps": [
        {"name": "call", "handler": "tasker.http", "retry_limit": 3, "config": {"url": stub.url}}
    ]});
    let (status, body) = env.register_template(&template.to_string()).await.unwrap();
    assert!(status.is_success(), "{body}");
    env.start_worker_with(
        tasker_tests::binary("tasker-worker"),
        "loopback",
        &["nul"],
        4,
        &[("TASKER_HTTP_ALLOW", "127.0.0.1")],
    )
    .await
    .unwrap();
    for at in ["/body/text", "/body"] {
        let task = env
            .run_task(
                json!({"namespace": "nul", "name": "call"}),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        let step = TestEnv::step(&task, "call");
        assert_eq!(step["status"], "error", "{step:#}");
        assert_eq!(step["attempts"], 1, "a permanent error: {step:#}");
        assert_eq!(
            step["last_error"]["code"], "result_not_storable",
            "{step:#}"
        );
        let message = step["last_error"]["message"].as_str().unwrap();
        assert!(
            message.contains("U+0000") && message.ends_with(&format!("at {at}")),
            "{message}"
        );
    }
    env.finish().await.unwrap();
}

/// `levels` arrays inside each other around `1`.
fn nested(levels: usize) -> Value {
    serde_json::from_str(&format!("{}1{}", "[".repeat(levels), "]".repeat(levels))).unwrap()
}

/// Tasker carries JSON values at most 100 arrays and objects deep (a deeper one would make
/// the messages that carry it unreadable, with whatever else they carry): a context deeper
/// is refused when the task is created, and a handler's result deeper fails its step
/// permanently with `result_not_storable`, while the results sent beside it are applied.
#[tokio::test]
async fn values_deeper_than_tasker_carries_are_refused_by_the_api_and_by_the_worker() {
    let mut env = TestEnv::start("poison-deep").await.unwrap();
    let template = json!({"namespace": "deep", "name": "echo", "steps": [
        {"name": "echo", "handler": "tasker.echo", "retry_limit": 3}
    ]});
    let (status, body) = env.register_template(&template.to_string()).await.unwrap();
    assert!(status.is_success(), "{body}");
    env.start_worker("deep", &["deep"]).await.unwrap();

    // The context object and 100 arrays: one level too many.
    let (status, body) = env
        .create_task(json!({"namespace": "deep", "name": "echo", "context": {"nest": nested(100)}}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["details"][0]["path"], "context", "{body}");
    assert!(
        body["error"]["details"][0]["message"]
            .as_str()
            .unwrap()
            .contains("100 levels"),
        "{body}"
    );

    // At the limit, the context is carried; the echo wraps it one level deeper, which
    // the worker refuses to send. Shallow tasks created with it finish.
    let (status, deep) = env
        .create_task(json!({"namespace": "deep", "name": "echo", "context": {"nest": nested(99)}}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{deep}");
    let mut shallow = Vec::new();
    for i in 0..20 {
        let (status, task) = env
            .create_task(json!({"namespace": "deep", "name": "echo", "context": {"i": i}}))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::CREATED, "{task}");
        shallow.push(task["task_id"].as_str().unwrap().to_owned());
    }
    let task = env
        .wait_for_task(
            deep["task_id"].as_str().unwrap(),
            &["error"],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let step = TestEnv::step(&task, "echo");
    assert_eq!(step["attempts"], 1, "a permanent error: {step:#}");
    assert_eq!(
        step["last_error"]["code"], "result_not_storable",
        "{step:#}"
    );
    for task_id in &shallow {
        env.wait_for_task(task_id, &["complete"], Duration::from_secs(30))
            .await
            .unwrap();
    }
    let (_connection, channel) = confirm_channel().await;
    let topology = tasker_shared::broker::Topology::new(env.prefix.clone());
    assert_no_dead_letters(&channel, &topology.dead_letter_queue()).await;

    // A signal's payload becomes its step's results: held to the same limit.
    let gate = json!({"namespace": "deep", "name": "gate", "steps": [
        {"name": "hold", "handler": "tasker.wait", "config": {"signal": "go"}}
    ]});
    let (status, body) = env.register_template(&gate.to_string()).await.unwrap();
    assert!(status.is_success(), "{body}");
    let (status, waiting) = env
        .create_task(json!({"namespace": "deep", "name": "gate"}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{waiting}");
    let signal = format!(
        "/v1/tasks/{}/signals/go",
        waiting["task_id"].as_str().unwrap()
    );
    let (status, body) = env.post(&signal, nested(101)).await.unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = env.post(&signal, nested(100)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    env.finish().await.unwrap();
}
