//! Message authenticity (docs/security.md, "The broker"): with `TASKER_MESSAGE_KEY`, a
//! result, step or control message that is not signed with the key is refused, whoever
//! could publish it; during a key rotation both keys are accepted.

use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicNackOptions};
use serde_json::{Value, json};
use tasker_tests::{
    EnvOptions, TestEnv, assert_no_dead_letters, binary, confirm_channel, publish,
    take_dead_letters,
};

const KEY: &str = "the-current-message-key-of-this-test-0001";
const NEXT: &str = "the-next-message-key-of-this-test-00000002";
const NAMESPACE: &str = "signed";

const TEMPLATE: &str =
    "namespace: signed\nname: one\nsteps:\n  - {name: only, handler: tasker.echo}\n";

async fn signed_env(test: &str, key: &str, previous: Option<&str>) -> TestEnv {
    let mut coordinator_env = vec![("TASKER_MESSAGE_KEY".to_owned(), key.to_owned())];
    if let Some(previous) = previous {
        coordinator_env.push((
            "TASKER_MESSAGE_KEY_PREVIOUS".to_owned(),
            previous.to_owned(),
        ));
    }
    let env = TestEnv::start_with(
        test,
        EnvOptions {
            coordinator_env,
            ..EnvOptions::default()
        },
    )
    .await
    .unwrap();
    let (status, body) = env.register_template(TEMPLATE).await.unwrap();
    assert!(status.is_success(), "{body}");
    env
}

/// Take the one step message of a new task from its queue, unacked.
async fn queued_delivery(env: &TestEnv, channel: &lapin::Channel) -> lapin::message::Delivery {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = channel
            .basic_get(
                env.queue(NAMESPACE).into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .unwrap();
        if let Some(message) = got {
            return message.delivery;
        }
        assert!(Instant::now() < deadline, "no step message was queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publish `body` with `headers` to the results queue, as a worker (or an impostor)
/// would, and wait for the broker's confirm.
async fn publish_result(
    env: &TestEnv,
    channel: &lapin::Channel,
    body: &[u8],
    headers: lapin::types::FieldTable,
) {
    channel
        .basic_publish(
            "".into(),
            format!("{}.results", env.prefix).into(),
            Default::default(),
            body,
            lapin::BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// [`queued_delivery`]'s body, and its tag (it goes back with `nack`).
async fn queued_step(env: &TestEnv, channel: &lapin::Channel) -> (Value, u64) {
    let delivery = queued_delivery(env, channel).await;
    let body = serde_json::from_slice(&delivery.data).unwrap();
    (body, delivery.delivery_tag)
}

#[tokio::test]
async fn unsigned_or_wrongly_signed_messages_are_refused_and_signed_ones_run() {
    let mut env = signed_env("signing", KEY, None).await;
    let (_, task) = env
        .create_task(json!({"namespace": NAMESPACE, "name": "one", "context": {"n": 1}}))
        .await
        .unwrap();
    let task_id = task["task_id"].as_str().unwrap().to_owned();
    let (_connection, channel) = confirm_channel().await;

    // The step message is signed; someone who can read it forges its result, with its
    // dispatch token, unsigned and then signed with another key.
    let (step, tag) = queued_step(&env, &channel).await;
    let result = json!({
        "type": "result", "schema_version": 1, "task_id": step["task_id"],
        "step_id": step["step_id"], "dispatch_token": step["dispatch_token"],
        "outcome": "success", "results": {"forged": true},
        "started_at": chrono::Utc::now(), "finished_at": chrono::Utc::now(),
        "worker_id": "impostor"
    })
    .to_string();
    publish(
        &channel,
        "",
        &format!("{}.results", env.prefix),
        result.as_bytes(),
    )
    .await;
    let other = tasker_shared::signing::MessageKeys::new(Some(NEXT), None).unwrap();
    let headers = other.sign(result.as_bytes(), Default::default());
    publish_result(&env, &channel, result.as_bytes(), headers).await;
    let dead_letter_queue = format!("{}.dead_letter", env.prefix);
    let letters = take_dead_letters(&channel, &dead_letter_queue, 2).await;
    for letter in &letters {
        assert!(letter.reason.starts_with("bad_signature"), "{letter:?}");
        assert_eq!(letter.source_queue, format!("{}.results", env.prefix));
    }
    let (_, task) = env.get(&format!("/v1/tasks/{task_id}")).await.unwrap();
    assert_ne!(
        task["status"], "complete",
        "a forged result completed the step: {task:#}"
    );

    // An unsigned step message is not run by a worker with the key.
    channel
        .basic_nack(
            tag,
            BasicNackOptions {
                requeue: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut forged = step.clone();
    forged["step_id"] = json!(uuid::Uuid::new_v4());
    forged["dispatch_token"] = json!(uuid::Uuid::new_v4());
    publish(
        &channel,
        &format!("{}.steps", env.prefix),
        NAMESPACE,
        forged.to_string().as_bytes(),
    )
    .await;
    env.start_worker_with(
        binary("tasker-worker"),
        "keyed",
        &[NAMESPACE],
        4,
        &[("TASKER_MESSAGE_KEY", KEY)],
    )
    .await
    .unwrap();
    // The real step runs, signed both ways.
    let done = env
        .wait_for_task(&task_id, &["complete"], Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        TestEnv::step(&done, "only")["results"]["context"],
        json!({"n": 1}),
        "{done:#}"
    );
    let letters = take_dead_letters(&channel, &dead_letter_queue, 1).await;
    assert!(
        letters[0].reason.starts_with("bad_signature"),
        "{letters:?}"
    );
    assert_eq!(letters[0].source_queue, env.queue(NAMESPACE));
    // Both forged results and the forged step were dead-lettered, and the real step's
    // messages went through (the task completed): nothing else can arrive.
    assert_no_dead_letters(&channel, &dead_letter_queue).await;

    // A key too short to be one stops a worker at start.
    let stderr =
        tasker_tests::worker_refusing_to_start(&[("TASKER_MESSAGE_KEY", "too-short")]).await;
    assert!(
        stderr.contains("TASKER_MESSAGE_KEY must be at least 32 bytes"),
        "{stderr}"
    );
    env.finish().await.unwrap();
}

/// A signed step message copied to the results queue with the headers RabbitMQ puts on
/// one a quorum step queue dead-lettered is poison, not a failed attempt: classic step
/// queues dead-letter nothing, and those headers are not signed.
#[tokio::test]
async fn a_step_message_passed_off_as_dead_lettered_fails_nothing() {
    let env = signed_env("signing-dead-lettered", KEY, None).await;
    let (_, task) = env
        .create_task(json!({"namespace": NAMESPACE, "name": "one"}))
        .await
        .unwrap();
    let task_id = task["task_id"].as_str().unwrap().to_owned();
    let (_connection, channel) = confirm_channel().await;
    let step = queued_delivery(&env, &channel).await;
    let mut headers = step.properties.headers().clone().unwrap_or_default();
    for (name, value) in [
        ("x-first-death-queue", env.queue(NAMESPACE)),
        ("x-first-death-reason", "delivery_limit".to_owned()),
    ] {
        headers.insert(
            name.into(),
            lapin::types::AMQPValue::LongString(value.into()),
        );
    }
    publish_result(&env, &channel, &step.data, headers).await;
    let dead_letter_queue = format!("{}.dead_letter", env.prefix);
    let letters = take_dead_letters(&channel, &dead_letter_queue, 1).await;
    assert_eq!(letters[0].source_queue, format!("{}.results", env.prefix));
    let (_, task) = env.get(&format!("/v1/tasks/{task_id}")).await.unwrap();
    let only = TestEnv::step(&task, "only");
    assert_eq!(
        (only["status"].as_str(), only["attempts"].as_i64()),
        (Some("enqueued"), Some(1)),
        "{task:#}"
    );
    env.finish().await.unwrap();
}

/// Mid-rotation: the coordinator still signs with the old key and accepts the new one,
/// a worker already signs with the new key and accepts the old one. Work flows.
#[tokio::test]
async fn during_a_key_rotation_both_keys_are_accepted() {
    let mut env = signed_env("signing-rotation", KEY, Some(NEXT)).await;
    env.start_worker_with(
        binary("tasker-worker"),
        "rotated",
        &[NAMESPACE],
        4,
        &[
            ("TASKER_MESSAGE_KEY", NEXT),
            ("TASKER_MESSAGE_KEY_PREVIOUS", KEY),
        ],
    )
    .await
    .unwrap();
    let task = env
        .run_task(
            json!({"namespace": NAMESPACE, "name": "one", "context": {"n": 2}}),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(task["status"], "complete", "{task:#}");
    env.finish().await.unwrap();
}

/// A `cancel_task` that is not signed does not stop a running step.
#[tokio::test]
async fn forged_control_messages_are_ignored() {
    let mut env = signed_env("signing-control", KEY, None).await;
    let (status, body) = env
        .register_template(
            "namespace: signed\nname: slow\nsteps:\n  - {name: only, handler: tasker.sleep, config: {ms: 2000}}\n",
        )
        .await
        .unwrap();
    assert!(status.is_success(), "{body}");
    env.start_worker_with(
        binary("tasker-worker"),
        "keyed",
        &[NAMESPACE],
        4,
        &[("TASKER_MESSAGE_KEY", KEY)],
    )
    .await
    .unwrap();
    let (_, task) = env
        .create_task(json!({"namespace": NAMESPACE, "name": "slow"}))
        .await
        .unwrap();
    let task_id = task["task_id"].as_str().unwrap().to_owned();
    env.wait_until(
        &task_id,
        "the step running",
        Duration::from_secs(30),
        |task| TestEnv::step(task, "only")["status"] == "in_progress",
    )
    .await
    .unwrap();
    let (_connection, channel) = confirm_channel().await;
    let cancel = json!({"type": "cancel_task", "task_id": task_id}).to_string();
    publish(
        &channel,
        &format!("{}.control", env.prefix),
        "",
        cancel.as_bytes(),
    )
    .await;
    let done = env
        .wait_for_task(&task_id, &["complete", "error"], Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done["status"], "complete", "{done:#}");
    let log = env.workers[0].log();
    assert!(log.contains("control message dropped"), "{log}");
    env.finish().await.unwrap();
}
