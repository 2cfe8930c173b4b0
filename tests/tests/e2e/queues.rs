//! Queue types (docs/operating.md, "Queue types"): with `TASKER_QUEUE_TYPE=quorum` the
//! step, results and dead-letter queues are quorum queues, a message redelivered more
//! than the delivery limit is dead-lettered, and a process whose queue type differs from
//! the queues that exist stops with an error that says so.

use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use tasker_shared::broker::{DELIVERY_LIMIT, is_queue_conflict};
use tasker_tests::{EnvOptions, Task, TaskStatus, TestEnv, amqp_url, confirm_channel};

const TEMPLATE: &str = "namespace: replicated\nname: pair\nsteps:\n  - {name: first, handler: tasker.echo}\n  - {name: second, handler: tasker.echo, depends_on: [first]}\n";

async fn quorum_env(test: &str) -> TestEnv {
    let env = TestEnv::start_with(
        test,
        EnvOptions {
            queue_type: Some("quorum".into()),
            ..EnvOptions::default()
        },
    )
    .await
    .unwrap();
    let (status, body) = env.register_template(TEMPLATE).await.unwrap();
    assert!(status.is_success(), "{body}");
    env
}

/// Whether `queue` is a quorum queue: declaring it as a classic one (no arguments) is
/// refused as inequivalent.
async fn is_quorum(channel: &lapin::Channel, queue: &str) -> bool {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(_) => false,
        Err(error) => {
            assert!(is_queue_conflict(&error), "{error}");
            true
        }
    }
}

#[tokio::test]
async fn a_workflow_runs_on_quorum_queues() {
    let mut env = quorum_env("quorum-run").await;
    env.start_worker("q1", &["replicated"]).await.unwrap();
    let task = env
        .api
        .run_task(
            &json!({"namespace": "replicated", "name": "pair", "context": {"n": 1}}),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(task.status, TaskStatus::Complete, "{task:#?}");

    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    for queue in [
        env.queue("replicated"),
        format!("{}.results", env.prefix),
        format!("{}.dead_letter", env.prefix),
    ] {
        // A refused declare closes its channel: one channel per question.
        let channel = connection.create_channel().await.unwrap();
        assert!(
            is_quorum(&channel, &queue).await,
            "{queue} is not a quorum queue"
        );
    }
    let _ = connection.close(200, "OK".into()).await;
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_step_message_that_kills_its_workers_fails_its_attempt_at_the_delivery_limit() {
    let mut env = quorum_env("quorum-limit").await;
    let task_id = env
        .api
        .create_task(&json!({"namespace": "replicated", "name": "pair", "context": {"n": 2}}))
        .await
        .unwrap()
        .task_id;
    let (_connection, channel) = confirm_channel().await;
    let last_error = |task: &Task| task.step("first").last_error.clone();

    // A consumer that dies on the message every time, as far as the broker can tell: it
    // takes the message and gives it back unacknowledged.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut deliveries = 0;
    let mut token = None;
    loop {
        assert!(
            Instant::now() < deadline,
            "after {deliveries} deliveries the attempt has not failed"
        );
        let got = channel
            .basic_get(
                env.queue("replicated").into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .unwrap();
        let Some(message) = got else {
            let task = env.api.task(task_id).await.unwrap();
            if last_error(&task).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let body: serde_json::Value = serde_json::from_slice(&message.delivery.data).unwrap();
        let first = token.get_or_insert(body["dispatch_token"].clone()).clone();
        channel
            .basic_nack(
                message.delivery.delivery_tag,
                BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                },
            )
            .await
            .unwrap();
        if body["dispatch_token"] != first {
            // The next attempt's message: the first one is gone.
            break;
        }
        deliveries += 1;
        assert!(
            deliveries <= DELIVERY_LIMIT + 1,
            "the message was delivered {deliveries} times, past the limit of {DELIVERY_LIMIT}"
        );
    }
    assert!(
        deliveries >= DELIVERY_LIMIT,
        "the message left the queue after {deliveries} deliveries"
    );
    let task = env.api.task(task_id).await.unwrap();
    let error = last_error(&task).expect("a last error");
    assert_eq!(error.code.as_deref(), Some("delivery_limit"), "{task:#?}");
    assert_eq!(error.kind, "retryable", "{task:#?}");

    // The attempt failed like any retryable one: the next attempt runs on a worker that
    // survives it, and the task completes.
    env.start_worker("q2", &["replicated"]).await.unwrap();
    let task = env
        .api
        .wait_for_task(
            task_id,
            &[TaskStatus::Complete, TaskStatus::Error],
            Duration::from_secs(90),
        )
        .await
        .unwrap();
    assert_eq!(task.status, TaskStatus::Complete, "{task:#?}");
    assert_eq!(task.step("first").attempts, 2, "{task:#?}");
    let dead = channel
        .basic_get(
            format!("{}.dead_letter", env.prefix).into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap();
    assert!(dead.is_none(), "a dead letter: {dead:?}");
    env.finish().await.unwrap();
}

#[tokio::test]
async fn processes_refuse_queues_of_the_other_type_and_say_why() {
    // Classic queues exist under this prefix (the default type).
    let env = TestEnv::start("queue-conflict").await.unwrap();
    let stderr = tasker_tests::worker_refusing_to_start(&[
        ("TASKER_AMQP_PREFIX", env.prefix.as_str()),
        ("TASKER_QUEUE_TYPE", "quorum"),
    ])
    .await;
    assert!(
        stderr.contains("TASKER_QUEUE_TYPE=quorum") && stderr.contains("inequivalent arg"),
        "{stderr}"
    );

    let stderr = tasker_tests::coordinator_refusing_to_start(
        &env.database_url,
        &[
            ("TASKER_AMQP_PREFIX", env.prefix.as_str()),
            ("TASKER_QUEUE_TYPE", "quorum"),
        ],
    )
    .await;
    assert!(
        stderr.contains("TASKER_QUEUE_TYPE=quorum") && stderr.contains("inequivalent arg"),
        "{stderr}"
    );
    env.finish().await.unwrap();
}

/// A template whose namespace's step queue exists as the other type is refused, and not
/// stored: stored, every step of it would be refused by the broker and dispatched again
/// at every sweep, for ever.
#[tokio::test]
async fn a_template_whose_step_queue_is_of_the_other_type_is_refused_and_not_stored() {
    let env = TestEnv::start("queue-clash").await.unwrap();
    let (_connection, channel) = confirm_channel().await;
    let queue = env.queue("clash");
    tasker_tests::declare_queue_with(
        &channel,
        &queue,
        ("x-queue-type", AMQPValue::LongString("quorum".into())),
    )
    .await;
    let (status, body) = env
        .register_template(
            "namespace: clash\nname: flow\nsteps:\n  - {name: a, handler: tasker.noop}\n",
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "queue_conflict", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&queue) && message.contains("x-queue-type"),
        "{message}"
    );
    let (status, _) = env.get("/v1/templates/clash/flow").await.unwrap();
    assert_eq!(status, 404, "nothing stored");
    tasker_tests::delete_queue(&queue).await.unwrap();
    env.finish().await.unwrap();
}
