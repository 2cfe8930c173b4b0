//! Steps claimed together travel together: up to `STEPS_PER_MESSAGE` steps of one
//! namespace in one message (AMQP `type` `steps`), run by the worker each as a step
//! message of its own would run, the message acked once all of them are answered. A step
//! of such a message that no handler of the worker runs is dead-lettered alone, as a
//! step message of its own, and fails; the others run.

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicNackOptions};
use serde_json::json;
use tasker_shared::broker::carries_step_batch;
use tasker_shared::messages::{STEPS_PER_MESSAGE, StepMessage, steps_of};
use tasker_tests::{
    TestEnv, assert_no_dead_letters, confirm_channel, queue_messages, take_dead_letters,
};
use uuid::Uuid;

const NAMESPACE: &str = "batches";

/// A template of `roots` steps without parents (all claimed by the task's creation, in
/// one claim), the one named `odd` (if any) run by `odd_handler`, and a last step
/// after all of them.
fn template(name: &str, roots: usize, odd_handler: Option<&str>) -> String {
    let mut yaml = format!("namespace: {NAMESPACE}\nname: {name}\nsteps:\n");
    let mut names = Vec::new();
    for n in 0..roots {
        let handler = match (n, odd_handler) {
            (1, Some(handler)) => handler,
            _ => "tasker.echo",
        };
        yaml.push_str(&format!("  - {{name: r{n}, handler: {handler}}}\n"));
        names.push(format!("r{n}"));
    }
    yaml.push_str(&format!(
        "  - {{name: last, handler: tasker.noop, depends_on: [{}]}}\n",
        names.join(", ")
    ));
    yaml
}

#[tokio::test]
async fn steps_claimed_together_travel_in_one_message_and_each_runs_once() {
    let roots = STEPS_PER_MESSAGE + 3;
    let mut env = TestEnv::start("batches-together").await.unwrap();
    let (status, body) = env
        .register_template(&template("wide", roots, None))
        .await
        .unwrap();
    assert!(status.is_success(), "{body}");
    let (status, task) = env
        .create_task(json!({"namespace": NAMESPACE, "name": "wide", "context": {"k": 1}}))
        .await
        .unwrap();
    assert!(status.is_success(), "{task}");
    let task_id: Uuid = task["task_id"].as_str().unwrap().parse().unwrap();

    // No worker yet: the first steps wait in their queue, in two messages.
    let queue = env.queue(NAMESPACE);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while queue_messages(&queue).await.unwrap() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the steps never reached their queue"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_connection, channel) = confirm_channel().await;
    let mut carried = Vec::new();
    let mut sizes = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
    {
        let delivery = message.delivery;
        let batch = carries_step_batch(&delivery.properties);
        let steps = steps_of(&delivery.data, batch).expect("the message decodes");
        sizes.push(steps.len());
        carried.extend(steps);
    }
    // Handed back for the worker to come.
    channel
        .basic_nack(
            0,
            BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        sizes,
        [STEPS_PER_MESSAGE, 3],
        "{roots} steps, claimed together"
    );
    let names: BTreeSet<&str> = carried.iter().map(|s| s.step_name.as_str()).collect();
    assert_eq!(names.len(), roots, "each first step once: {names:?}");
    assert!(
        carried
            .iter()
            .all(|s| s.task_id == task_id && s.attempt == 1)
    );
    assert!(carried.iter().all(|s| s.context == json!({"k": 1})));

    env.start_worker("batches-worker", &[NAMESPACE])
        .await
        .unwrap();
    let done = env
        .wait_for_task(
            &task_id.to_string(),
            &["complete", "error"],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(done["status"], "complete", "{done:#}");
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM steps ORDER BY name")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(attempts, vec![1; roots + 1], "every step ran once");
    // Every message was acked: nothing waits in the queue, nothing dead-lettered.
    assert_eq!(queue_messages(&queue).await.unwrap(), 0);
    let topology = tasker_shared::broker::Topology::new(env.prefix.clone());
    assert_no_dead_letters(&channel, &topology.dead_letter_queue()).await;
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_step_of_a_batch_no_handler_runs_is_dead_lettered_alone_and_the_others_run() {
    let mut env = TestEnv::start("batches-poison").await.unwrap();
    let (status, body) = env
        .register_template(&template("odd", 4, Some("no.such.handler")))
        .await
        .unwrap();
    assert!(status.is_success(), "{body}");
    env.start_worker("batches-worker", &[NAMESPACE])
        .await
        .unwrap();
    let task = env
        .run_task(
            json!({"namespace": NAMESPACE, "name": "odd"}),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(task["status"], "error", "{task:#}");
    let status_of = |name: &str| TestEnv::step(&task, name)["status"].clone();
    assert_eq!(status_of("r1"), "error");
    assert_eq!(
        TestEnv::step(&task, "r1")["last_error"]["code"],
        "unknown_handler",
        "{task:#}"
    );
    for name in ["r0", "r2", "r3"] {
        assert_eq!(status_of(name), "complete", "{name}: {task:#}");
    }
    assert_eq!(status_of("last"), "pending", "its parent failed");

    let (_connection, channel) = confirm_channel().await;
    let topology = tasker_shared::broker::Topology::new(env.prefix.clone());
    let letters = take_dead_letters(&channel, &topology.dead_letter_queue(), 1).await;
    let step = StepMessage::decode(&letters[0].body).expect("a step message of its own");
    assert_eq!(step.step_name, "r1");
    assert!(
        letters[0].reason.contains("unknown handler"),
        "{}",
        letters[0].reason
    );
    assert_eq!(letters[0].source_queue, env.queue(NAMESPACE));
    assert_no_dead_letters(&channel, &topology.dead_letter_queue()).await;
    assert_eq!(queue_messages(&env.queue(NAMESPACE)).await.unwrap(), 0);
    env.finish().await.unwrap();
}
