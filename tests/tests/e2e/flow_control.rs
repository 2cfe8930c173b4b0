//! Flow control: concurrency and rate limits hold for the whole fleet (several
//! coordinators and workers), measured from the workers' own start and finish times; held
//! steps explain themselves; malformed limits are refused naming the step and the key.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tasker_tests::api::Api;
use tasker_tests::{Process, TaskStatus, TestEnv};

const PER_CUSTOMER: &str = "namespace: flow\nname: per_customer\nsteps:\n  - name: prepare\n    handler: tasker.noop\n  - name: call\n    handler: tasker.sleep\n    depends_on: [prepare]\n    config: {ms: 100}\n    concurrency: {key: context.customer, limit: 2}\n";

/// Each run of step `step` in the database: its key (the context's `field`), and the
/// worker's start and finish times.
async fn runs(
    pool: &sqlx::PgPool,
    step: &str,
    field: &str,
) -> Vec<(String, DateTime<Utc>, DateTime<Utc>)> {
    sqlx::query_as(
        "SELECT t.context ->> $2, s.started_at, s.completed_at
         FROM steps s JOIN tasks t USING (task_id)
         WHERE s.name = $1 ORDER BY s.started_at",
    )
    .bind(step)
    .bind(field)
    .fetch_all(pool)
    .await
    .expect("runs")
}

/// The most runs that overlapped at any instant.
fn most_at_once<'a>(
    runs: impl Iterator<Item = &'a (String, DateTime<Utc>, DateTime<Utc>)>,
) -> usize {
    // Ends sort before starts at the same instant: a run that ends as another starts
    // does not overlap it.
    let mut edges: Vec<(DateTime<Utc>, i32)> = runs
        .flat_map(|(_, start, end)| [(*start, 1), (*end, -1)])
        .collect();
    edges.sort();
    let (mut now, mut most) = (0, 0);
    for (_, delta) in edges {
        now += delta;
        most = most.max(now);
    }
    most as usize
}

async fn wait_all(env: &TestEnv, ids: &[uuid::Uuid], timeout: Duration) {
    for id in ids {
        let task = env
            .api
            .wait_for_task(*id, &[TaskStatus::Complete, TaskStatus::Error], timeout)
            .await
            .unwrap();
        assert_eq!(task.status, TaskStatus::Complete, "{id}");
    }
}

/// The fleet of the fleet-wide tests, beside the test's own coordinator: a second
/// coordinator (with `env`), its URL and a client of it, and three workers of 8.
async fn fleet(env: &mut TestEnv, vars: &[(&str, &str)]) -> (Process, String, Api) {
    let (second, url) = env.start_coordinator("coordinator-2", vars).await.unwrap();
    for n in 1..=3 {
        env.start_worker_binary(
            tasker_tests::binary("tasker-worker"),
            &format!("flow-{n}"),
            &["flow"],
            8,
        )
        .await
        .unwrap();
    }
    (second, url.clone(), Api::new(url))
}

#[tokio::test]
async fn a_concurrency_limit_holds_across_coordinators_and_workers() {
    let mut env = TestEnv::start("flow-concurrency").await.unwrap();
    env.register_template(PER_CUSTOMER).await.unwrap();
    let (_second, second_url, second) =
        fleet(&mut env, &[("TASKER_GAUGE_INTERVAL_MS", "100")]).await;

    // Customer a has a backlog; b and c a few each. Created through both coordinators.
    let mut ids = Vec::new();
    for n in 0..60 {
        let customer = match n % 6 {
            0 => "b",
            1 => "c",
            _ => "a",
        };
        let api = if n % 2 == 0 { &env.api } else { &second };
        let task = api
            .create_task(&json!({"namespace": "flow", "name": "per_customer",
                                 "context": {"customer": customer}}))
            .await
            .unwrap();
        ids.push(task.task_id);
    }
    // Customer a's backlog shows in the metrics while it waits.
    let held = r#"tasker_steps_held{reason="concurrency_limited"}"#;
    tasker_tests::wait_for_metric(&format!("{second_url}/metrics"), held, 1.0).await;
    wait_all(&env, &ids, Duration::from_secs(120)).await;

    let runs = runs(&env.pool, "call", "customer").await;
    assert_eq!(runs.len(), 60);
    for customer in ["a", "b", "c"] {
        let most = most_at_once(runs.iter().filter(|(key, _, _)| key == customer));
        assert!(
            most <= 2,
            "customer {customer} ran {most} at once, over its limit of 2"
        );
    }
    // The limit is per key: other customers ran beside a's two.
    let most = most_at_once(runs.iter());
    assert!(
        most > 2,
        "all customers together ran at most {most} at once"
    );
    env.finish().await.unwrap();
}

const RATED: &str = "namespace: flow\nname: partner\nsteps:\n  - name: call\n    handler: tasker.noop\n    rate_limit: {key: \"'partner-api'\", limit: 20, per: 1s}\n";

#[tokio::test]
async fn a_rate_limit_holds_in_every_second_and_the_backlog_completes() {
    let mut env = TestEnv::start("flow-rate").await.unwrap();
    env.register_template(RATED).await.unwrap();
    let (_second, _, second) = fleet(&mut env, &[]).await;
    // Ten seconds' worth, created at once (on a slow machine, one by one could take
    // longer than the limit needs to run them).
    let creations = (0..200).map(|n| {
        let api = if n % 2 == 0 { &env.api } else { &second };
        async move {
            api.create_task(&json!({"namespace": "flow", "name": "partner", "context": {"n": n}}))
                .await
                .unwrap()
                .task_id
        }
    });
    let ids: Vec<uuid::Uuid> = futures::future::join_all(creations).await;
    // A step waiting for a slot (the first 20 took the first second's) says so: its key,
    // limit and next slot.
    let held: uuid::Uuid =
        sqlx::query_scalar("SELECT task_id FROM steps WHERE held = 'rate_limited' LIMIT 1")
            .fetch_one(&env.pool)
            .await
            .expect("a step held by the rate limit");
    let readiness = env
        .get(&format!("/v1/tasks/{held}/readiness"))
        .await
        .unwrap()
        .1;
    let step = &readiness["steps"][0];
    assert_eq!(step["reason"], "rate_limited", "{step}");
    assert_eq!(step["key"], "partner-api");
    assert_eq!(step["limit"], 20);
    assert!(step["next_attempt_at"].is_string(), "{step}");
    wait_all(&env, &ids, Duration::from_secs(120)).await;

    let runs = runs(&env.pool, "call", "n").await;
    assert_eq!(runs.len(), 200);
    let starts: Vec<DateTime<Utc>> = runs.iter().map(|(_, start, _)| *start).collect();
    let second = chrono::TimeDelta::seconds(1);
    let busiest = starts
        .iter()
        .map(|from| {
            starts
                .iter()
                .filter(|t| **t >= *from && **t < *from + second)
                .count()
        })
        .max()
        .unwrap();
    assert!(
        busiest <= 20,
        "{busiest} starts within one second, over the limit of 20"
    );
    let span = *starts.last().unwrap() - starts[0];
    assert!(
        span >= chrono::TimeDelta::seconds(9),
        "200 starts at 20 a second took {span}"
    );
    env.finish().await.unwrap();
}

/// A step held by its own concurrency key is offered when the key frees a slot, even
/// while older first steps of the key wait for their task's turn under the template's
/// concurrency (those are offered when their task may start).
#[tokio::test]
async fn a_key_s_free_slot_goes_to_a_step_that_can_run_not_to_a_queued_task() {
    let mut env = TestEnv::start("flow-queued-first").await.unwrap();
    // One task per customer at a time; one call at a time to the partner.
    let job = "namespace: flow\nname: job\nconcurrency:\n  - {key: context.customer, limit: 1}\nsteps:\n  - name: call\n    handler: tasker.sleep\n    config: {ms: 1500}\n    concurrency: {key: \"'partner'\", limit: 1}\n";
    env.register_template(job).await.unwrap();
    env.start_worker("w", &["flow"]).await.unwrap();
    let mut ids = Vec::new();
    // a1 runs; a2 and a3 wait for customer a; c waits for the partner only.
    for (name, customer) in [("a1", "a"), ("a2", "a"), ("a3", "a"), ("c", "c")] {
        let context = json!({"customer": customer, "n": name});
        let task = env
            .api
            .create_task(&json!({"namespace": "flow", "name": "job", "context": context}))
            .await
            .unwrap()
            .task_id;
        ids.push(task);
    }
    wait_all(&env, &ids, Duration::from_secs(60)).await;
    let order: Vec<String> = runs(&env.pool, "call", "n")
        .await
        .into_iter()
        .map(|(name, ..)| name)
        .collect();
    // The partner's slot freed by a1 went to c, which could run, before a3 (and a2).
    let position = |name: &str| order.iter().position(|n| n == name).unwrap();
    assert!(
        position("c") < position("a3"),
        "c waited behind customer a's queue: {order:?}"
    );
    env.finish().await.unwrap();
}

/// `cancel_oldest` cancels the running task when the new one starts, not when the new
/// one's first step is held by its own limit: the running task goes on until then.
#[tokio::test]
async fn cancel_oldest_cancels_only_once_the_new_task_starts() {
    let mut env = TestEnv::start("flow-oldest-held").await.unwrap();
    let latest = "namespace: flow\nname: latest\nconcurrency:\n  - {key: context.customer, limit: 1, on_limit: cancel_oldest}\nsteps:\n  - name: call\n    handler: tasker.sleep\n    config: {ms: 3000}\n    concurrency: {key: \"'partner'\", limit: 1}\n  - {name: after, handler: tasker.sleep, config: {ms: 3000}, depends_on: [call]}\n";
    env.register_template(latest).await.unwrap();
    env.start_worker("w", &["flow"]).await.unwrap();
    let body = json!({"namespace": "flow", "name": "latest", "context": {"customer": "y"}});
    let old = env.api.create_task(&body).await.unwrap().task_id;
    env.api
        .wait_until(old, "its call running", Duration::from_secs(30), |task| {
            task.step("call").status == tasker_tests::StepStatus::InProgress
        })
        .await
        .unwrap();
    // The new task's call waits for the partner's slot: it starts nothing yet.
    let new = env.api.create_task(&body).await.unwrap().task_id;

    let new = env
        .api
        .wait_for_task(new, &[TaskStatus::Complete], Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(new.status, TaskStatus::Complete);
    let old = env.api.task(old).await.unwrap();
    assert_eq!(old.status, TaskStatus::Cancelled, "{old:#?}");
    // Cancelled once the new task could start: after its own call had finished, by the
    // claim that would have dispatched its next step (which never ran: two tasks of the
    // customer would have run at once).
    assert_eq!(
        old.step("call").status,
        tasker_tests::StepStatus::Complete,
        "{old:#?}"
    );
    let after = old.step("after");
    assert_eq!(
        (after.status, after.attempts),
        (tasker_tests::StepStatus::Cancelled, 0),
        "{old:#?}"
    );
    env.finish().await.unwrap();
}

/// A task cancelled as the oldest of its key is cancelled by the claim that starts the new
/// one, which announces nothing to workers: the worker's next heartbeat names the running
/// step, and the started notice of the step that waited for its slot names that one;
/// both are aborted, not run to their end.
#[tokio::test]
async fn the_steps_of_a_task_cancelled_as_the_oldest_of_its_key_are_aborted_on_their_worker() {
    let mut env = TestEnv::start("flow-oldest-abort").await.unwrap();
    env.register_template("namespace: flow\nname: deploy\nconcurrency:\n  - {key: context.branch, limit: 1, on_limit: cancel_oldest}\nsteps:\n  - {name: build, handler: tasker.sleep, config: {ms: 120000}}\n  - {name: lint, handler: tasker.sleep, config: {ms: 120000}}\n")
        .await
        .unwrap();
    // One slot: `lint` waits in the worker for `build`'s.
    let (worker, metrics) = env.start_metered_worker("w", &["flow"], 1).await.unwrap();
    let body = json!({"namespace": "flow", "name": "deploy", "context": {"branch": "main"}});
    let old = env.api.create_task(&body).await.unwrap().task_id;
    env.api
        .wait_until(old, "one step running", Duration::from_secs(30), |task| {
            task.steps
                .iter()
                .any(|step| step.status == tasker_tests::StepStatus::InProgress)
        })
        .await
        .unwrap();
    let new = env.api.create_task(&body).await.unwrap().task_id;
    let old = env.api.task(old).await.unwrap();
    assert_eq!(old.status, TaskStatus::Cancelled, "{old:#?}");

    // Within a heartbeat interval (10 s) and a start.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tasker_tests::metric(&metrics, "tasker_worker_steps_aborted_superseded_total").await < 2.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cancelled task's steps ran on; worker log:\n{}",
            env.workers[worker].log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Counted once the broker confirmed the broadcast, which may be after a worker acted.
    tasker_tests::wait_for_metric(&env.metrics_url(), "tasker_runs_withdrawn_total", 2.0).await;
    // The new task runs in the slot they left.
    env.api
        .wait_until(new, "its steps running", Duration::from_secs(30), |task| {
            task.steps
                .iter()
                .any(|step| step.status == tasker_tests::StepStatus::InProgress)
        })
        .await
        .unwrap();
    env.finish().await.unwrap();
}

/// A task waiting for its template's concurrency has no slot yet: its first step cannot
/// be resolved by hand (its dependents would run past the limit).
#[tokio::test]
async fn a_queued_task_s_step_cannot_be_resolved_before_it_starts() {
    let mut env = TestEnv::start("flow-resolve-queued").await.unwrap();
    let job = "namespace: flow\nname: one_at_a_time\nconcurrency:\n  - {key: \"'all'\", limit: 1}\nsteps:\n  - {name: first, handler: tasker.sleep, config: {ms: 3000}}\n  - {name: then, handler: tasker.noop, depends_on: [first]}\n";
    env.register_template(job).await.unwrap();
    env.start_worker("w", &["flow"]).await.unwrap();
    let body = json!({"namespace": "flow", "name": "one_at_a_time"});
    let running = env.api.create_task(&body).await.unwrap().task_id;
    let queued = env.api.create_task(&body).await.unwrap().task_id;
    let (status, answer) = env
        .post(
            &format!("/v1/tasks/{queued}/steps/first/resolve"),
            json!({"results": {}, "reason": "skip the wait"}),
        )
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 409, "{answer}");
    assert!(answer.to_string().contains("has not started"), "{answer}");
    let task = env.api.task(queued).await.unwrap();
    assert_eq!(task.status, TaskStatus::Pending, "{task:#?}");
    // It still runs in its turn.
    for task in [running, queued] {
        env.api
            .wait_for_task(task, &[TaskStatus::Complete], Duration::from_secs(60))
            .await
            .unwrap();
    }
    env.finish().await.unwrap();
}

/// A rate limit counts a step's retries as starts: a handler that fails at once, retried
/// after 50 ms, still starts at most twice in ten seconds.
#[tokio::test]
async fn a_rate_limit_counts_every_retry_of_a_step() {
    let mut env = TestEnv::start("flow-rate-retries").await.unwrap();
    let flaky = "namespace: flow\nname: flaky\nsteps:\n  - name: call\n    handler: tasker.fail\n    retry_limit: 5\n    config: {times: 10}\n    backoff: {base_seconds: 0.05, jitter: false}\n    rate_limit: {key: \"'flaky-api'\", limit: 2, per: 10s}\n";
    env.register_template(flaky).await.unwrap();
    env.start_worker("w", &["flow"]).await.unwrap();
    let task = env
        .api
        .create_task(&json!({"namespace": "flow", "name": "flaky"}))
        .await
        .unwrap()
        .task_id;
    let starts = || async {
        let starts: Vec<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT created_at FROM step_transitions \
             WHERE task_id = $1 AND to_status = 'in_progress' ORDER BY transition_id",
        )
        .bind(task)
        .fetch_all(&env.pool)
        .await
        .unwrap();
        starts
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let starts = loop {
        let starts = starts().await;
        if starts.len() >= 3 {
            break starts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no third start in 40 s: {starts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The starts as the coordinator applied them, each some milliseconds after the
    // worker's: 8 s leaves room for a slow machine, and none without the limit.
    let gap = starts[2] - starts[0];
    assert!(
        gap >= chrono::TimeDelta::seconds(8),
        "three starts within {gap} against a limit of 2 per 10 s: {starts:?}"
    );
    env.finish().await.unwrap();
}

#[tokio::test]
async fn malformed_limits_are_refused_naming_the_step_and_the_key() {
    let env = TestEnv::start("flow-malformed").await.unwrap();
    let template = "namespace: flow\nname: bad\nsteps:\n  - name: zero\n    handler: h\n    concurrency: {key: context.customer, limit: 0}\n  - name: stranger\n    handler: h\n    concurrency: {key: context.customer, limit: 1, scope: all}\n  - name: window\n    handler: h\n    rate_limit: {key: \"'api'\", limit: 5, per: 2d}\n  - name: broken\n    handler: h\n    rate_limit: {key: \"context.customer +\", limit: 5, per: 1s}\n  - name: typo\n    handler: h\n    concurrency: {key: contxt.customer, limit: 1}\n";
    let (status, body) = env.register_template(template).await.unwrap();
    assert_eq!(status, 422, "{body}");
    let problems: Vec<(String, String, String)> = body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["path"].as_str().unwrap().to_owned(),
                p["code"].as_str().unwrap().to_owned(),
                p["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let find = |path: &str| {
        problems
            .iter()
            .find(|(p, _, _)| p == path)
            .unwrap_or_else(|| panic!("no problem at {path}: {problems:?}"))
    };
    let (_, code, message) = find("steps[0].concurrency.limit");
    assert_eq!(code, "invalid_value");
    assert!(message.contains("step `zero`"), "{message}");
    let (_, code, _) = find("steps[1].concurrency.scope");
    assert_eq!(code, "unknown_key");
    let (_, code, message) = find("steps[2].rate_limit.per");
    assert_eq!(code, "invalid_value");
    assert!(message.contains("step `window`"), "{message}");
    let (_, code, message) = find("steps[3].rate_limit.key");
    assert_eq!(code, "invalid_expression");
    assert!(message.contains("step `broken`"), "{message}");
    let (_, code, message) = find("steps[4].concurrency.key");
    assert_eq!(code, "invalid_expression");
    assert!(message.contains("`contxt`"), "{message}");
    assert_eq!(problems.len(), 5, "{problems:?}");

    // A key the task's context cannot give is refused at creation, naming step and key.
    let (status, _) = env.register_template(PER_CUSTOMER).await.unwrap();
    assert_eq!(status, 201);
    let (status, body) = env
        .create_task(json!({"namespace": "flow", "name": "per_customer", "context": {}}))
        .await
        .unwrap();
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_limit_key");
    let detail: &Value = &body["error"]["details"][0];
    assert_eq!(detail["path"], "steps[1].concurrency.key");
    assert!(
        detail["message"].as_str().unwrap().contains("step `call`"),
        "{detail}"
    );
    assert_eq!(crate::task_count(&env.pool).await, 0);
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_template_concurrency_cancels_the_oldest_and_says_so_in_its_events() {
    let env = TestEnv::start("flow-template").await.unwrap();
    let (status, body) = env
        .register_template("namespace: flow\nname: import\nconcurrency:\n  - {key: context.customer, limit: 1, on_limit: cancel_oldest}\nsteps:\n  - {name: load, handler: tasker.noop}\n")
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let (_connection, mut consumer) = tasker_tests::subscribe_events(&env.prefix, "task.cancelled")
        .await
        .unwrap();

    // No worker: the first import stays running while the second arrives.
    let body = json!({"namespace": "flow", "name": "import", "context": {"customer": "c1"}});
    let first = env.api.create_task(&body).await.unwrap();
    assert_eq!(first.status, TaskStatus::InProgress);
    let second = env.api.create_task(&body).await.unwrap();
    assert_eq!(second.status, TaskStatus::InProgress);
    let first = env.api.task(first.task_id).await.unwrap();
    assert_eq!(first.status, TaskStatus::Cancelled);
    assert_eq!(
        first.step("load").status,
        tasker_tests::StepStatus::Cancelled
    );

    let delivery = tokio::time::timeout(
        Duration::from_secs(30),
        futures::StreamExt::next(&mut consumer),
    )
    .await
    .expect("a task.cancelled event")
    .unwrap()
    .unwrap();
    let event: Value = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(event["event"], "task.cancelled", "{event}");
    assert_eq!(event["task_id"], json!(first.task_id), "{event}");
    assert_eq!(event["reason"], "cancelled_by_concurrency_limit", "{event}");
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_queued_task_starts_with_all_its_first_steps() {
    let mut env = TestEnv::start("flow-template-queue").await.unwrap();
    let (status, body) = env
        .register_template("namespace: flow\nname: sync\nconcurrency:\n  - {key: context.customer, limit: 1}\nsteps:\n  - {name: orders, handler: tasker.sleep, config: {ms: 200}}\n  - {name: invoices, handler: tasker.sleep, config: {ms: 200}}\n")
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    env.start_worker("flow-1", &["flow"]).await.unwrap();

    // The second task waits for the first; when its turn comes, both its first steps run.
    let body = json!({"namespace": "flow", "name": "sync", "context": {"customer": "c1"}});
    let (first_end, second) = crate::two_in_a_row(&env, &body).await;
    for step in &second.steps {
        assert_eq!(step.status, tasker_tests::StepStatus::Complete, "{step:?}");
        assert!(
            step.started_at.unwrap() >= first_end,
            "{step:?} before {first_end}"
        );
    }
    env.finish().await.unwrap();
}

#[tokio::test]
async fn cancelling_a_running_task_lets_the_queued_one_start_and_frees_its_slot() {
    let mut env = TestEnv::start("flow-template-cancel").await.unwrap();
    let (status, body) = env
        .register_template("namespace: flow\nname: export\nconcurrency:\n  - {key: context.customer, limit: 1}\nsteps:\n  - {name: dump, handler: tasker.sleep, config: {ms: 60000}, timeout_ms: 120000}\n")
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    env.start_worker("flow-1", &["flow"]).await.unwrap();

    let body = json!({"namespace": "flow", "name": "export", "context": {"customer": "c1"}});
    let first = env.api.create_task(&body).await.unwrap();
    env.api
        .wait_until(
            first.task_id,
            "its step running",
            Duration::from_secs(30),
            has_running_step,
        )
        .await
        .unwrap();
    let second = env.api.create_task(&body).await.unwrap();
    let (status, body) = env
        .get(&format!("/v1/tasks/{}/readiness", second.task_id))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["steps"][0]["reason"], "concurrency_limited", "{body}");

    // The operator cancels the running task: the queued one starts long before the
    // first one's minute would have ended, and the cancelled task holds no slot of the
    // key.
    let (status, body) = env
        .post(
            &format!("/v1/tasks/{}/cancel", first.task_id),
            json!({"reason": "stuck export"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    env.api
        .wait_until(
            second.task_id,
            "its step running",
            Duration::from_secs(20),
            has_running_step,
        )
        .await
        .unwrap();
    assert_eq!(slots(&env, "flow/export=c1").await, [second.task_id]);
    env.finish().await.unwrap();
}

fn has_running_step(task: &tasker_tests::Task) -> bool {
    task.steps
        .iter()
        .any(|step| step.status == tasker_tests::StepStatus::InProgress)
}

#[tokio::test]
async fn a_retried_task_counts_against_its_key_while_it_runs() {
    let mut env = TestEnv::start("flow-template-retry").await.unwrap();
    let (request, first) = failed_approval(&mut env, "").await;

    // Retried by the operator, it runs again whatever the limit, and holds its key: a
    // task of the same customer created now waits for it.
    let (status, body) = env
        .post(&format!("/v1/tasks/{}/retry", first), json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let second = holds_its_key(&env, first, &request).await;

    // Once the retried task has ended (its wait times out again), the second one starts.
    env.api
        .wait_until(second, "started", Duration::from_secs(30), |task| {
            task.status != TaskStatus::Pending
        })
        .await
        .unwrap();
    env.finish().await.unwrap();
}

/// A failed task gives its slot back; an operator resolving its failed step sets it
/// running again, and it takes the slot back, as a retried task does.
#[tokio::test]
async fn a_task_resolved_by_hand_counts_against_its_key_again() {
    let mut env = TestEnv::start("flow-template-resolve").await.unwrap();
    // Once `sign` is resolved, `hold` waits a minute, keeping the task running.
    let hold = "  - {name: hold, handler: tasker.wait, depends_on: [sign], config: {signal: never, timeout: 60s}}\n";
    let (request, first) = failed_approval(&mut env, hold).await;
    assert!(
        slots(&env, "flow/approve=c1").await.is_empty(),
        "a failed task holds no slot"
    );

    let (status, body) = env
        .post(
            &format!("/v1/tasks/{}/steps/sign/resolve", first),
            json!({"results": {"signed": "by hand"}}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    holds_its_key(&env, first, &request).await;
    env.finish().await.unwrap();
}

/// A delayed task whose first step the coordinator judges (a `tasker.wait`) and whose
/// template's key is full waits for the slot without the dispatcher looking again every
/// few milliseconds: its past `run_at` is no due time while the limit holds it.
#[tokio::test]
async fn a_delayed_task_waiting_for_its_key_keeps_the_dispatcher_idle() {
    // The coordinator binary counts its statements (its telemetry layer does).
    // Its poll is long: only a wake starts the waiting task at once.
    let options = tasker_tests::EnvOptions {
        binary_coordinator: true,
        coordinator_env: vec![("TASKER_POLL_INTERVAL_MS".into(), "30000".into())],
        ..Default::default()
    };
    let env = TestEnv::start_with("flow-delayed-held", options)
        .await
        .unwrap();
    let (status, body) = env
        .register_template("namespace: flow\nname: gate\nconcurrency:\n  - {key: context.customer, limit: 1}\nsteps:\n  - {name: approve, handler: tasker.wait, config: {signal: ok}}\n")
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let request = json!({"namespace": "flow", "name": "gate", "context": {"customer": "c1"}});
    let first = env.api.create_task(&request).await.unwrap();
    let mut delayed = request.clone();
    delayed["delay_ms"] = json!(500);
    let waiting = env.api.create_task(&delayed).await.unwrap();
    // Due, and held by the key.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let readiness = crate::readiness(&env, waiting.task_id).await;
    assert_eq!(
        readiness["steps"][0]["reason"], "concurrency_limited",
        "{readiness}"
    );

    let spent = tasker_tests::statements_over(&env.metrics_url(), Duration::from_secs(3)).await;
    // Idle, a coordinator sends about one statement a second; looking again every 10 ms
    // it sent hundreds.
    assert!(
        spent < 60.0,
        "{spent} statements in 3 s while nothing could run"
    );

    // The first task's signal finishes it and frees the slot: the waiting task starts
    // (its wait begins) at once, not at the next poll.
    let (status, body) = env
        .post(
            &format!("/v1/tasks/{}/signals/ok", first.task_id),
            json!({}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    env.api
        .wait_until(
            waiting.task_id,
            "started",
            Duration::from_secs(10),
            |task| task.status == TaskStatus::InProgress,
        )
        .await
        .expect("the freed slot wakes the dispatcher");
    env.finish().await.unwrap();
}

/// A task of `flow/approve` (one at a time per customer) that failed: its step `sign`
/// waits in the coordinator for a signal that never comes and fails after 3 s. `more`
/// adds steps (YAML lines). Returns the create request and the task's id.
async fn failed_approval(env: &mut TestEnv, more: &str) -> (serde_json::Value, uuid::Uuid) {
    let template = format!(
        "namespace: flow\nname: approve\nconcurrency:\n  - {{key: context.customer, limit: 1}}\nsteps:\n  - {{name: prepare, handler: tasker.noop}}\n  - {{name: sign, handler: tasker.wait, depends_on: [prepare], config: {{signal: ok, timeout: 3s}}}}\n{more}"
    );
    let (status, body) = env.register_template(&template).await.unwrap();
    assert_eq!(status, 201, "{body}");
    env.start_worker("flow-1", &["flow"]).await.unwrap();
    let request = json!({"namespace": "flow", "name": "approve", "context": {"customer": "c1"}});
    let first = env.api.create_task(&request).await.unwrap();
    env.api
        .wait_for_task(first.task_id, &[TaskStatus::Error], Duration::from_secs(30))
        .await
        .unwrap();
    (request, first.task_id)
}

/// `task` holds its customer's slot again: a task created with `request` now waits for
/// it. Returns the waiting task's id.
async fn holds_its_key(env: &TestEnv, task: uuid::Uuid, request: &serde_json::Value) -> uuid::Uuid {
    assert_eq!(slots(env, "flow/approve=c1").await, [task]);
    let second = env.api.create_task(request).await.unwrap();
    let readiness = crate::readiness(env, second.task_id).await;
    assert_eq!(
        readiness["steps"][0]["reason"], "concurrency_limited",
        "{readiness}"
    );
    second.task_id
}

/// The task ids holding a slot of the template concurrency key `key`.
async fn slots(env: &TestEnv, key: &str) -> Vec<uuid::Uuid> {
    sqlx::query_scalar("SELECT task_id FROM task_slots WHERE key = $1 ORDER BY task_id")
        .bind(key)
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_task_whose_first_step_waits_holds_its_slot_while_it_waits() {
    let mut env = TestEnv::start("flow-template-wait").await.unwrap();
    let (status, body) = env
        .register_template("namespace: flow\nname: gate\nconcurrency:\n  - {key: context.customer, limit: 1}\nsteps:\n  - {name: approve, handler: tasker.wait, config: {signal: ok}}\n  - {name: ship, handler: tasker.noop, depends_on: [approve]}\n")
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    env.start_worker("flow-1", &["flow"]).await.unwrap();
    let customer =
        |c: &str| json!({"namespace": "flow", "name": "gate", "context": {"customer": c}});
    let signal = |task: uuid::Uuid| format!("/v1/tasks/{task}/signals/ok");

    // The first task waits for its signal, started and holding the key's one slot; the
    // creation says it started.
    let first = env.api.create_task(&customer("c1")).await.unwrap();
    assert_eq!(first.status, TaskStatus::InProgress);
    crate::until_reason(&env, first.task_id, "approve", "waiting_for_signal").await;
    assert_eq!(
        env.api.task(first.task_id).await.unwrap().status,
        TaskStatus::InProgress
    );
    assert_eq!(slots(&env, "flow/gate=c1").await, [first.task_id]);

    // A second task of the same customer is queued, its wait not begun; another
    // customer's task waits for its signal at once.
    let second = env.api.create_task(&customer("c1")).await.unwrap();
    assert_eq!(second.status, TaskStatus::Pending);
    let other = env.api.create_task(&customer("c2")).await.unwrap();
    crate::until_reason(&env, other.task_id, "approve", "waiting_for_signal").await;
    let held = crate::readiness(&env, second.task_id).await;
    assert_eq!(held["steps"][0]["reason"], "concurrency_limited", "{held}");
    assert_eq!(
        env.api.task(second.task_id).await.unwrap().status,
        TaskStatus::Pending
    );

    // The first one's signal ends it; then the second starts waiting, holding the slot.
    let (status, body) = env.post(&signal(first.task_id), json!({})).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let done = crate::finished(&env, first.task_id, Duration::from_secs(60)).await;
    assert_eq!(done.status, TaskStatus::Complete);
    crate::until_reason(&env, second.task_id, "approve", "waiting_for_signal").await;
    assert_eq!(slots(&env, "flow/gate=c1").await, [second.task_id]);
    for task in [second.task_id, other.task_id] {
        let (status, body) = env.post(&signal(task), json!({})).await.unwrap();
        assert_eq!(status, 200, "{body}");
        let done = crate::finished(&env, task, Duration::from_secs(60)).await;
        assert_eq!(done.status, TaskStatus::Complete);
    }
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_task_whose_first_step_runs_a_child_task_takes_its_slot() {
    let mut env = TestEnv::start("flow-template-child").await.unwrap();
    env.register_templates(&[
        "namespace: flow\nname: inner\nsteps:\n  - {name: nap, handler: tasker.sleep, config: {ms: 300}}\n",
        "namespace: flow\nname: outer\nconcurrency:\n  - {key: context.customer, limit: 1}\nsteps:\n  - {name: run, handler: tasker.task, config: {namespace: flow, name: inner}}\n",
    ])
    .await;
    env.start_worker("flow-1", &["flow"]).await.unwrap();

    // Two tasks of one customer: the second's child starts once the first has ended.
    let body = json!({"namespace": "flow", "name": "outer", "context": {"customer": "c1"}});
    let (first_end, second) = crate::two_in_a_row(&env, &body).await;
    let second_child_start: DateTime<Utc> =
        sqlx::query_scalar("SELECT created_at FROM tasks WHERE parent_task_id = $1")
            .bind(second.task_id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(
        second_child_start >= first_end,
        "the second task's child began at {second_child_start}, before the first ended at {first_end}"
    );
    env.finish().await.unwrap();
}

/// Template keys are looked at up to a claim's batch size at a time, in key order: full
/// keys that sort first must not hide one with room. Here the batch is two steps, two
/// keys (`held/stuck=1`, `held/stuck=2`) stay full (no worker serves their namespace) with
/// tasks waiting, and a key after them frees its slot: its waiting task starts.
#[tokio::test]
async fn full_keys_that_sort_first_do_not_hide_a_key_with_room() {
    let options = tasker_tests::EnvOptions {
        coordinator_env: vec![("TASKER_BATCH_SIZE".into(), "2".into())],
        ..Default::default()
    };
    let mut env = TestEnv::start_with("flow-many-keys", options)
        .await
        .unwrap();
    env.register_templates(&[
        "namespace: held\nname: stuck\nconcurrency:\n  - {key: context.customer, limit: 1}\nsteps:\n  - {name: wait, handler: tasker.noop}\n",
        "namespace: later\nname: quick\nconcurrency:\n  - {key: context.customer, limit: 1}\nsteps:\n  - {name: work, handler: tasker.sleep, config: {ms: 1500}}\n",
    ])
    .await;
    env.start_worker("later-1", &["later"]).await.unwrap();
    for customer in ["1", "2"] {
        let body = json!({"namespace": "held", "name": "stuck", "context": {"customer": customer}});
        for _ in 0..2 {
            env.api.create_task(&body).await.unwrap();
        }
    }

    let body = json!({"namespace": "later", "name": "quick", "context": {"customer": "c"}});
    let first = env.api.create_task(&body).await.unwrap();
    let second = env.api.create_task(&body).await.unwrap();
    for task_id in [first.task_id, second.task_id] {
        let task = env
            .api
            .wait_for_task(
                task_id,
                &[
                    TaskStatus::Complete,
                    TaskStatus::Error,
                    TaskStatus::Cancelled,
                ],
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(task.status, TaskStatus::Complete, "{task:#?}");
    }
    env.finish().await.unwrap();
}
