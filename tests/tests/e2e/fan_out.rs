//! `for_each`: a step that runs once per element of a list, its instances bounded by
//! `max_parallel`, its dependents given the instances' results in element order.

use std::time::Duration;

use serde_json::{Value, json};
use tasker_tests::{
    StatusCode, StepStatus, TaskStatus, TestEnv, assert_no_dead_letters, confirm_channel,
};

/// List → fan out over what the list step returned → fan in.
const FILES: &str = r#"namespace: fan
name: files
steps:
  - name: list
    handler: tasker.echo
  - name: load
    handler: tasker.echo
    depends_on: [list]
    for_each: "parents.list.context.files"
  - name: report
    handler: tasker.echo
    depends_on: [load]
"#;

/// A first step that fans out over the context, at most three at once.
const SLOW: &str = r#"namespace: fan
name: slow
steps:
  - name: nap
    handler: tasker.sleep
    config: {ms: 150}
    for_each: "context.regions"
    max_parallel: 3
  - name: done
    handler: tasker.noop
    depends_on: [nap]
"#;

const WAIT: Duration = Duration::from_secs(120);

async fn finished(env: &TestEnv, task_id: uuid::Uuid) -> tasker_tests::Task {
    crate::finished(env, task_id, WAIT).await
}

#[tokio::test]
async fn each_element_runs_once_and_the_fan_in_sees_the_results_in_order() {
    let mut env = TestEnv::start("fan-out-order").await.unwrap();
    let (status, body) = env.register_template(FILES).await.unwrap();
    assert_eq!(status, 201, "{body}");
    env.start_worker("fan-1", &["fan"]).await.unwrap();
    env.start_worker("fan-2", &["fan"]).await.unwrap();

    // Small elements: the report echoes every instance's echo of the context.
    let files: Vec<Value> = (0..300).map(|n| json!(n * 7)).collect();
    let task = env
        .api
        .create_task(&json!({"namespace": "fan", "name": "files", "context": {"files": files}}))
        .await
        .unwrap();
    let done = finished(&env, task.task_id).await;
    assert_eq!(
        done.status,
        TaskStatus::Complete,
        "{:?}",
        done.steps
            .iter()
            .map(|s| (&s.name, s.status, &s.last_error))
            .filter(|s| s.1 != StepStatus::Complete)
            .collect::<Vec<_>>()
    );

    // The fan-in sees one result per element, in element order, each with its item.
    let load = &done.step("report").results.as_ref().unwrap()["parents"]["load"];
    let load = load.as_array().expect("the instances' results as a list");
    assert_eq!(load.len(), 300);
    for (n, result) in load.iter().enumerate() {
        assert_eq!(result["index"], n, "{result}");
        assert_eq!(result["item"], files[n], "{result}");
        assert!(
            result["parents"]["list"].is_object(),
            "an instance sees the step's parents"
        );
    }
    // The step shows its instances; each instance is a step like any other, run once.
    let step = done.step("load");
    assert_eq!(step.status, StepStatus::Complete);
    assert_eq!(step.instances, Some(300));
    assert_eq!(
        step.depends_on,
        ["list"],
        "its instances are not its parents"
    );
    let instances: Vec<_> = done
        .steps
        .iter()
        .filter(|s| s.instance_of.as_deref() == Some("load"))
        .collect();
    assert_eq!(instances.len(), 300);
    for (n, instance) in instances.iter().enumerate() {
        assert_eq!(instance.name, format!("load[{n}]"));
        assert_eq!(instance.index, Some(n as i32));
        assert_eq!(instance.status, StepStatus::Complete);
        assert_eq!(instance.attempts, 1);
    }
    let dispatched: Vec<(String, i64)> = sqlx::query_as(
        "SELECT s.name, count(*) FROM step_transitions t JOIN steps s USING (step_id)
         WHERE t.task_id = $1 AND t.reason = 'dispatched' AND s.fan_out_of IS NOT NULL
         GROUP BY s.name",
    )
    .bind(task.task_id)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(dispatched.len(), 300);
    assert!(
        dispatched.iter().all(|(_, n)| *n == 1),
        "each instance dispatched once"
    );
    let history = crate::step_history(&env.pool, task.task_id).await;
    let load_history: Vec<(&str, &str)> = history
        .iter()
        .filter(|(step, ..)| step == "load")
        .map(|(_, _, to, reason, _)| (to.as_str(), reason.as_str()))
        .collect();
    assert_eq!(
        load_history,
        [("pending", "fanned_out"), ("complete", "instances_done")]
    );

    // The diagram shows the grown graph: the instances (as one node, there are many)
    // between the list and the step that gathers them.
    let diagram = env
        .http
        .get(format!(
            "{}/v1/tasks/{}/diagram",
            env.base_url, task.task_id
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        diagram.contains("[\"load[0…299]<br/>300 complete\"]:::complete"),
        "{diagram}"
    );
    assert!(diagram.contains("    list --> step_"), "{diagram}");
    assert!(diagram.contains(" --> load\n"), "{diagram}");

    // An empty list completes the step at once, with an empty list for its dependents.
    let empty = env
        .api
        .create_task(&json!({"namespace": "fan", "name": "files", "context": {"files": []}}))
        .await
        .unwrap();
    let done = finished(&env, empty.task_id).await;
    assert_eq!(done.status, TaskStatus::Complete);
    assert_eq!(done.step("load").instances, Some(0));
    assert_eq!(
        done.step("report").results.as_ref().unwrap()["parents"]["load"],
        json!([])
    );
    env.finish().await.unwrap();
}

#[tokio::test]
async fn max_parallel_bounds_the_instances_running_at_once() {
    let mut env = TestEnv::start("fan-out-parallel").await.unwrap();
    let (status, body) = env.register_template(SLOW).await.unwrap();
    assert_eq!(status, 201, "{body}");
    env.start_worker("fan-1", &["fan"]).await.unwrap();
    env.start_worker("fan-2", &["fan"]).await.unwrap();

    let regions: Vec<String> = (0..24).map(|n| format!("r{n}")).collect();
    let task = env
        .api
        .create_task(&json!({"namespace": "fan", "name": "slow", "context": {"regions": regions}}))
        .await
        .unwrap();
    // Explained while it runs (eight rounds of 150 ms): the step counts its instances,
    // and those waiting name what holds them.
    let (_, readiness) = env
        .get(&format!("/v1/tasks/{}/readiness", task.task_id))
        .await
        .unwrap();
    let steps = readiness["steps"].as_array().unwrap();
    assert_eq!(steps[0]["name"], "nap", "{readiness}");
    assert_eq!(steps[0]["reason"], "waiting_on_instances", "{readiness}");
    assert!(
        steps[0]["message"]
            .as_str()
            .unwrap()
            .ends_with(" of 24 instances done"),
        "{readiness}"
    );
    assert_eq!(steps[1]["name"], "nap[0]", "{readiness}");
    let held = steps
        .iter()
        .find(|s| s["reason"] == "concurrency_limited")
        .unwrap_or_else(|| panic!("no instance held: {readiness}"));
    assert_eq!(held["key"], "nap (max_parallel)", "{readiness}");
    assert_eq!(held["limit"], 3, "{readiness}");
    // The step cannot be resolved by hand while its instances run.
    let (status, body) = env
        .post(
            &format!("/v1/tasks/{}/steps/nap/resolve", task.task_id),
            json!({}),
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("instances still to finish"),
        "{body}"
    );
    let done = finished(&env, task.task_id).await;
    assert_eq!(done.status, TaskStatus::Complete);
    assert_eq!(done.step("nap").instances, Some(24));

    // From the workers' own start and end times: never more than three at once, and more
    // than one (16 worker slots would otherwise run all 24 together).
    let runs: Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT started_at, completed_at FROM steps
             WHERE task_id = $1 AND fan_out_of IS NOT NULL",
    )
    .bind(task.task_id)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(runs.len(), 24);
    let mut most = 0;
    for (start, _) in &runs {
        let running = runs.iter().filter(|(s, e)| s <= start && start < e).count();
        most = most.max(running);
    }
    assert!(most <= 3, "{most} instances ran at once");
    assert!(most >= 2, "the instances ran one at a time");
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_failing_instance_is_retried_then_fails_its_step_and_a_long_list_is_refused() {
    let mut env = TestEnv::start("fan-out-failures").await.unwrap();
    let template = r#"namespace: fan
name: flaky
steps:
  - name: call
    handler: tasker.fail
    config: {times: 1, kind: retryable}
    retry_limit: 2
    backoff: {schedule: [0.01]}
    for_each: "context.items"
  - name: after
    handler: tasker.noop
    depends_on: [call]
"#;
    let (status, body) = env.register_template(template).await.unwrap();
    assert_eq!(status, 201, "{body}");
    env.start_worker("fan-1", &["fan"]).await.unwrap();

    // Each instance fails its first attempt and is retried by its policy.
    let task = env
        .api
        .create_task(&json!({"namespace": "fan", "name": "flaky", "context": {"items": [1, 2, 3]}}))
        .await
        .unwrap();
    let done = finished(&env, task.task_id).await;
    assert_eq!(done.status, TaskStatus::Complete);
    for n in 0..3 {
        assert_eq!(done.step(&format!("call[{n}]")).attempts, 2);
    }

    // Out of attempts: the instance fails, and so do its step and the task.
    let template = template
        .replace("name: flaky", "name: broken")
        .replace("retry_limit: 2", "retry_limit: 1");
    let (status, body) = env.register_template(&template).await.unwrap();
    assert_eq!(status, 201, "{body}");
    let task = env
        .api
        .create_task(&json!({"namespace": "fan", "name": "broken", "context": {"items": [1, 2]}}))
        .await
        .unwrap();
    let done = finished(&env, task.task_id).await;
    assert_eq!(done.status, TaskStatus::Error);
    let call = done.step("call");
    assert_eq!(call.status, StepStatus::Error);
    assert_eq!(
        call.last_error.as_ref().unwrap().code.as_deref(),
        Some("instance_failed")
    );
    assert_eq!(done.step("after").status, StepStatus::Pending);

    // A retry of the task runs the failed instances again (here they fail again, the
    // same way), and their step waits for them, then fails with them once more.
    let (status, body) = env
        .post(&format!("/v1/tasks/{}/retry", task.task_id), json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let done = finished(&env, task.task_id).await;
    assert_eq!(done.status, TaskStatus::Error);
    let history = crate::step_history(&env.pool, task.task_id).await;
    let of = |name: &str| -> Vec<&str> {
        history
            .iter()
            .filter(|(step, ..)| step == name)
            .map(|(_, _, _, reason, _)| reason.as_str())
            .collect()
    };
    assert_eq!(
        of("call"),
        [
            "fanned_out",
            "instance_failed",
            "retry_requested",
            "instance_failed"
        ]
    );
    for n in 0..2 {
        let instance = of(&format!("call[{n}]"));
        assert_eq!(
            instance.iter().filter(|r| **r == "dispatched").count(),
            2,
            "{instance:?}"
        );
        assert!(instance.contains(&"retry_requested"), "{instance:?}");
    }

    // Resolving the failed instances by hand: the step waits for them again, gathers
    // them (with the results given) and the task goes on.
    for n in 0..2 {
        let (status, body) = env
            .post(
                &format!("/v1/tasks/{}/steps/call%5B{n}%5D/resolve", task.task_id),
                json!({"results": {"by_hand": n}}),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let done = finished(&env, task.task_id).await;
    assert_eq!(done.status, TaskStatus::Complete);
    assert_eq!(
        done.step("call").results,
        Some(json!([{"by_hand": 0}, {"by_hand": 1}]))
    );
    assert_eq!(done.step("after").status, StepStatus::Complete);

    // More elements than TASKER_MAX_FAN_OUT (10,000 by default): the step fails, clearly.
    let items: Vec<u32> = (0..10_001).collect();
    let task = env
        .api
        .create_task(&json!({"namespace": "fan", "name": "flaky", "context": {"items": items}}))
        .await
        .unwrap();
    let done = finished(&env, task.task_id).await;
    assert_eq!(done.status, TaskStatus::Error);
    let error = done.step("call").last_error.clone().unwrap();
    assert_eq!(error.code.as_deref(), Some("fan_out_too_large"));
    assert!(
        error.message.contains("10001 elements"),
        "{}",
        error.message
    );
    assert!(
        !done.steps.iter().any(|s| s.instance_of.is_some()),
        "no instance created"
    );
    env.finish().await.unwrap();
}

/// The status a task ended in, polled in the database: its page, read again and again,
/// would carry up to 16 MiB of results each time.
async fn ended(env: &TestEnv, task_id: uuid::Uuid) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status: String = sqlx::query_scalar("SELECT status FROM tasks WHERE task_id = $1")
            .bind(task_id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
        if status != "pending" && status != "in_progress" {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the task still {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A task whose steps hold more results than one page carries (16 MiB of JSON): the
/// page takes each step's results while they fit with those before, leaves out the
/// others (`results_omitted`), and the step's own page has them whole.
#[tokio::test]
async fn a_task_page_carries_results_up_to_its_budget_and_a_step_page_the_rest() {
    let mut env = TestEnv::start("fan-out-page").await.unwrap();
    let template = r#"namespace: fan
name: page
steps:
  - name: each
    handler: tasker.echo
    for_each: "context.items"
  - name: beside
    handler: tasker.noop
"#;
    let (status, body) = env.register_template(template).await.unwrap();
    assert_eq!(status, 201, "{body}");
    env.start_worker("fan-1", &["fan"]).await.unwrap();
    // Seventeen instances of about 900 KB each: about 15 MB, and as much again gathered.
    let pad = "x".repeat(900_000);
    let items: Vec<u32> = (0..17).collect();
    let task = env
        .api
        .create_task(&json!({"namespace": "fan", "name": "page",
                             "context": {"pad": pad, "items": items}}))
        .await
        .unwrap();
    assert_eq!(ended(&env, task.task_id).await, "complete");

    let (status, page) = env
        .get(&format!("/v1/tasks/{}", task.task_id))
        .await
        .unwrap();
    assert_eq!(status, 200, "{page}");
    let steps = page["steps"].as_array().unwrap();
    let by_name = |name: &str| steps.iter().find(|s| s["name"] == name).unwrap();
    // The gathered list (about 15 MB) comes first, then what room is left takes the
    // first instance; the others are left out, and a later small step is still taken.
    assert_eq!(
        by_name("each")["results"].as_array().map(Vec::len),
        Some(17)
    );
    assert!(by_name("each").get("results_omitted").is_none());
    let carried: Vec<usize> = (0..17)
        .filter(|n| !by_name(&format!("each[{n}]"))["results"].is_null())
        .collect();
    assert_eq!(carried, [0], "one instance fits in what is left of 16 MiB");
    for n in 1..17 {
        assert_eq!(by_name(&format!("each[{n}]"))["results_omitted"], true);
    }
    assert_eq!(by_name("beside")["results"], json!({}));
    assert!(by_name("beside").get("results_omitted").is_none());

    // A step's page has its results whole, an instance's too.
    let (status, last) = env
        .get(&format!("/v1/tasks/{}/steps/each%5B16%5D", task.task_id))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(last["results"]["index"], 16);
    assert_eq!(
        last["results"]["context"]["pad"].as_str().map(str::len),
        Some(900_000)
    );
    for (path, code) in [
        (
            format!("/v1/tasks/{}/steps/nothing", task.task_id),
            "step_not_found",
        ),
        (
            format!("/v1/tasks/{}/steps/each", uuid::Uuid::now_v7()),
            "task_not_found",
        ),
    ] {
        let (status, body) = env.get(&path).await.unwrap();
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some(code)),
            "{path}"
        );
    }
    env.finish().await.unwrap();
}

/// Instances whose results together are more than the step's dependents' messages may
/// carry (`TASKER_MAX_STEP_MESSAGE_BYTES`, 16 MiB by default): the step fails for good with
/// `results_too_large`, and every instance's result is stored, none dead-lettered.
#[tokio::test]
async fn instances_whose_results_are_too_large_together_fail_their_step() {
    let env = too_large_together("fan-out-too-large", 20, &[]).await;
    env.finish().await.unwrap();
}

/// With the message limit raised to 512 MiB, past what PostgreSQL stores in one value
/// (jsonb's 256 MiB): the same, PostgreSQL's refusal caught.
#[tokio::test]
async fn instances_whose_results_pass_what_postgresql_stores_fail_their_step() {
    let env = too_large_together(
        "fan-out-past-jsonb",
        310,
        &[("TASKER_MAX_STEP_MESSAGE_BYTES", "536870912")],
    )
    .await;
    env.finish().await.unwrap();
}

/// A task fanning out over `instances` elements whose instances each echo a context of
/// about 900 KB (under the worker's 1 MiB), run to its end on a coordinator with
/// `coordinator_env`, checked: its `for_each` step failed for good with
/// `results_too_large` (with the limit of the message in its error, 16 MiB by default,
/// or jsonb's 256 MiB), its dependent never ran, each instance's result is stored and
/// nothing was dead-lettered.
async fn too_large_together(
    test: &str,
    instances: u32,
    coordinator_env: &[(&str, &str)],
) -> TestEnv {
    let options = tasker_tests::EnvOptions {
        coordinator_env: coordinator_env
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect(),
        ..Default::default()
    };
    let mut env = TestEnv::start_with(test, options).await.unwrap();
    let template = r#"namespace: fan
name: large
steps:
  - name: each
    handler: tasker.echo
    for_each: "context.items"
  - name: after
    handler: tasker.noop
    depends_on: [each]
"#;
    let (status, body) = env.register_template(template).await.unwrap();
    assert_eq!(status, 201, "{body}");
    env.start_worker("fan-1", &["fan"]).await.unwrap();
    let pad = "x".repeat(900_000);
    let items: Vec<u32> = (0..instances).collect();
    let task = env
        .api
        .create_task(&json!({"namespace": "fan", "name": "large",
                             "context": {"pad": pad, "items": items}}))
        .await
        .unwrap();
    assert_eq!(ended(&env, task.task_id).await, "error");
    let steps: Vec<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT name, status, last_error ->> 'code', last_error ->> 'message'
         FROM steps WHERE task_id = $1 AND fan_out_of IS NULL ORDER BY name",
    )
    .bind(task.task_id)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let (_, each_status, code, message) = &steps[1];
    assert_eq!(
        (steps[1].0.as_str(), each_status.as_str(), code.as_deref()),
        ("each", "error", Some("results_too_large")),
        "{steps:?}"
    );
    let message = message.as_deref().unwrap();
    let limit = match coordinator_env.is_empty() {
        true => "TASKER_MAX_STEP_MESSAGE_BYTES = 16777216",
        false => "256 MiB",
    };
    assert!(message.contains(limit), "{message}");
    assert_eq!(
        (steps[0].0.as_str(), steps[0].1.as_str()),
        ("after", "pending")
    );
    let complete: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM steps
         WHERE task_id = $1 AND fan_out_of IS NOT NULL AND status = 'complete'
           AND results IS NOT NULL",
    )
    .bind(task.task_id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        complete,
        i64::from(instances),
        "every instance's result stored"
    );
    let (_connection, channel) = confirm_channel().await;
    assert_no_dead_letters(&channel, &format!("{}.dead_letter", env.prefix)).await;
    env
}

#[tokio::test]
async fn malformed_fan_outs_are_refused_at_registration() {
    let env = TestEnv::start("fan-out-invalid").await.unwrap();
    let template = r#"namespace: fan
name: bad
steps:
  - name: a
    handler: tasker.noop
    for_each: "context.items.map("
  - name: b
    handler: tasker.noop
    max_parallel: 2
  - name: c
    handler: tasker.noop
    for_each: "context.items"
    max_parallel: 0
"#;
    let (status, body) = env.register_template(template).await.unwrap();
    assert_eq!(status, 422, "{body}");
    let problems = crate::problems(&body);
    assert!(
        problems.contains(&("steps[0].for_each", "invalid_expression")),
        "{body}"
    );
    assert!(
        problems.contains(&("steps[1].max_parallel", "invalid_value")),
        "{body}"
    );
    assert!(
        problems.contains(&("steps[2].max_parallel", "invalid_value")),
        "{body}"
    );
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_first_step_fanning_out_waits_for_its_templates_concurrency() {
    let mut env = TestEnv::start("fan-out-task-limit").await.unwrap();
    let template = r#"namespace: fan
name: per_region
concurrency:
  - {key: context.customer, limit: 1, on_limit: queue}
steps:
  - name: sync
    handler: tasker.sleep
    config: {ms: 300}
    for_each: "context.regions"
"#;
    let (status, body) = env.register_template(template).await.unwrap();
    assert_eq!(status, 201, "{body}");
    env.start_worker("fan-1", &["fan"]).await.unwrap();

    // One task of the customer at a time: the second's instances wait for the first.
    let context = json!({"customer": "acme", "regions": ["eu", "us"]});
    let body = json!({"namespace": "fan", "name": "per_region", "context": context});
    let (first_end, second) = crate::two_in_a_row(&env, &body).await;
    let second_start = second
        .steps
        .iter()
        .filter(|s| s.instance_of.is_some())
        .filter_map(|s| s.started_at)
        .min()
        .unwrap();
    assert!(
        second_start >= first_end,
        "the second task started at {second_start}, before the first ended at {first_end}"
    );
    env.finish().await.unwrap();
}
