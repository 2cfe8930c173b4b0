//! `tasker.task`: a step the coordinator runs, holding no worker slot, that starts a task
//! of another template and completes with its leaf results; retried, failed and
//! cancelled with it.

use std::time::Duration;

use serde_json::{Value, json};
use tasker_tests::{EnvOptions, StepStatus, TaskStatus, TestEnv, binary};
use uuid::Uuid;

/// A region's import: `load` and `count` are its leaves.
const REGION: &str = r#"namespace: kids
name: region
context_schema:
  type: object
  required: [region]
  properties: {region: {type: string}}
steps:
  - name: fetch
    handler: tasker.echo
  - name: load
    handler: tasker.echo
    depends_on: [fetch]
  - name: count
    handler: tasker.noop
"#;

/// Plans, imports a region as a child task, reports.
const NIGHTLY: &str = r#"namespace: kids
name: nightly
steps:
  - name: plan
    handler: tasker.echo
  - name: import
    handler: tasker.task
    depends_on: [plan]
    config:
      namespace: kids
      name: region
      context: '{"region": context.region, "planned": parents.plan.context.region}'
  - name: report
    handler: tasker.echo
    depends_on: [import]
"#;

/// A child that waits for a signal, and its parent.
const HELD: &str = "namespace: kids\nname: held\nsteps:\n  - {name: hold, handler: tasker.wait, config: {signal: go}}\n";
const HOLDER: &str = "namespace: kids\nname: holder\nsteps:\n  - {name: start, handler: tasker.task, config: {namespace: kids, name: held}}\n  - {name: after, handler: tasker.noop, depends_on: [start]}\n";

/// A child that always fails, and a parent whose step tries it twice.
const BROKEN: &str = "namespace: kids\nname: broken\nsteps:\n  - {name: boom, handler: tasker.fail, retry_limit: 1, config: {kind: permanent}}\n";
const TRIER: &str = "namespace: kids\nname: trier\nsteps:\n  - {name: try, handler: tasker.task, retry_limit: 2, config: {namespace: kids, name: broken}}\n  - {name: clean, handler: tasker.noop, depends_on: [try], trigger: all_done}\n";

const WAIT: Duration = Duration::from_secs(60);

async fn task_json(env: &TestEnv, task_id: Uuid) -> Value {
    let (status, body) = env.get(&format!("/v1/tasks/{task_id}")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// The child of a parent's step, once started.
async fn child_of(env: &TestEnv, parent: Uuid, step: &str) -> Uuid {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let task = task_json(env, parent).await;
        if let Some(child) = TestEnv::step(&task, step)["child_task_id"].as_str() {
            return child.parse().unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{step} started no child: {task}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A new `holder` task, and the child its step `start` started.
async fn holder_and_child(env: &TestEnv) -> (Uuid, Uuid) {
    let parent = env
        .api
        .create_task(&json!({"namespace": "kids", "name": "holder"}))
        .await
        .unwrap()
        .task_id;
    (parent, child_of(env, parent, "start").await)
}

/// Cancel the child of a new `holder` task: its step `start` fails for good
/// (`child_task_cancelled`), and so does the task.
async fn cancelling_the_child_fails_its_step(env: &TestEnv) {
    let (parent, child) = holder_and_child(env).await;
    let (status, body) = env
        .post(&format!("/v1/tasks/{child}/cancel"), json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let failed = crate::finished(env, parent, WAIT).await;
    assert_eq!(failed.status, TaskStatus::Error);
    let error = failed.step("start").last_error.clone().unwrap();
    assert_eq!(error.code.as_deref(), Some("child_task_cancelled"));
}

#[tokio::test]
async fn a_child_task_runs_on_the_only_worker_slot_and_completes_its_step_with_its_leaves() {
    let mut env = TestEnv::start("child-tasks").await.unwrap();
    env.register_templates(&[REGION, NIGHTLY]).await;
    // One worker running one step at a time: the step that waits for its child holds none.
    env.start_worker_with(binary("tasker-worker"), "one", &["kids"], 1, &[])
        .await
        .unwrap();

    let task = env
        .api
        .create_task(&json!({"namespace": "kids", "name": "nightly", "context": {"region": "eu"}}))
        .await
        .unwrap();
    let done = crate::finished(&env, task.task_id, WAIT).await;
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");

    // The step's results are the child's leaves by name; its dependents see them.
    let import = done.step("import");
    let results = import.results.clone().unwrap();
    let mut leaves: Vec<&String> = results.as_object().unwrap().keys().collect();
    leaves.sort();
    assert_eq!(leaves, ["count", "load"], "{results}");
    assert_eq!(
        results["load"]["context"],
        json!({"region": "eu", "planned": "eu"})
    );
    assert_eq!(results["count"], json!({}));
    assert_eq!(
        done.step("report").results.clone().unwrap()["parents"]["import"],
        results
    );
    assert_eq!(import.attempts, 1);

    // The parent lists its child; the child names its parent.
    let parent = task_json(&env, task.task_id).await;
    let child_id = TestEnv::step(&parent, "import")["child_task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let children = parent["children"].as_array().unwrap();
    assert_eq!(children.len(), 1, "{parent}");
    assert_eq!(children[0]["task_id"], child_id.as_str());
    assert_eq!(children[0]["step"], "import");
    assert_eq!(children[0]["name"], "region");
    assert_eq!(children[0]["status"], "complete");
    assert_eq!(parent["parent_task_id"], Value::Null);
    let child = task_json(&env, child_id.parse().unwrap()).await;
    assert_eq!(child["parent_task_id"], task.task_id.to_string());
    assert_eq!(child["status"], "complete");
    assert_eq!(child["context"], json!({"region": "eu", "planned": "eu"}));

    let history: Vec<String> = crate::step_history(&env.pool, task.task_id)
        .await
        .into_iter()
        .filter(|(name, ..)| name == "import")
        .map(|(_, _, to, reason, _)| format!("{to}:{reason}"))
        .collect();
    assert_eq!(
        history,
        ["pending:child_task_started", "complete:child_task_done"],
        "{history:?}"
    );

    // A context the child's schema refuses fails the step for good.
    let bad = env
        .api
        .create_task(&json!({"namespace": "kids", "name": "nightly", "context": {"region": 7}}))
        .await
        .unwrap();
    let failed = crate::finished(&env, bad.task_id, WAIT).await;
    assert_eq!(failed.status, TaskStatus::Error);
    let error = failed.step("import").last_error.clone().unwrap();
    assert_eq!(error.code.as_deref(), Some("invalid_context"), "{error:?}");
    assert!(error.message.contains("kids/region"), "{error:?}");
    assert_eq!(failed.step("report").status, StepStatus::Pending);
    assert!(
        task_json(&env, bad.task_id).await["children"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn cancelling_a_parent_cancels_its_child_and_a_cancelled_child_fails_its_step() {
    let mut env = TestEnv::start("child-cancel").await.unwrap();
    env.register_templates(&[HELD, HOLDER]).await;
    env.start_worker("w", &["kids"]).await.unwrap();

    // The waiting step says which child it waits for.
    let (parent, child) = holder_and_child(&env).await;
    let (_, readiness) = env
        .get(&format!("/v1/tasks/{parent}/readiness"))
        .await
        .unwrap();
    let start = readiness["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "start")
        .unwrap()
        .clone();
    assert_eq!(start["reason"], "waiting_for_child_task", "{readiness}");
    assert!(
        start["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!("waiting for child task {child} (kids/held")),
        "{start}"
    );

    // The step cannot be resolved while its child runs.
    let (status, body) = env
        .post(
            &format!("/v1/tasks/{parent}/steps/start/resolve"),
            json!({}),
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "invalid_state", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("waits for its child task {child}")),
        "{body}"
    );

    // Cancelling the parent cancels the child.
    let (status, body) = env
        .post(
            &format!("/v1/tasks/{parent}/cancel"),
            json!({"reason": "not tonight"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let cancelled = crate::finished(&env, child, WAIT).await;
    assert_eq!(cancelled.status, TaskStatus::Cancelled);
    assert_eq!(cancelled.step("hold").status, StepStatus::Cancelled);
    assert_eq!(
        crate::task_history(&env.pool, child).await.last().unwrap(),
        "parent_cancelled"
    );

    // Cancelling a child fails the step that started it (for good), and its task.
    cancelling_the_child_fails_its_step(&env).await;

    // A signal to the child completes it, and its parent goes on.
    let (parent, child) = holder_and_child(&env).await;
    let (status, body) = env
        .post(
            &format!("/v1/tasks/{child}/signals/go"),
            json!({"ok": true}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let done = crate::finished(&env, parent, WAIT).await;
    assert_eq!(done.status, TaskStatus::Complete);
    assert_eq!(
        done.step("start").results,
        Some(json!({"hold": {"ok": true}}))
    );
    assert_eq!(done.step("after").status, StepStatus::Complete);
}

#[tokio::test]
async fn a_child_that_ends_outside_a_result_is_judged_on_its_steps_last_attempt() {
    let mut env = TestEnv::start("child-last-attempt").await.unwrap();
    let holder = HOLDER.replace(
        "handler: tasker.task,",
        "handler: tasker.task, retry_limit: 1,",
    );
    env.register_templates(&[HELD, &holder]).await;
    env.start_worker("w", &["kids"]).await.unwrap();

    // The only attempt of `start` is its child's run. The child ends by an operator's
    // cancel, not by a result: the cancel judges `start`.
    cancelling_the_child_fails_its_step(&env).await;
}

#[tokio::test]
async fn a_task_with_a_failed_branch_waits_for_its_running_child_before_it_fails() {
    let mut env = TestEnv::start("child-beside-failure").await.unwrap();
    // `start` runs a child waiting for a signal; `boom` fails for good meanwhile.
    let holder = format!(
        "{HOLDER}  - {{name: boom, handler: tasker.fail, retry_limit: 1, config: {{kind: permanent}}}}\n"
    );
    env.register_templates(&[HELD, &holder]).await;
    env.start_worker("w", &["kids"]).await.unwrap();
    let (parent, child) = holder_and_child(&env).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while TestEnv::step(&task_json(&env, parent).await, "boom")["status"] != "error" {
        assert!(tokio::time::Instant::now() < deadline, "boom never failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give a finish of the task its chance.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The child still runs: its parent is not finished under it.
    let task = task_json(&env, parent).await;
    assert_eq!(task["status"], "in_progress", "{task}");

    // Once the child completes, `start` and its branch complete, and the task ends in
    // error for `boom`.
    let (status, body) = env
        .post(&format!("/v1/tasks/{child}/signals/go"), json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let failed = crate::finished(&env, parent, WAIT).await;
    assert_eq!(failed.status, TaskStatus::Error);
    assert_eq!(failed.step("start").status, StepStatus::Complete);
    assert_eq!(failed.step("after").status, StepStatus::Complete);
}

#[tokio::test]
async fn a_child_with_every_step_skipped_completes_the_step_a_result_started_it_from() {
    let mut env = TestEnv::start("child-all-skipped").await.unwrap();
    let skipped = "namespace: kids\nname: skipped\nsteps:\n  - {name: never, handler: tasker.noop, when: \"false\"}\n";
    // `start` is ready when `first`'s result comes: that result's transaction starts the
    // child, whose only step is skipped at once.
    let parent = "namespace: kids\nname: after_first\nsteps:\n  - {name: first, handler: tasker.noop}\n  - {name: start, handler: tasker.task, depends_on: [first], config: {namespace: kids, name: skipped}}\n";
    env.register_templates(&[skipped, parent]).await;
    env.start_worker("w", &["kids"]).await.unwrap();
    let task = env
        .api
        .create_task(&json!({"namespace": "kids", "name": "after_first"}))
        .await
        .unwrap();
    let done = crate::finished(&env, task.task_id, Duration::from_secs(20)).await;
    assert_eq!(done.status, TaskStatus::Complete);
    assert_eq!(done.step("start").results, Some(json!({})));
}

#[tokio::test]
async fn a_failed_child_is_retried_by_its_steps_policy_then_fails_it() {
    let mut env = TestEnv::start("child-retry").await.unwrap();
    env.register_templates(&[BROKEN, TRIER]).await;
    env.start_worker("w", &["kids"]).await.unwrap();

    let task = env
        .api
        .create_task(&json!({"namespace": "kids", "name": "trier"}))
        .await
        .unwrap();
    let done = crate::finished(&env, task.task_id, WAIT).await;
    assert_eq!(done.status, TaskStatus::Error);
    let step = done.step("try");
    assert_eq!(step.status, StepStatus::Error);
    assert_eq!(step.attempts, 2);
    let error = step.last_error.clone().unwrap();
    assert_eq!(error.code.as_deref(), Some("child_task_failed"));
    assert!(
        error
            .message
            .contains("(attempt 2 of 2): boom: tasker.fail"),
        "{error:?}"
    );
    // The clean-up ran after it.
    assert_eq!(done.step("clean").status, StepStatus::Complete);

    // One child, run twice: the step retried it rather than starting another.
    let parent = task_json(&env, task.task_id).await;
    let children = parent["children"].as_array().unwrap();
    assert_eq!(children.len(), 1, "{parent}");
    let child: Uuid = children[0]["task_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(children[0]["status"], "error");
    let runs = crate::step_history(&env.pool, child)
        .await
        .into_iter()
        .filter(|(_, _, _, reason, _)| reason == "started")
        .count();
    assert_eq!(runs, 2);
    let reasons: Vec<String> = crate::step_history(&env.pool, task.task_id)
        .await
        .into_iter()
        .filter(|(name, ..)| name == "try")
        .map(|(_, _, _, reason, _)| reason)
        .collect();
    assert_eq!(
        reasons,
        ["child_task_started", "child_task_retried", "failed"],
        "{reasons:?}"
    );
}

#[tokio::test]
async fn a_child_task_step_is_checked_at_registration_and_a_missing_template_fails_it() {
    let env = TestEnv::start("child-checks").await.unwrap();
    let bad = r#"namespace: kids
name: bad
steps:
  - {name: a, handler: tasker.task}
  - {name: b, handler: tasker.task, config: {namespace: kids, name: x, context: "nope.y", colour: 1}}
  - {name: c, handler: tasker.task, for_each: "[1]", config: {name: x, version: one}}
"#;
    let (status, body) = env.register_template(bad).await.unwrap();
    assert_eq!(status, 422, "{body}");
    let mut problems = crate::problems(&body);
    problems.sort();
    assert_eq!(
        problems,
        [
            ("steps[0].config", "missing_key"),
            ("steps[1].config.colour", "unknown_key"),
            ("steps[1].config.context", "invalid_expression"),
            ("steps[2].config.namespace", "missing_key"),
            ("steps[2].config.version", "invalid_value"),
            ("steps[2].for_each", "invalid_value"),
        ],
        "{body}"
    );

    let orphan = "namespace: kids\nname: orphan\nsteps:\n  - {name: a, handler: tasker.task, config: {namespace: kids, name: nowhere}}\n";
    env.register_templates(&[orphan]).await;
    let task = env
        .api
        .create_task(&json!({"namespace": "kids", "name": "orphan"}))
        .await
        .unwrap();
    let done = crate::finished(&env, task.task_id, WAIT).await;
    assert_eq!(done.status, TaskStatus::Error);
    let error = done.step("a").last_error.clone().unwrap();
    assert_eq!(error.code.as_deref(), Some("template_not_found"));
    assert!(error.message.contains("kids/nowhere"), "{error:?}");
}

#[tokio::test]
async fn a_child_cancelled_as_the_oldest_of_its_key_fails_the_step_that_started_it() {
    let mut env = TestEnv::start("child-cancel-oldest").await.unwrap();
    // One `held` at a time: a new one cancels the oldest running.
    let held = HELD.replace(
        "steps:",
        "concurrency:\n  - {key: \"'one'\", limit: 1, on_limit: cancel_oldest}\nsteps:",
    );
    let holder = HOLDER.replace(
        "handler: tasker.task,",
        "handler: tasker.task, retry_limit: 1,",
    );
    env.register_templates(&[&held, &holder]).await;
    env.start_worker("w", &["kids"]).await.unwrap();
    let (parent, child) = holder_and_child(&env).await;

    // A `held` of its own: the claim of its first step cancels the child.
    env.api
        .create_task(&json!({"namespace": "kids", "name": "held"}))
        .await
        .unwrap();
    let cancelled = env.api.task(child).await.unwrap();
    assert_eq!(cancelled.status, TaskStatus::Cancelled);
    let failed = crate::finished(&env, parent, Duration::from_secs(30)).await;
    assert_eq!(failed.status, TaskStatus::Error);
    let error = failed.step("start").last_error.clone().unwrap();
    assert_eq!(error.code.as_deref(), Some("child_task_cancelled"));
}

#[tokio::test]
async fn a_retried_parent_past_its_deadline_retries_its_child() {
    let mut env = TestEnv::start("child-deadline-retry").await.unwrap();
    env.register_templates(&[HELD, HOLDER]).await;
    env.start_worker("w", &["kids"]).await.unwrap();
    let deadline = chrono::Utc::now() + chrono::TimeDelta::milliseconds(1500);
    let parent = env
        .api
        .create_task(&json!({"namespace": "kids", "name": "holder",
                              "deadline": deadline.to_rfc3339()}))
        .await
        .unwrap()
        .task_id;
    let child = child_of(&env, parent, "start").await;
    // The deadline ends both: the child inherits it.
    let late = crate::finished(&env, parent, WAIT).await;
    assert_eq!(late.status, TaskStatus::Error);
    assert_eq!(late.step("start").status, StepStatus::Cancelled);
    env.api
        .wait_for_task(child, &[TaskStatus::Error], WAIT)
        .await
        .unwrap();

    // The retry gives `start` back, which retries its child, which waits for its signal
    // again.
    let (status, body) = env
        .post(&format!("/v1/tasks/{parent}/retry"), json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting = env.api.task(child).await.unwrap();
        if waiting.status == TaskStatus::InProgress && waiting.deadline_at.is_none() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the child was not retried: {waiting:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = env
        .post(&format!("/v1/tasks/{child}/signals/go"), json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let done = crate::finished(&env, parent, WAIT).await;
    assert_eq!(done.status, TaskStatus::Complete);
    assert_eq!(done.step("after").status, StepStatus::Complete);
}

#[tokio::test]
async fn the_children_of_a_parent_cancelled_as_the_oldest_of_its_key_are_cancelled_with_it() {
    let mut env = TestEnv::start("child-orphans").await.unwrap();
    // One `holder` at a time: a new one cancels the oldest running, whose child waits.
    let holder = HOLDER.replace(
        "steps:",
        "concurrency:\n  - {key: \"'one'\", limit: 1, on_limit: cancel_oldest}\nsteps:",
    );
    env.register_templates(&[HELD, &holder]).await;
    env.start_worker("w", &["kids"]).await.unwrap();
    let (parent, child) = holder_and_child(&env).await;

    let (newer, _) = holder_and_child(&env).await;
    assert_eq!(
        env.api.task(parent).await.unwrap().status,
        TaskStatus::Cancelled
    );
    let cancelled = env
        .api
        .wait_for_task(child, &[TaskStatus::Cancelled], Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(cancelled.step("hold").status, StepStatus::Cancelled);
    let history = crate::task_history(&env.pool, child).await;
    assert_eq!(history.last().map(String::as_str), Some("parent_cancelled"));
    // The newer one runs on.
    assert_eq!(
        env.api.task(newer).await.unwrap().status,
        TaskStatus::InProgress
    );
}

#[tokio::test]
async fn a_template_that_starts_itself_stops_at_the_depth_limit_without_retrying() {
    let mut env = TestEnv::start("child-depth").await.unwrap();
    // `again` starts another `again` as its first step, without end; its steps may retry.
    let looping = "namespace: kids\nname: again\nsteps:\n  - {name: deeper, handler: tasker.task, retry_limit: 3, config: {namespace: kids, name: again}}\n";
    env.register_templates(&[looping]).await;
    env.start_worker("w", &["kids"]).await.unwrap();
    let root = env
        .api
        .create_task(&json!({"namespace": "kids", "name": "again"}))
        .await
        .unwrap()
        .task_id;
    let failed = crate::finished(&env, root, WAIT).await;
    assert_eq!(failed.status, TaskStatus::Error);
    let error = failed.step("deeper").last_error.clone().unwrap();
    assert_eq!(
        error.code.as_deref(),
        Some("child_task_too_deep"),
        "{error:?}"
    );

    // The root and 32 levels of children below it, each tried once.
    let (tasks, deepest, retried): (i64, i16, i64) = sqlx::query_as(
        "SELECT count(*), max(depth), \
                (SELECT count(*) FROM step_transitions WHERE reason = 'child_task_retried') \
         FROM tasks",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((tasks, deepest, retried), (33, 32, 0));
}

#[tokio::test]
async fn a_tree_of_children_wider_than_one_transaction_takes_completes() {
    let mut env = TestEnv::start("child-wide").await.unwrap();
    // 300 children at once, each of which starts a grandchild as its first step: past
    // the 256 children one transaction starts, the dispatcher takes up the rest.
    let leaf = "namespace: kids\nname: leaf\nsteps:\n  - {name: work, handler: tasker.noop}\n";
    let mid = "namespace: kids\nname: mid\nsteps:\n  - {name: down, handler: tasker.task, config: {namespace: kids, name: leaf}}\n";
    let steps: String = (0..300)
        .map(|i| {
            format!(
                "  - {{name: c{i}, handler: tasker.task, config: {{namespace: kids, name: mid}}}}\n"
            )
        })
        .collect();
    let wide = format!("namespace: kids\nname: wide\nsteps:\n{steps}");
    env.register_templates(&[leaf, mid, &wide]).await;
    env.start_worker("w", &["kids"]).await.unwrap();
    let root = env
        .api
        .create_task(&json!({"namespace": "kids", "name": "wide"}))
        .await
        .unwrap()
        .task_id;
    let done = crate::finished(&env, root, WAIT).await;
    assert_eq!(done.status, TaskStatus::Complete);
    assert_eq!(
        done.step("c299").results,
        Some(json!({"down": {"work": {}}}))
    );
    let (complete,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM tasks WHERE status = 'complete'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(complete, 601);
}

#[tokio::test]
async fn a_template_that_starts_itself_from_two_steps_stops_at_the_tree_limit_without_retrying() {
    // TASKER_MAX_TASK_TREE is read by the coordinator process: a binary one, so that no
    // other test's coordinator in this process shares the limit.
    let options = EnvOptions {
        binary_coordinator: true,
        coordinator_env: vec![("TASKER_MAX_TASK_TREE".into(), "20".into())],
        ..EnvOptions::default()
    };
    let env = TestEnv::start_with("child-tree", options).await.unwrap();
    // `fork` starts two more `fork`s: a tree that doubles at each level, 2^32 tasks before
    // its depth stops it. Its steps may retry.
    let fork = "namespace: kids\nname: fork\nsteps:\n  - {name: left, handler: tasker.task, retry_limit: 3, config: {namespace: kids, name: fork}}\n  - {name: right, handler: tasker.task, retry_limit: 3, config: {namespace: kids, name: fork}}\n";
    env.register_templates(&[fork]).await;
    let root = env
        .api
        .create_task(&json!({"namespace": "kids", "name": "fork"}))
        .await
        .unwrap()
        .task_id;
    let failed = crate::finished(&env, root, WAIT).await;
    assert_eq!(failed.status, TaskStatus::Error);
    for step in ["left", "right"] {
        let error = failed.step(step).last_error.clone().unwrap();
        assert_eq!(
            error.code.as_deref(),
            Some("child_task_tree_too_large"),
            "{step}: {error:?}"
        );
    }

    // The tree stopped at 20 tasks, every one of them ended in error, none retried.
    let (tasks, failed_tasks, in_tree, retried): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE status = 'error'), \
                count(*) FILTER (WHERE root_task_id = $1 OR task_id = $1), \
                (SELECT count(*) FROM step_transitions WHERE reason = 'child_task_retried') \
         FROM tasks",
    )
    .bind(root)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((tasks, failed_tasks, in_tree, retried), (20, 20, 20, 0));
    env.finish().await.unwrap();
}
