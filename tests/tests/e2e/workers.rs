//! Workers: sharing a namespace, staying out of others', waiting for a worker, and
//! stopping gracefully.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::json;
use tasker_tests::{StepStatus, Task, TaskStatus, TestEnv};

use crate::step_history;

fn sleepy(namespace: &str, ms: u64) -> String {
    format!(
        "namespace: {namespace}\nname: sleepy\nsteps:\n  - name: one\n    handler: tasker.sleep\n    config: {{ms: {ms}}}\n  - name: two\n    handler: tasker.sleep\n    config: {{ms: {ms}}}\n  - name: three\n    handler: tasker.noop\n    depends_on: [one, two]\n"
    )
}

/// Which worker ran each step, from the `started` transitions.
async fn workers_of(env: &TestEnv, task_ids: &[String]) -> HashMap<String, HashSet<String>> {
    let mut by_task = HashMap::new();
    for id in task_ids {
        let workers: HashSet<String> = step_history(&env.pool, id)
            .await
            .into_iter()
            .filter_map(|(_, _, _, _, metadata)| metadata["worker_id"].as_str().map(str::to_owned))
            .collect();
        by_task.insert(id.clone(), workers);
    }
    by_task
}

#[tokio::test]
async fn workers_share_their_namespace_and_never_see_another() {
    let mut env = TestEnv::start("sharing").await.unwrap();
    env.register_template(&sleepy("alpha", 100)).await.unwrap();
    env.register_template(&sleepy("beta", 10)).await.unwrap();
    env.start_worker("alpha-1", &["alpha"]).await.unwrap();
    env.start_worker("alpha-2", &["alpha"]).await.unwrap();
    env.start_worker("beta-1", &["beta"]).await.unwrap();

    let mut alpha = Vec::new();
    let mut beta = Vec::new();
    for i in 0..12 {
        let (_, task) = env
            .create_task(json!({"namespace": "alpha", "name": "sleepy", "context": {"i": i}}))
            .await
            .unwrap();
        alpha.push(task["task_id"].as_str().unwrap().to_owned());
        let (_, task) = env
            .create_task(json!({"namespace": "beta", "name": "sleepy", "context": {"i": i}}))
            .await
            .unwrap();
        beta.push(task["task_id"].as_str().unwrap().to_owned());
    }
    for id in alpha.iter().chain(&beta) {
        let task = env
            .wait_for_task(id, &["complete", "error"], Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(task["status"], "complete");
    }

    let alpha_workers: HashSet<String> = workers_of(&env, &alpha)
        .await
        .into_values()
        .flatten()
        .collect();
    let beta_workers: HashSet<String> = workers_of(&env, &beta)
        .await
        .into_values()
        .flatten()
        .collect();
    assert_eq!(
        alpha_workers,
        HashSet::from(["alpha-1".to_owned(), "alpha-2".to_owned()]),
        "both alpha workers work"
    );
    assert_eq!(
        beta_workers,
        HashSet::from(["beta-1".to_owned()]),
        "only the beta worker runs beta"
    );
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_task_waits_for_a_worker_and_completes_once_one_starts() {
    let mut env = TestEnv::start("waiting").await.unwrap();
    env.register_template(&sleepy("gamma", 10)).await.unwrap();
    let task = env
        .api
        .create_task(&json!({"namespace": "gamma", "name": "sleepy"}))
        .await
        .unwrap();

    // Both roots are claimed and waiting in the queue.
    let statuses = |task: &Task| task.steps.iter().map(|s| s.status).collect::<Vec<_>>();
    let waiting = env
        .api
        .wait_until(
            task.task_id,
            "steps enqueued",
            Duration::from_secs(10),
            |t| {
                statuses(t)
                    == [
                        StepStatus::Enqueued,
                        StepStatus::Enqueued,
                        StepStatus::Pending,
                    ]
            },
        )
        .await
        .unwrap();
    assert_eq!(waiting.status, TaskStatus::InProgress);

    // A worker that serves every namespace learns about gamma and drains it.
    env.start_worker("late", &[]).await.unwrap();
    let done = env
        .api
        .wait_for_task(
            task.task_id,
            &[TaskStatus::Complete, TaskStatus::Error],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Complete);
    assert!(done.steps.iter().all(|s| s.attempts == 1), "{done:#?}");
    // Nothing moved without a worker: from its dispatch until the worker started it,
    // no step has a transition at all (no lease lost, no failure, no second dispatch).
    let history = step_history(&env.pool, task.task_id).await;
    for step in ["one", "two", "three"] {
        let reasons: Vec<&str> = history
            .iter()
            .filter(|(name, ..)| name == step)
            .map(|(_, _, _, reason, _)| reason.as_str())
            .collect();
        assert_eq!(
            reasons,
            ["dispatched", "started", "succeeded"],
            "{step}: {history:#?}"
        );
    }
    env.finish().await.unwrap();
}

/// Wait until both sleeps of a `sleepy` task run.
async fn both_sleeps_running(env: &TestEnv, id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, task) = env.get(&format!("/v1/tasks/{id}")).await.unwrap();
        if task["steps"][0]["status"] == "in_progress"
            && task["steps"][1]["status"] == "in_progress"
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "steps never started: {task:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sigterm_lets_a_worker_finish_its_running_step_before_it_exits() {
    let mut env = TestEnv::start("sigterm").await.unwrap();
    env.register_template(&sleepy("delta", 1500)).await.unwrap();
    let index = env.start_worker("leaving", &["delta"]).await.unwrap();
    let (_, task) = env
        .create_task(json!({"namespace": "delta", "name": "sleepy"}))
        .await
        .unwrap();
    let id = task["task_id"].as_str().unwrap().to_owned();

    // Wait until both sleeps are running, then ask the worker to stop.
    both_sleeps_running(&env, &id).await;
    let exit = env.workers[index].terminate().await.unwrap();
    assert!(
        exit.success(),
        "worker exit: {exit}; log:\n{}",
        env.workers[index].log()
    );

    // Both running steps finished and reported; the third waits for a worker.
    let (_, task) = env.get(&format!("/v1/tasks/{id}")).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut task = task;
    while task["steps"][0]["status"] != "complete" || task["steps"][1]["status"] != "complete" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "running steps were lost: {task:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        task = env.get(&format!("/v1/tasks/{id}")).await.unwrap().1;
    }
    assert_eq!(task["steps"][0]["attempts"], 1);
    assert_eq!(task["steps"][1]["attempts"], 1);

    env.start_worker("arriving", &["delta"]).await.unwrap();
    let done = env
        .wait_for_task(&id, &["complete", "error"], Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done["status"], "complete");
    env.finish().await.unwrap();
}

/// A task cancelled while a worker drains after SIGTERM: the worker aborts its running
/// step, as it would before, instead of finishing it.
#[tokio::test]
async fn a_cancel_during_a_sigterm_drain_aborts_the_running_step() {
    let mut env = TestEnv::start("drain-cancel").await.unwrap();
    env.register_template(&sleepy("echo", 60_000))
        .await
        .unwrap();
    let index = env.start_worker("leaving", &["echo"]).await.unwrap();
    let (_, task) = env
        .create_task(json!({"namespace": "echo", "name": "sleepy"}))
        .await
        .unwrap();
    let id = task["task_id"].as_str().unwrap().to_owned();
    both_sleeps_running(&env, &id).await;
    // One SIGTERM (a second would stop the worker at once), then the cancel.
    let pid = env.workers[index].pid().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    env.workers[index]
        .wait_for_log("stopping: no new steps", Duration::from_secs(10))
        .await
        .unwrap();
    let (status, cancelled) = env
        .post(
            &format!("/v1/tasks/{id}/cancel"),
            json!({"reason": "withdrawn"}),
        )
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 200, "{cancelled}");

    // Both 60 s sleeps were aborted: the worker exits long before they would end.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while env.workers[index].running() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the draining worker ran its cancelled steps on; log:\n{}",
            env.workers[index].log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        env.workers[index]
            .log()
            .contains("task cancelled: aborted its running steps"),
        "{}",
        env.workers[index].log()
    );
    env.finish().await.unwrap();
}

/// SIGTERM while every handler slot is busy and a received step waits for one: the
/// worker finishes the running step, hands the waiting one back without starting it, and
/// exits; another worker runs it.
#[tokio::test]
async fn sigterm_with_every_slot_busy_hands_back_the_step_waiting_for_one() {
    let mut env = TestEnv::start("sigterm-busy").await.unwrap();
    env.register_template(
        "namespace: full\nname: one\nsteps:\n  - name: only\n    handler: tasker.sleep\n    config: {ms: 3000}\n",
    )
    .await
    .unwrap();
    let index = env
        .start_worker_binary(
            tasker_tests::binary("tasker-worker"),
            "full-leaving",
            &["full"],
            1,
        )
        .await
        .unwrap();
    let create = json!({"namespace": "full", "name": "one", "context": {}});
    let running = env.api.create_task(&create).await.unwrap().task_id;
    let waiting = env.api.create_task(&create).await.unwrap().task_id;
    env.api
        .wait_until(running, "step running", Duration::from_secs(30), |t| {
            t.step("only").status == StepStatus::InProgress
        })
        .await
        .unwrap();
    // The second message is with the worker (its prefetch is twice its one slot).
    tasker_tests::wait_until_taken(&env.queue("full"), Duration::from_secs(30))
        .await
        .expect("the worker takes the second step's message");

    let exit = env.workers[index].terminate().await.unwrap();
    assert!(exit.success(), "worker exit: {exit}");
    // Its result was published before the worker exited; the coordinator applies it.
    let ran = env
        .api
        .wait_for_task(
            running,
            &[TaskStatus::Complete, TaskStatus::Error],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(
        ran.status,
        TaskStatus::Complete,
        "the running step finished: {ran:#?}"
    );
    let left = env.api.task(waiting).await.unwrap();
    assert_eq!(
        left.step("only").status,
        StepStatus::Enqueued,
        "the waiting step was handed back, not started: {left:#?}"
    );

    env.start_worker("full-arriving", &["full"]).await.unwrap();
    let done = env
        .api
        .wait_for_task(
            waiting,
            &[TaskStatus::Complete, TaskStatus::Error],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Complete);
    assert_eq!(
        workers_of(&env, &[waiting.to_string()]).await[&waiting.to_string()],
        HashSet::from(["full-arriving".to_owned()]),
        "only the new worker ran it"
    );
    env.finish().await.unwrap();
}

#[tokio::test]
async fn results_that_finish_together_leave_the_worker_together() {
    // 64 instances start at once on a worker that runs them all, sleep alike and finish
    // within a few milliseconds: while the first results wait for their confirms, the
    // rest gather into `results` batches. Each result still lands on its own step.
    let mut env = TestEnv::start("result-batches").await.unwrap();
    let template = "namespace: batching\nname: wide\nsteps:\n  - name: nap\n    handler: tasker.sleep\n    config: {ms: 300}\n    for_each: \"context.items\"\n  - name: after\n    handler: tasker.echo\n    depends_on: [nap]\n";
    let (status, body) = env.register_template(template).await.unwrap();
    assert!(status.is_success(), "{body}");
    let (_, worker_metrics) = env
        .start_metered_worker("wide-1", &["batching"], 64)
        .await
        .unwrap();
    let items: Vec<u64> = (0..64).collect();
    let task = env
        .run_task(
            json!({"namespace": "batching", "name": "wide", "context": {"items": items}}),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(task["status"], "complete");
    let after = TestEnv::step(&task, "after");
    let naps = after["results"]["parents"]["nap"].as_array().unwrap();
    assert_eq!(naps.len(), 64);
    assert!(naps.iter().all(|nap| nap["slept_ms"] == 300), "{naps:?}");

    let results =
        tasker_tests::metric(&worker_metrics, "tasker_worker_result_batch_size_sum").await;
    let messages =
        tasker_tests::metric(&worker_metrics, "tasker_worker_result_batch_size_count").await;
    assert_eq!(results, 65.0, "every result went through the sender");
    assert!(
        messages < results,
        "{messages} messages for {results} results: none was batched"
    );
    assert_eq!(
        tasker_tests::metric(&env.metrics_url(), "tasker_stale_results_dropped_total").await,
        0.0
    );
    env.finish().await.unwrap();
}

/// A namespace announced whose queue the worker cannot declare (one of the other type, or
/// with other arguments) is logged and left to other workers: the broker closes the
/// channel the declaration failed on, and that is not the channel the worker's running
/// steps came on, so they go on and run once.
#[tokio::test]
async fn a_namespace_the_worker_cannot_declare_leaves_its_running_steps_alone() {
    use lapin::types::AMQPValue;

    let mut env = TestEnv::start("clash").await.unwrap();
    env.register_template(&sleepy("steady", 3_000))
        .await
        .unwrap();
    let (index, metrics) = env
        .start_metered_worker("everything", &[], 4)
        .await
        .unwrap();
    let (_, task) = env
        .create_task(json!({"namespace": "steady", "name": "sleepy"}))
        .await
        .unwrap();
    let id = task["task_id"].as_str().unwrap().to_owned();
    both_sleeps_running(&env, &id).await;

    // A queue where the namespace's would be, declared with an argument Tasker's lacks.
    let (_connection, channel) = tasker_tests::confirm_channel().await;
    let clash = env.queue("clash");
    tasker_tests::declare_queue_with(
        &channel,
        &clash,
        ("x-max-length", AMQPValue::LongLongInt(5)),
    )
    .await;
    let announcement = json!({"type": "namespaces", "namespaces": ["clash"]});
    tasker_tests::publish(
        &channel,
        &tasker_shared::broker::Topology::new(env.prefix.clone()).control_exchange(),
        "",
        announcement.to_string().as_bytes(),
    )
    .await;
    env.workers[index]
        .wait_for_log("cannot consume namespace", Duration::from_secs(20))
        .await
        .unwrap();

    let done = env
        .api
        .wait_for_task(
            uuid::Uuid::parse_str(&id).unwrap(),
            &[TaskStatus::Complete, TaskStatus::Error],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Complete);
    assert!(done.steps.iter().all(|s| s.attempts == 1), "{done:#?}");
    assert_eq!(
        tasker_tests::metric(&metrics, "tasker_worker_broker_reconnects_total").await,
        0.0,
        "the session went on"
    );
    tasker_tests::delete_queue(&clash).await.unwrap();
    env.finish().await.unwrap();
}

/// A namespace whose announcement never went out (its template stored while RabbitMQ was
/// away, or by a coordinator that stopped before it announced) still reaches the workers
/// that serve every namespace: the coordinator announces the namespaces again every 30 s.
#[tokio::test]
async fn a_namespace_never_announced_reaches_the_workers_at_the_next_announcement() {
    let mut env = TestEnv::start("announce-again").await.unwrap();
    env.start_metered_worker("everything", &[], 2)
        .await
        .unwrap();
    // Stored without the API: nothing announces it.
    let definition = tasker_shared::template::parse_template(&sleepy("quiet", 10), "test").unwrap();
    tasker_shared::store::templates::register(&env.pool, &definition)
        .await
        .unwrap();
    let (status, task) = env
        .create_task(json!({"namespace": "quiet", "name": "sleepy"}))
        .await
        .unwrap();
    assert!(status.is_success(), "{status} {task}");
    let done = env
        .api
        .wait_for_task(
            uuid::Uuid::parse_str(task["task_id"].as_str().unwrap()).unwrap(),
            &[TaskStatus::Complete, TaskStatus::Error],
            Duration::from_secs(90),
        )
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    tasker_tests::delete_queue(&env.queue("quiet"))
        .await
        .unwrap();
    env.finish().await.unwrap();
}
