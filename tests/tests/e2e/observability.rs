//! Observability: exact metric values after a known workload, lifecycle events in order,
//! /health/status, and a dashboard and alert rules that only query metrics the project
//! exports.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tasker_tests::{EnvOptions, TestEnv, binary};

const NAMESPACE: &str = "obs";

/// `name{labels}` → value, from the OpenMetrics text, plus every family name declared.
fn parse_metrics(text: &str) -> (BTreeMap<String, f64>, BTreeSet<String>) {
    let mut samples = BTreeMap::new();
    let mut families = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            families.insert(
                rest.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            );
        } else if !line.starts_with('#') && !line.is_empty() {
            let (key, value) = line.rsplit_once(' ').unwrap();
            samples.insert(key.to_owned(), value.parse().unwrap());
        }
    }
    (samples, families)
}

fn sample(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key}; have:\n{samples:#?}"))
}

async fn scrape(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// Templates whose runs produce a known count of everything.
async fn register_workload(env: &TestEnv) {
    for template in [
        "namespace: obs\nname: good\nsteps:\n  - {name: one, handler: tasker.noop}\n  - {name: two, handler: tasker.noop, depends_on: [one]}\n",
        "namespace: obs\nname: flaky\nsteps:\n  - {name: only, handler: tasker.fail, retry_limit: 2, config: {times: 1}, backoff: {base_seconds: 0.05}}\n",
        "namespace: obs\nname: bad\nsteps:\n  - {name: only, handler: tasker.fail, config: {times: 9, kind: permanent}}\n",
        "namespace: obs\nname: patient\nsteps:\n  - {name: only, handler: tasker.fail, config: {times: 1, kind: defer, retry_after_seconds: 0.05}}\n",
    ] {
        let (status, body) = env.register_template(template).await.unwrap();
        assert!(status.is_success(), "{body}");
    }
}

#[tokio::test]
async fn metrics_count_exactly_what_happened_and_the_dashboard_only_queries_them() {
    // Gauges refreshed often, so the per-namespace ones exist for the namespace the
    // workload registers when the families are read.
    let options = EnvOptions {
        coordinator_env: vec![("TASKER_GAUGE_INTERVAL_MS".into(), "200".into())],
        ..EnvOptions::default()
    };
    let mut env = TestEnv::start_with("metrics", options).await.unwrap();
    register_workload(&env).await;
    let (_, worker_metrics) = env
        .start_metered_worker("metered", &[NAMESPACE], 8)
        .await
        .unwrap();

    for (name, runs, status) in [
        ("good", 3, "complete"),
        ("flaky", 2, "complete"),
        ("bad", 1, "error"),
        ("patient", 1, "complete"),
    ] {
        for _ in 0..runs {
            let task = env
                .run_task(
                    json!({"namespace": NAMESPACE, "name": name}),
                    Duration::from_secs(30),
                )
                .await
                .unwrap();
            assert_eq!(task["status"], status, "{task:#}");
        }
    }

    // Coordinator: 7 tasks; dispatches = 3·2 + 2·2 + 1 + 2 (the deferred one runs twice).
    let (coordinator, coordinator_families) =
        parse_metrics(&scrape(&format!("{}/metrics", env.base_url)).await);
    let ns = |metric: &str| format!("{metric}{{namespace=\"obs\"}}");
    let ns_status =
        |metric: &str, status: &str| format!("{metric}{{namespace=\"obs\",status=\"{status}\"}}");
    assert_eq!(sample(&coordinator, &ns("tasker_tasks_created_total")), 7.0);
    assert_eq!(
        sample(
            &coordinator,
            &ns_status("tasker_tasks_finished_total", "complete")
        ),
        6.0
    );
    assert_eq!(
        sample(
            &coordinator,
            &ns_status("tasker_tasks_finished_total", "error")
        ),
        1.0
    );
    assert_eq!(
        sample(&coordinator, &ns("tasker_steps_dispatched_total")),
        13.0
    );
    assert_eq!(
        sample(
            &coordinator,
            &ns_status("tasker_steps_finished_total", "complete")
        ),
        9.0
    );
    assert_eq!(
        sample(
            &coordinator,
            &ns_status("tasker_steps_finished_total", "error")
        ),
        1.0
    );
    assert_eq!(
        sample(&coordinator, &ns("tasker_step_retries_scheduled_total")),
        2.0
    );
    assert_eq!(
        sample(&coordinator, &ns("tasker_step_deferrals_total")),
        1.0
    );
    assert_eq!(
        sample(&coordinator, &ns("tasker_step_queue_latency_seconds_count")),
        13.0,
        "every dispatch started once"
    );
    assert_eq!(
        sample(&coordinator, "tasker_stale_results_dropped_total"),
        0.0
    );
    assert_eq!(sample(&coordinator, "tasker_dead_lettered_total"), 0.0);
    assert_eq!(
        sample(&coordinator, "tasker_step_publish_failures_total"),
        0.0
    );
    assert_eq!(
        sample(
            &coordinator,
            "tasker_leases_expired_total{reason=\"lease_lost\"}"
        ),
        0.0
    );
    assert!(sample(&coordinator, "tasker_dispatch_batch_size_count") >= 1.0);
    // Every step dispatched travelled in a step message, alone or with others.
    let dispatched = sample(&coordinator, &ns("tasker_steps_dispatched_total"));
    assert_eq!(
        sample(&coordinator, "tasker_step_message_batch_size_sum"),
        dispatched
    );
    let messages = sample(&coordinator, "tasker_step_message_batch_size_count");
    assert!(
        (1.0..=dispatched).contains(&messages),
        "{messages} messages"
    );
    // One after another, each creation is written alone.
    assert_eq!(sample(&coordinator, "tasker_create_batch_size_count"), 7.0);
    assert_eq!(sample(&coordinator, "tasker_create_batch_size_sum"), 7.0);

    // Worker: handler runs by outcome.
    let (worker, worker_families) = parse_metrics(&scrape(&worker_metrics).await);
    let runs = |handler: &str, outcome: &str| {
        sample(
            &worker,
            &format!(
                "tasker_worker_step_duration_seconds_count{{handler=\"{handler}\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(runs("tasker.noop", "success"), 6.0);
    assert_eq!(runs("tasker.fail", "retryable_error"), 2.0);
    assert_eq!(runs("tasker.fail", "success"), 3.0);
    assert_eq!(runs("tasker.fail", "permanent_error"), 1.0);
    assert_eq!(runs("tasker.fail", "deferred"), 1.0);
    assert_eq!(sample(&worker, "tasker_worker_concurrency"), 8.0);
    assert_eq!(sample(&worker, "tasker_worker_steps_in_flight"), 0.0);

    // The events relay catches up within a second or so.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (coordinator, _) = parse_metrics(&scrape(&format!("{}/metrics", env.base_url)).await);
        if coordinator.get("tasker_events_published_total{event=\"task.completed\"}") == Some(&6.0)
        {
            assert_eq!(
                sample(
                    &coordinator,
                    "tasker_events_published_total{event=\"task.failed\"}"
                ),
                1.0
            );
            assert_eq!(
                sample(
                    &coordinator,
                    "tasker_events_published_total{event=\"step.deferred\"}"
                ),
                1.0
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events not published: {coordinator:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The dashboard and the alert rules query only what the coordinator and workers
    // export (or RabbitMQ's own plugin, rabbitmq_*), so they cannot rot silently.
    let exported: BTreeSet<String> = coordinator_families
        .union(&worker_families)
        .cloned()
        .collect();
    let dashboard: Value = serde_json::from_str(include_str!(
        "../../../deploy/grafana/dashboards/tasker.json"
    ))
    .unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 6, "the dashboard has queries: {exprs:?}");
    assert_only_exported("the dashboard", &exprs, &exported);
    // Every tasker_* word of the rules and of their tests: expressions, the series the
    // tests feed in, and the metrics that annotations and comments point people to.
    let rules = include_str!("../../../deploy/prometheus/alerts.yml");
    let rule_tests = include_str!("../../../deploy/prometheus/alerts.test.yml");
    assert_only_exported("alerts.yml", &[rules.to_owned()], &exported);
    assert_only_exported("alerts.test.yml", &[rule_tests.to_owned()], &exported);
    env.finish().await.unwrap();
}

/// Every alert rule of alerts.yml has a promtool test in alerts.test.yml that expects it
/// to fire.
#[test]
fn every_alert_rule_has_a_test_that_makes_it_fire() {
    let rules = include_str!("../../../deploy/prometheus/alerts.yml");
    let rule_tests = include_str!("../../../deploy/prometheus/alerts.test.yml");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .map(str::trim)
        .collect();
    assert!(alerts.len() >= 10, "alerts.yml has rules: {alerts:?}");
    let lines: Vec<&str> = rule_tests.lines().map(str::trim).collect();
    for alert in alerts {
        let fires = lines.windows(3).any(|w| {
            w[0] == format!("alertname: {alert}")
                && w[1] == "exp_alerts:"
                && w[2].starts_with("- exp_labels:")
        });
        assert!(
            fires,
            "alerts.test.yml has no test in which {alert} fires (alertname: {alert}, then exp_alerts: with - exp_labels:)"
        );
    }
}

/// Assert that every `tasker_*` metric name in `texts` is exported (as a family, or as
/// one of a family's `_bucket`, `_sum`, `_count` or `_total` series).
fn assert_only_exported(what: &str, texts: &[String], exported: &BTreeSet<String>) {
    let mut queried = BTreeSet::new();
    for text in texts {
        for name in metric_names(text) {
            queried.insert(name);
        }
    }
    assert!(!queried.is_empty(), "{what} names no tasker_* metric");
    for name in &queried {
        let family = ["_bucket", "_sum", "_count", "_total"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        assert!(
            exported.contains(name) || exported.contains(family),
            "{what} queries {name}, which nothing exports; exported: {exported:?}"
        );
    }
}

fn collect_exprs(value: &Value, into: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "query", Value::String(expr)) => into.push(expr.clone()),
                    _ => collect_exprs(value, into),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_exprs(item, into)),
        _ => {}
    }
}

/// The `tasker_*` metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("tasker_") {
        let start = i + at;
        let preceded_by_word =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |n| start + n);
        if !preceded_by_word {
            names.push(expr[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// A test's world with the two-step template `pair` and a worker `w1` for it.
async fn pair_with_worker(test: &str, options: EnvOptions) -> TestEnv {
    let mut env = TestEnv::start_with(test, options).await.unwrap();
    env.register_template("namespace: obs\nname: pair\nsteps:\n  - {name: first, handler: tasker.noop}\n  - {name: second, handler: tasker.echo, depends_on: [first]}\n")
        .await
        .unwrap();
    env.start_worker("w1", &[NAMESPACE]).await.unwrap();
    env
}

#[tokio::test]
async fn a_task_s_lifecycle_events_arrive_in_order() {
    let env = pair_with_worker("events", EnvOptions::default()).await;

    // Any system binds its own queue to the keys it wants; here, everything.
    let (connection, mut consumer) = tasker_tests::subscribe_events(&env.prefix, "#")
        .await
        .unwrap();

    let task = env
        .run_task(
            json!({"namespace": NAMESPACE, "name": "pair"}),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let task_id = task["task_id"].as_str().unwrap().to_owned();
    let mut seen = Vec::new();
    let mut last_id = 0;
    while !seen
        .iter()
        .any(|(name, _): &(String, Value)| name == "task.completed")
    {
        let (routing_key, event) = next_event(&mut consumer, &seen).await;
        // A dispatch token completes its step: events never carry one.
        assert!(!event.to_string().contains("dispatch_token"), "{event}");
        assert_eq!(
            routing_key,
            event["event"].as_str().unwrap(),
            "routed by event name"
        );
        assert!(
            event["event_id"].as_i64().unwrap() > last_id,
            "event ids increase"
        );
        last_id = event["event_id"].as_i64().unwrap();
        if event["task_id"] == task_id.as_str() {
            let label = match event["step_name"].as_str() {
                Some(step) => format!("{} {step}", event["event"].as_str().unwrap()),
                None => event["event"].as_str().unwrap().to_owned(),
            };
            seen.push((label, event));
        }
    }
    let names: Vec<&str> = seen.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "task.created",
            "task.started",
            "step.started first",
            "step.completed first",
            "step.started second",
            "step.completed second",
            "task.completed"
        ]
    );
    // Task and step events alike name the task's template.
    for (_, event) in [&seen[0], &seen[3]] {
        assert_eq!(event["namespace"], NAMESPACE);
        assert_eq!(event["task_name"], "pair");
        assert_eq!(event["version"], task["version"]);
    }
    let completed = &seen[3].1;
    assert_eq!(completed["step_name"], "first");
    assert_eq!(completed["priority"], 5);
    assert_eq!(completed["to_status"], "complete");
    assert_eq!(completed["metadata"]["worker_id"], "w1");
    assert_eq!(completed["metadata"]["attempt"], 1);
    let _ = connection.close(200, "OK".into()).await;
    env.finish().await.unwrap();
}

/// `TASKER_EVENTS` with patterns publishes the events they match and no others; the
/// relay's cursor still moves past the rest, and the console is told what it will get.
#[tokio::test]
async fn only_the_events_tasker_events_names_are_published() {
    let options = EnvOptions {
        coordinator_env: vec![("TASKER_EVENTS".into(), "task.*, step.failed".into())],
        ..EnvOptions::default()
    };
    let env = pair_with_worker("events_only", options).await;
    env.register_template("namespace: obs\nname: broken\nsteps:\n  - {name: boom, handler: tasker.fail, retry_limit: 1, config: {kind: permanent}}\n")
        .await
        .unwrap();
    let (connection, mut consumer) = tasker_tests::subscribe_events(&env.prefix, "#")
        .await
        .unwrap();

    let (status, me) = env.get("/v1/whoami").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(me["events"], true);
    assert_eq!(me["events_only"], json!(["task.*", "step.failed"]));
    let mut stream = env
        .http
        .get(format!("{}/v1/events/stream", env.base_url))
        .send()
        .await
        .unwrap();
    let ready = crate::console::read_events(&mut stream, |events| !events.is_empty()).await;
    assert_eq!(
        ready[0],
        (
            "ready".to_owned(),
            json!({"events": true, "only": ["task.*", "step.failed"]})
        )
    );
    drop(stream);

    for name in ["pair", "broken"] {
        env.run_task(
            json!({"namespace": NAMESPACE, "name": name}),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    }
    // Published in order: once the last task's failure arrives, everything before it has.
    let mut seen = Vec::new();
    while !seen.iter().any(|name| name == "task.failed") {
        let (routing_key, _) = next_event(&mut consumer, &seen).await;
        seen.push(routing_key);
    }
    assert_eq!(
        seen,
        [
            "task.created",
            "task.started",
            "task.completed",
            "task.created",
            "task.started",
            "step.failed",
            "task.failed"
        ]
    );
    let last = env.newest_transition_id().await.unwrap();
    env.wait_for_relay(last, Duration::from_secs(30))
        .await
        .unwrap();
    let _ = connection.close(200, "OK".into()).await;

    // A pattern that matches nothing is a typo: the coordinator says so and does not start.
    let stderr = tasker_tests::coordinator_refusing_to_start(
        &env.database_url,
        &[
            ("TASKER_AMQP_PREFIX", env.prefix.as_str()),
            ("TASKER_EVENTS", "tsk.*,step..failed"),
        ],
    )
    .await;
    assert!(
        stderr.contains("`tsk.*` matches no event")
            && stderr.contains("`step..failed` is not a routing-key pattern"),
        "{stderr}"
    );
    env.finish().await.unwrap();
}

/// The next lifecycle event `consumer` receives within 10 s, with its routing key;
/// `so_far` says what came before when none does.
async fn next_event(
    consumer: &mut lapin::Consumer,
    so_far: &impl std::fmt::Debug,
) -> (String, Value) {
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap_or_else(|_| panic!("no more events after {so_far:?}"))
        .unwrap()
        .unwrap();
    let event = serde_json::from_slice(&delivery.data).unwrap();
    (delivery.routing_key.to_string(), event)
}

/// A task's completion recorded by hand, marked (`metadata.mark`) so that its event can
/// be told apart; returns its transition id.
const MARKED_TASK_ROW: &str = "INSERT INTO task_transitions (task_id, from_status, to_status, reason, metadata) \
     VALUES ($1, 'in_progress', 'complete', 'all_steps_done', jsonb_build_object('mark', $2::text)) \
     RETURNING transition_id";

/// A pair run to completion and all its events relayed, and a subscriber to every event
/// from then on: the environment, the task's id, and the subscriber's connection (keep
/// it) and consumer.
async fn relayed_task(
    test: &str,
    options: EnvOptions,
) -> (TestEnv, uuid::Uuid, lapin::Connection, lapin::Consumer) {
    let env = pair_with_worker(test, options).await;
    let task = env
        .run_task(
            json!({"namespace": NAMESPACE, "name": "pair"}),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let task_id = task["task_id"].as_str().unwrap().parse().unwrap();
    let newest = env.newest_transition_id().await.unwrap();
    env.wait_for_relay(newest, Duration::from_secs(30))
        .await
        .unwrap();
    let (connection, consumer) = tasker_tests::subscribe_events(&env.prefix, "#")
        .await
        .unwrap();
    (env, task_id, connection, consumer)
}

/// History is published in id order: a transition whose transaction has not committed
/// holds back those recorded after it, and is published, first, once it commits. A step's
/// claim is no event: it is never sent, holds nothing back, and the cursor moves past it.
#[tokio::test]
async fn events_wait_for_a_transition_still_committing_and_pass_claims_over() {
    let options = EnvOptions {
        coordinator_env: vec![("TASKER_EVENTS_POLL_MS".into(), "100".into())],
        ..EnvOptions::default()
    };
    let (env, task_id, connection, mut consumer) = relayed_task("events_order", options).await;
    let step_id: uuid::Uuid =
        sqlx::query_scalar("SELECT step_id FROM steps WHERE task_id = $1 AND name = 'first'")
            .bind(task_id)
            .fetch_one(&env.pool)
            .await
            .unwrap();

    // Rows of the task's own kinds, marked so that they can be told apart.
    let task_row = MARKED_TASK_ROW;
    let claim_row = "INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata) \
                     VALUES ($1, $2, 'pending', 'enqueued', 'dispatched', jsonb_build_object('attempt', 2)) \
                     RETURNING transition_id";
    let mut held = env.pool.begin().await.unwrap();
    let held_id: i64 = sqlx::query_scalar(task_row)
        .bind(task_id)
        .bind("held")
        .fetch_one(&mut *held)
        .await
        .unwrap();
    let claim = |pool| {
        sqlx::query_scalar::<_, i64>(claim_row)
            .bind(step_id)
            .bind(task_id)
            .fetch_one(pool)
    };
    claim(&env.pool).await.unwrap();
    let after_id: i64 = sqlx::query_scalar(task_row)
        .bind(task_id)
        .bind("after")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let last_claim = claim(&env.pool).await.unwrap();

    // The relay polls every 100 ms: given half a second, it would have sent `after`
    // had it not waited for `held`.
    let early = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
    assert!(
        early.is_err(),
        "an event passed an uncommitted one: {early:?}"
    );
    held.commit().await.unwrap();
    let committed = tokio::time::Instant::now();

    let mut marks = Vec::new();
    while marks.len() < 2 {
        let (_, event) = next_event(&mut consumer, &marks).await;
        marks.push((
            event["event_id"].as_i64().unwrap(),
            event["metadata"]["mark"].as_str().unwrap().to_owned(),
        ));
    }
    assert_eq!(
        marks,
        [(held_id, "held".to_owned()), (after_id, "after".to_owned())]
    );
    // Within a few polls: the claim between `held` and `after` is not taken for a gap,
    // which the relay would wait out for seconds (5).
    assert!(
        committed.elapsed() < Duration::from_secs(3),
        "both arrived {:?} after the commit",
        committed.elapsed()
    );
    env.wait_for_relay(last_claim, Duration::from_secs(30))
        .await
        .unwrap();
    let claims = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await;
    assert!(claims.is_err(), "a claim was sent: {claims:?}");
    let _ = connection.close(200, "OK".into()).await;
    env.finish().await.unwrap();
}

/// A transition whose transaction stays open for long (here 7 s: a slow commit, a long
/// bulk operation) is waited for, not taken for a rollback by a clock, and published
/// once it commits; rolled-back transactions' gaps are passed, together, as soon as they
/// have ended.
#[tokio::test]
async fn events_wait_for_a_long_transaction_and_pass_rollbacks_at_once() {
    let options = EnvOptions {
        coordinator_env: vec![("TASKER_EVENTS_POLL_MS".into(), "100".into())],
        ..EnvOptions::default()
    };
    let (env, task_id, connection, mut consumer) = relayed_task("events_gap", options).await;
    let row = |mark: &'static str| {
        sqlx::query_scalar::<_, i64>(MARKED_TASK_ROW)
            .bind(task_id)
            .bind(mark)
    };

    let mut held = env.pool.begin().await.unwrap();
    let held_id = row("held").fetch_one(&mut *held).await.unwrap();
    let after_id = row("after").fetch_one(&env.pool).await.unwrap();
    let early = tokio::time::timeout(Duration::from_secs(7), consumer.next()).await;
    assert!(
        early.is_err(),
        "an event passed a transaction still open: {early:?}"
    );
    held.commit().await.unwrap();
    let mut marks = Vec::new();
    while marks.len() < 2 {
        let (_, event) = next_event(&mut consumer, &marks).await;
        marks.push((
            event["event_id"].as_i64().unwrap(),
            event["metadata"]["mark"].as_str().unwrap().to_owned(),
        ));
    }
    assert_eq!(
        marks,
        [(held_id, "held".to_owned()), (after_id, "after".to_owned())],
        "the long transaction's event was published, first"
    );

    // Forty rollbacks, each leaving a gap before a committed row: passed together.
    let mut later = Vec::new();
    for _ in 0..40 {
        let mut rolled = env.pool.begin().await.unwrap();
        row("rolled back").fetch_one(&mut *rolled).await.unwrap();
        later.push(row("later").fetch_one(&env.pool).await.unwrap());
        rolled.rollback().await.unwrap();
    }
    let ended = tokio::time::Instant::now();
    let mut published = Vec::new();
    while published.len() < later.len() {
        let (_, event) = next_event(&mut consumer, &published).await;
        published.push(event["event_id"].as_i64().unwrap());
    }
    assert_eq!(published, later);
    // One look at the gaps, and one more once their transactions have ended; a look
    // per gap (50 ms or more each) would take seconds.
    assert!(
        ended.elapsed() < Duration::from_millis(1500),
        "the rollbacks' gaps held the relay {:?}",
        ended.elapsed()
    );
    let _ = connection.close(200, "OK".into()).await;
    env.finish().await.unwrap();
}

/// Once the transaction it waited for has committed, the relay no longer waits at its
/// gap: it goes back to sleeping until woken or its poll (10 s), instead of looking again
/// every 50 ms.
#[tokio::test]
async fn after_a_gap_fills_the_relay_goes_back_to_sleep() {
    // The coordinator binary counts its statements (its telemetry layer does).
    let options = EnvOptions {
        binary_coordinator: true,
        ..EnvOptions::default()
    };
    let env = pair_with_worker("events_gap_idle", options).await;
    let run = || {
        env.run_task(
            json!({"namespace": NAMESPACE, "name": "pair"}),
            Duration::from_secs(30),
        )
    };
    let task = run().await.unwrap();
    let task_id: uuid::Uuid = task["task_id"].as_str().unwrap().parse().unwrap();
    let mut held = env.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO task_transitions (task_id, from_status, to_status, reason) \
         VALUES ($1, 'in_progress', 'complete', 'all_steps_done')",
    )
    .bind(task_id)
    .execute(&mut *held)
    .await
    .unwrap();
    // The coordinator's own commits wake the relay, which meets the gap.
    run().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    held.commit().await.unwrap();
    run().await.unwrap();
    let newest = env.newest_transition_id().await.unwrap();
    env.wait_for_relay(newest, Duration::from_secs(30))
        .await
        .unwrap();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let spent = tasker_tests::statements_over(&env.metrics_url(), Duration::from_secs(3)).await;
    assert!(spent < 40.0, "{spent} statements in 3 s with nothing to do");
    env.finish().await.unwrap();
}

#[tokio::test]
async fn health_status_shows_counts_the_workers_heard_from_and_the_queues() {
    // The queues are read by the gauges loop: often, so the new namespace's shows soon.
    let options = EnvOptions {
        coordinator_env: vec![("TASKER_GAUGE_INTERVAL_MS".into(), "200".into())],
        ..EnvOptions::default()
    };
    let mut env = TestEnv::start_with("status", options).await.unwrap();
    env.register_template(
        "namespace: obs\nname: single\nsteps:\n  - {name: one, handler: tasker.noop}\n",
    )
    .await
    .unwrap();
    env.start_worker_with(
        binary("tasker-worker"),
        "reporter",
        &[NAMESPACE],
        5,
        &[("TASKER_HEARTBEAT_INTERVAL_MS", "200")],
    )
    .await
    .unwrap();
    env.run_task(
        json!({"namespace": NAMESPACE, "name": "single"}),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        let (_, status) = env.get("/health/status").await.unwrap();
        if status["workers"].as_array().is_some_and(|w| !w.is_empty())
            && status["queues"].as_array().is_some_and(|q| q.len() == 3)
        {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no worker or no queue listed: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status["status"], "ok");
    assert_eq!(status["checks"], json!({"database": "ok", "broker": "ok"}));
    assert_eq!(status["counts"]["tasks"]["complete"], 1);
    assert_eq!(status["counts"]["steps"]["complete"], 1);
    let worker = &status["workers"][0];
    assert_eq!(worker["worker_id"], "reporter");
    assert_eq!(worker["namespaces"], json!([NAMESPACE]));
    assert_eq!(worker["concurrency"], 5);
    assert_eq!(worker["in_flight"], 0);
    // The queues as the gauges loop read them: this namespace's steps, results, dead letters.
    let queues: Vec<(String, String, u64)> = status["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            (
                q["queue"].as_str().unwrap().to_owned(),
                q["kind"].as_str().unwrap().to_owned(),
                q["messages"].as_u64().unwrap(),
            )
        })
        .collect();
    let prefix = &env.prefix;
    for expected in [
        (format!("{prefix}.steps.{NAMESPACE}"), "steps".to_owned(), 0),
        (format!("{prefix}.results"), "results".to_owned(), 0),
        (format!("{prefix}.dead_letter"), "dead_letter".to_owned(), 0),
    ] {
        assert!(queues.contains(&expected), "{expected:?} in {queues:?}");
    }

    // A worker that stops is no longer listed after three intervals.
    env.workers[0].terminate().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, status) = env.get("/health/status").await.unwrap();
        if status["workers"].as_array().is_some_and(|w| w.is_empty()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stopped worker is still listed: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.finish().await.unwrap();
}

/// Without autovacuum, dead step versions slow claims and results down: the coordinator
/// says so when it starts, and says nothing when autovacuum is on.
#[tokio::test]
async fn the_coordinator_warns_when_autovacuum_is_off() {
    // A process: the test reads its log.
    let options = EnvOptions {
        binary_coordinator: true,
        ..EnvOptions::default()
    };
    let env = TestEnv::start_with("autovacuum", options).await.unwrap();
    let setting: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    // The check runs before the coordinator listens, and the env waited for that.
    let log = env.coordinator.log();
    let warned = log
        .lines()
        .any(|line| line.contains("WARN") && line.contains("autovacuum is off"));
    assert_eq!(
        warned,
        setting != "on",
        "autovacuum = {setting}; log:\n{log}"
    );
    env.finish().await.unwrap();
}

/// Tasks that end outside the result path are counted too (the task error-rate alert
/// divides by them): one whose last step took a signal, and one whose every step was
/// skipped as it was created.
#[tokio::test]
async fn tasks_ended_by_a_signal_or_at_creation_are_counted_as_finished() {
    let env = TestEnv::start("obs-ends").await.unwrap();
    for template in [
        "namespace: ends\nname: gate\nsteps:\n  - {name: hold, handler: tasker.wait, config: {signal: go}}\n",
        "namespace: ends\nname: nothing\nsteps:\n  - {name: maybe, handler: tasker.noop, when: \"false\"}\n",
    ] {
        let (status, body) = env.register_template(template).await.unwrap();
        assert!(status.is_success(), "{body}");
    }
    let (status, gate) = env
        .create_task(json!({"namespace": "ends", "name": "gate"}))
        .await
        .unwrap();
    assert_eq!(status, 201, "{gate}");
    let (status, nothing) = env
        .create_task(json!({"namespace": "ends", "name": "nothing"}))
        .await
        .unwrap();
    assert_eq!(status, 201, "{nothing}");
    assert_eq!(nothing["status"], "complete", "{nothing}");
    let gate_id = gate["task_id"].as_str().unwrap();
    // Once its step waits (a signal sent before is kept for it, and ends it as well).
    let (status, body) = env
        .post(&format!("/v1/tasks/{gate_id}/signals/go"), json!({}))
        .await
        .unwrap();
    assert!(status == 200 || status == 202, "{status}: {body}");
    env.wait_for_task(gate_id, &["complete"], Duration::from_secs(30))
        .await
        .unwrap();
    tasker_tests::wait_for_metric(
        &env.metrics_url(),
        "tasker_tasks_finished_total{namespace=\"ends\",status=\"complete\"}",
        2.0,
    )
    .await;
    let (samples, _) = parse_metrics(&scrape(&env.metrics_url()).await);
    assert_eq!(
        sample(
            &samples,
            "tasker_task_duration_seconds_count{namespace=\"ends\",template=\"gate\",status=\"complete\"}"
        ),
        1.0
    );
    env.finish().await.unwrap();
}
