//! Traces: one task is one trace across the coordinator and the worker, and each step's
//! execution on the worker is a child of the coordinator's dispatch of it (through the
//! `traceparent` AMQP header).
//!
//! The coordinator and a worker run in this process (their libraries, as the binaries
//! run them) so an in-memory exporter can see every span. It is a test binary of its own
//! because it installs the process's global tracing subscriber.

use std::collections::HashMap;
use std::time::Duration;

use clap::Parser;
use opentelemetry::Value as OtelValue;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use serde_json::json;
use tasker_coordinator::{Application, CoordinatorSettings};
use tasker_shared::config::{LogFormat, LogSettings};
use tasker_worker::{HandlerRegistry, Worker, WorkerSettings};

#[derive(Parser)]
struct CoordinatorArgs {
    #[command(flatten)]
    settings: CoordinatorSettings,
}

#[derive(Parser)]
struct WorkerArgs {
    #[command(flatten)]
    settings: WorkerSettings,
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| match &kv.value {
            OtelValue::String(s) => s.to_string(),
            other => other.to_string(),
        })
}

/// Register `template` (of namespace `traced`) and create a task of it, `name`: its id.
async fn register_and_create(
    api: &tasker_tests::Api,
    base: &str,
    template: &str,
    name: &str,
) -> String {
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/templates"))
        .body(template.to_owned())
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let task = api
        .create_task(&json!({"namespace": "traced", "name": name}))
        .await
        .unwrap();
    task.task_id.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_is_one_trace_and_each_execution_is_a_child_of_its_dispatch() {
    let exporter = InMemorySpanExporter::default();
    let logs = LogSettings {
        log_format: LogFormat::Human,
        log_filter: "warn".into(),
    };
    let telemetry =
        tasker_shared::telemetry::init_with_exporter(&logs, "tasker-test", exporter.clone());

    let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let database_url = format!("{}/tasker_test_{id}", tasker_tests::postgres_server());
    let prefix = format!("tt{id}");
    let amqp = tasker_tests::amqp_url();
    let coordinator = CoordinatorArgs::parse_from([
        "coordinator",
        "--database-url",
        &database_url,
        "--amqp-url",
        &amqp,
        "--amqp-prefix",
        &prefix,
        "--http-addr",
        "127.0.0.1:0",
        "--db-pool-size",
        "4",
    ])
    .settings;
    let app = Application::build(coordinator).await.unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let (stop_app, app_stopped) = tokio::sync::oneshot::channel::<()>();
    let app = tokio::spawn(app.run_until_stopped(async move {
        let _ = app_stopped.await;
    }));
    let worker = WorkerArgs::parse_from([
        "worker",
        "--amqp-url",
        &amqp,
        "--amqp-prefix",
        &prefix,
        "--namespaces",
        "traced",
        "--worker-id",
        "traced-worker",
    ])
    .settings;
    let worker = Worker::build(worker, HandlerRegistry::with_builtins())
        .await
        .unwrap();
    let (stop_worker, worker_stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(worker.run_until_stopped(async move {
        let _ = worker_stopped.await;
    }));

    let api = tasker_tests::Api::new(base.clone());
    let template = "namespace: traced\nname: diamond\nsteps:\n  - {name: a, handler: tasker.echo}\n  - {name: b, handler: tasker.echo, depends_on: [a]}\n  - {name: c, handler: tasker.echo, depends_on: [a]}\n  - {name: d, handler: tasker.echo, depends_on: [b, c]}\n";
    let task_id = register_and_create(&api, &base, template, "diamond").await;
    api.wait_for_task(
        task_id.parse().unwrap(),
        &[tasker_tests::TaskStatus::Complete],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);

    // Every span of the task has ended once the last apply_result closed.
    let spans = loop {
        telemetry.flush();
        let spans = exporter.get_finished_spans().unwrap();
        let of_task = |name: &str| {
            spans
                .iter()
                .filter(|s| s.name == name && attribute(s, "task_id").as_deref() == Some(&task_id))
                .count()
        };
        if of_task("apply_result") == 4 || tokio::time::Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let named = |name: &str| -> Vec<&SpanData> {
        spans
            .iter()
            .filter(|s| s.name == name && attribute(s, "task_id").as_deref() == Some(&task_id))
            .collect()
    };
    let create = named("create_task");
    assert_eq!(create.len(), 1, "one create_task span");
    let trace = create[0].span_context.trace_id();
    let dispatches = named("dispatch_step");
    let executions = named("execute_step");
    let applies = named("apply_result");
    assert_eq!(
        (dispatches.len(), executions.len(), applies.len()),
        (4, 4, 4)
    );

    let by_step = |spans: &[&SpanData]| -> HashMap<String, SpanData> {
        spans
            .iter()
            .map(|s| (attribute(s, "step_id").unwrap(), (*s).clone()))
            .collect()
    };
    let dispatch_of = by_step(&dispatches);
    let execution_of = by_step(&executions);
    let apply_of = by_step(&applies);
    for (step_id, dispatch) in &dispatch_of {
        assert_eq!(
            dispatch.span_context.trace_id(),
            trace,
            "one trace for the whole task"
        );
        assert_eq!(
            dispatch.parent_span_id,
            create[0].span_context.span_id(),
            "dispatch under create_task"
        );
        let execution = &execution_of[step_id];
        assert_eq!(execution.span_context.trace_id(), trace);
        assert_eq!(
            execution.parent_span_id,
            dispatch.span_context.span_id(),
            "the worker's execute_step is a child of the coordinator's dispatch_step"
        );
        let apply = &apply_of[step_id];
        assert_eq!(apply.span_context.trace_id(), trace);
        assert_eq!(
            apply.parent_span_id,
            execution.span_context.span_id(),
            "apply_result under execute_step"
        );
    }

    // A step no handler of the worker runs fails in its trace too: its result, sent by
    // the worker that dead-letters it, is applied under its execution.
    let template =
        "namespace: traced\nname: unknown\nsteps:\n  - {name: lost, handler: no.such.handler}\n";
    let failed_id = register_and_create(&api, &base, template, "unknown").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (execution, apply) = loop {
        telemetry.flush();
        let spans = exporter.get_finished_spans().unwrap();
        let one = |name: &str| {
            spans
                .iter()
                .find(|s| s.name == name && attribute(s, "task_id").as_deref() == Some(&failed_id))
                .cloned()
        };
        if let (Some(execution), Some(apply)) = (one("execute_step"), one("apply_result")) {
            break (execution, apply);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no execute_step and apply_result spans for the unknown handler's step"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        apply.span_context.trace_id(),
        execution.span_context.trace_id()
    );
    assert_eq!(
        apply.parent_span_id,
        execution.span_context.span_id(),
        "the unknown handler's failure applied under its execute_step"
    );

    let _ = stop_worker.send(());
    worker.await.unwrap().unwrap();
    let _ = stop_app.send(());
    app.await.unwrap().unwrap();
    let _ = <sqlx::Postgres as sqlx::migrate::MigrateDatabase>::drop_database(&database_url).await;
    tasker_tests::delete_broker_objects(&prefix, &["traced".to_owned()])
        .await
        .unwrap();
    telemetry.shutdown();
}
