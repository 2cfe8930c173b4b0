//! A tasker-engine 1.x template file registers unchanged and its tasks run.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use clap::Parser;
use serde_json::{Value, json};
use tasker_tests::{StatusCode, TestEnv, binary};
use tasker_worker::{HandlerRegistry, StepContext, StepError, StepHandler, Worker, WorkerSettings};

use crate::steps_by_name;

const ORDER_PROCESSOR: &str = include_str!("../../fixtures/tasker_engine_order_processing.yaml");

#[tokio::test]
async fn a_tasker_engine_template_registers_and_its_tasks_run() {
    let mut env = TestEnv::start("tasker-engine").await.unwrap();
    let (status, template) = env.register_template(ORDER_PROCESSOR).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{template}");
    assert_eq!(template["namespace"], "order_processing");
    assert_eq!(template["name"], "order_processor");
    assert_eq!(template["version"], "1.0.0");
    let steps = steps_by_name(&template);
    assert_eq!(steps["validate_order"]["retryable"], false);
    assert_eq!(steps["reserve_inventory"]["retry_limit"], 5);
    assert_eq!(
        steps["ship_order"]["depends_on"],
        json!(["reserve_inventory", "process_payment"])
    );
    // The coordinator runs with TASKER_ENV=development: that environment's override applies.
    assert_eq!(
        steps["process_payment"]["config"]["gateway"],
        "development_sandbox"
    );

    // The template's `schema` guards the context.
    let (status, body) = env
        .create_task(json!({"namespace": "order_processing", "name": "order_processor", "context": {"order_id": "x"}}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    env.start_worker_binary(
        binary("examples/order_worker"),
        "orders",
        &["order_processing"],
        4,
    )
    .await
    .unwrap();
    let task = env
        .run_task(
            json!({"namespace": "order_processing", "name": "order_processor", "initiator": "storefront",
                   "context": {"order_id": 1042, "customer_email": "ada@example.com",
                               "cart_items": [{"sku": "A1", "price": 12.5, "quantity": 2},
                                              {"sku": "B2", "price": 5.0, "quantity": 1}]}}),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(task["status"], "complete", "{task:#}");
    let steps = steps_by_name(&task);
    assert_eq!(steps["validate_order"]["results"]["total"], 30.0);
    assert_eq!(steps["process_payment"]["results"]["charged"], 30.0);
    assert_eq!(
        steps["process_payment"]["results"]["gateway"],
        "development_sandbox"
    );
    assert_eq!(steps["ship_order"]["results"]["tracking"], "TRK-1042");
    assert_eq!(
        steps["send_confirmation"]["results"]["sent_to"],
        "ada@example.com"
    );
    env.finish().await.unwrap();
}

/// Template files in tasker-engine 1.x's documented form, covering every key of its
/// `TaskTemplate` and `StepTemplate` and of its published examples.
const ENGINE_FILES: [(&str, &str); 4] = [
    (
        "inventory_sync",
        include_str!("../../fixtures/tasker_engine/inventory_sync.yaml"),
    ),
    (
        "nightly_reporting",
        include_str!("../../fixtures/tasker_engine/nightly_reporting.yaml"),
    ),
    (
        "guarded_checkout",
        include_str!("../../fixtures/tasker_engine/guarded_checkout.yaml"),
    ),
    (
        "returns_processing",
        include_str!("../../fixtures/tasker_engine/returns_processing.yaml"),
    ),
];

/// The warnings each of [`ENGINE_FILES`] gives, `(path, code)`: keys the project accepts
/// but does not use. Registering answers them; loading from a folder logs them.
fn expected_warnings(file: &str) -> &'static [(&'static str, &'static str)] {
    match file {
        "nightly_reporting" => &[("custom_events", "ignored")],
        "guarded_checkout" => &[("handler_config", "ignored")],
        "returns_processing" => &[
            ("monitoring", "unknown_key"),
            ("retry_strategies", "unknown_key"),
            ("concurrent", "ignored"),
            ("step_templates[1].custom_events", "ignored"),
        ],
        _ => &[],
    }
}

/// Every step handler class the files name, as a migrating team ports them: one Rust
/// handler registered under each Ruby class name.
const HANDLER_CLASSES: [&str; 18] = [
    "Warehouse::StepHandler::FetchStockLevelsHandler",
    "Warehouse::StepHandler::FetchOpenOrdersHandler",
    "Warehouse::StepHandler::ReconcileHandler",
    "Warehouse::StepHandler::PushAdjustmentsHandler",
    "Warehouse::StepHandler::NotifyPlannersHandler",
    "Analytics::StepHandlers::ExtractPaymentsHandler",
    "Analytics::StepHandlers::ExtractAccountsHandler",
    "Analytics::StepHandlers::RevenueReportHandler",
    "Analytics::StepHandlers::ChurnReportHandler",
    "Analytics::StepHandlers::PublishReportsHandler",
    "Storefront::StepHandlers::PriceCartHandler",
    "Storefront::StepHandlers::AuthorizeCardHandler",
    "Storefront::StepHandlers::ConfirmOrderHandler",
    "Returns::StepHandlers::ReceiveItemHandler",
    "Returns::StepHandlers::InspectItemHandler",
    "Returns::StepHandlers::IssueRefundHandler",
    "Returns::StepHandlers::RestockItemHandler",
    "Returns::StepHandlers::CloseReturnHandler",
];

/// A ported handler: answers with its class, its config and its parents' names, so the
/// test sees which handler ran each step and what it was given.
struct Ported(&'static str);

impl StepHandler for Ported {
    // What `#[async_trait]` writes; this crate does not depend on `async-trait`.
    fn call<'life0, 'life1, 'async_trait>(
        &'life0 self,
        step: &'life1 StepContext,
    ) -> Pin<Box<dyn Future<Output = Result<Value, StepError>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            Ok(json!({
                "class": self.0,
                "step": step.step_name,
                "template": step.template,
                "config": step.config,
                "parents": step.parents.keys().collect::<Vec<_>>(),
            }))
        })
    }
}

#[derive(Parser)]
struct WorkerArgs {
    #[command(flatten)]
    settings: WorkerSettings,
}

#[tokio::test]
async fn tasker_engine_files_register_unchanged_and_their_tasks_run() {
    let env = TestEnv::start("tasker-engine-files").await.unwrap();
    let mut registered = Vec::new();
    for (file, text) in ENGINE_FILES {
        let (status, answer) = env.register_template(text).await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{file}: {answer:#}");
        // `warnings` is left out when there are none, and is a list otherwise.
        let warnings: Vec<(&str, &str)> = match answer.get("warnings") {
            None => Vec::new(),
            Some(list) => list
                .as_array()
                .unwrap_or_else(|| panic!("{file}: `warnings` is not a list: {answer:#}"))
                .iter()
                .map(|w| (w["path"].as_str().unwrap(), w["code"].as_str().unwrap()))
                .collect(),
        };
        assert_eq!(warnings, expected_warnings(file), "{file}: {answer:#}");
        // Registering the same file again is the identical template, with its warnings.
        let (status, again) = env.register_template(text).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{file}: {again:#}");
        assert_eq!(again["warnings"], answer["warnings"], "{file}");
        registered.push(answer);
    }
    let names: Vec<(&str, &str)> = registered
        .iter()
        .map(|t| {
            (
                t["namespace"].as_str().unwrap(),
                t["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("warehouse", "warehouse/inventory_sync"),
            ("analytics", "nightly_reporting"),
            ("storefront", "guarded_checkout"),
            ("returns", "returns/process_return"),
        ]
    );

    // A `/` in a name travels in a URL as %2F, and axum decodes it within the segment.
    let (status, template) = env
        .get("/v1/templates/warehouse/warehouse%2Finventory_sync")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{template:#}");
    assert_eq!(template["name"], "warehouse/inventory_sync");
    let steps = steps_by_name(&template);
    // TASKER_ENV=development: that environment's overrides apply.
    assert_eq!(
        steps["fetch_stock_levels"]["config"]["url"],
        "http://localhost:3000/stock"
    );
    let diagram = env
        .http
        .get(format!(
            "{}/v1/templates/returns/returns%2Fprocess_return/diagram",
            env.base_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(diagram.status(), StatusCode::OK);
    // Unencoded, the `/` splits the path: no such route.
    let (status, _) = env
        .get("/v1/templates/warehouse/warehouse/inventory_sync")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);

    let mut registry = HandlerRegistry::with_builtins();
    for class in HANDLER_CLASSES {
        registry = registry.register(class, Ported(class));
    }
    let amqp = tasker_tests::amqp_url();
    let settings = WorkerArgs::parse_from([
        "worker",
        "--amqp-url",
        &amqp,
        "--amqp-prefix",
        &env.prefix,
        "--namespaces",
        "warehouse,analytics,storefront,returns",
        "--worker-id",
        "ported-engine-handlers",
    ])
    .settings;
    let worker = Worker::build(settings, registry).await.unwrap();
    let (stop_worker, worker_stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(worker.run_until_stopped(async move {
        let _ = worker_stopped.await;
    }));

    let tasks = [
        json!({"namespace": "warehouse", "name": "warehouse/inventory_sync",
               "context": {"warehouse_id": 7}}),
        json!({"namespace": "analytics", "name": "nightly_reporting",
               "context": {"report_date": "2026-12-03", "granularity": "weekly"}}),
        json!({"namespace": "storefront", "name": "guarded_checkout",
               "context": {"cart_id": 12}}),
        json!({"namespace": "returns", "name": "returns/process_return",
               "context": {"return_id": "R-881", "amount": 19.5,
                           "customer": {"email": "ada@example.com", "tier": "gold"}}}),
    ];
    for (request, template) in tasks.iter().zip(&registered) {
        let task = env
            .run_task(request.clone(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(task["status"], "complete", "{task:#}");
        let defined = steps_by_name(template);
        let ran = steps_by_name(&task);
        assert_eq!(ran.len(), defined.len(), "{task:#}");
        for (name, step) in ran {
            // Each step ran under the handler registered for its template's class name.
            assert_eq!(
                step["results"]["class"], defined[&name]["handler"],
                "{name}: {step:#}"
            );
            assert_eq!(
                step["results"]["config"], defined[&name]["config"],
                "{name}"
            );
        }
    }
    let task = env
        .run_task(tasks[3].clone(), Duration::from_secs(60))
        .await
        .unwrap();
    let steps = steps_by_name(&task);
    assert_eq!(
        steps["close_return"]["results"]["parents"],
        json!(["issue_refund", "restock_item"])
    );
    assert_eq!(
        steps["issue_refund"]["results"]["config"]["gateway"],
        "development_sandbox"
    );
    assert_eq!(
        steps["issue_refund"]["results"]["template"],
        "returns/process_return@1.0.0"
    );
    // A name with `/` is a query value like any other.
    let (status, page) = env
        .get("/v1/tasks?namespace=returns&name=returns%2Fprocess_return")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{page:#}");
    assert_eq!(page["tasks"].as_array().unwrap().len(), 2, "{page:#}");

    let _ = stop_worker.send(());
    worker.await.unwrap().unwrap();
    env.finish().await.unwrap();
}

#[tokio::test]
async fn tasker_engine_files_load_from_the_templates_directory_with_their_warnings_logged() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tasker_engine");
    let env = TestEnv::start_with(
        "tasker-engine-dir",
        tasker_tests::EnvOptions {
            templates_dir: Some(dir),
            // A process: the test reads its log.
            binary_coordinator: true,
            ..tasker_tests::EnvOptions::default()
        },
    )
    .await
    .unwrap();
    let (status, list) = env.get("/v1/templates").await.unwrap();
    assert_eq!(status, StatusCode::OK, "{list:#}");
    assert_eq!(
        list["templates"].as_array().map(Vec::len),
        Some(ENGINE_FILES.len()),
        "{list:#}"
    );
    let (status, template) = env
        .get("/v1/templates/warehouse/warehouse%2Finventory_sync")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{template:#}");
    let log = env.coordinator.log();
    let warned = |file: &str, path: &str, code: &str| {
        log.lines().any(|line| {
            line.contains("\"level\":\"WARN\"")
                && line.contains(&format!("{file}.yaml"))
                && line.contains(&format!("\"path\":\"{path}\""))
                && line.contains(&format!("\"code\":\"{code}\""))
        })
    };
    for (file, _) in ENGINE_FILES {
        for (path, code) in expected_warnings(file) {
            assert!(
                warned(file, path, code),
                "{file}: {path} ({code}) not logged:\n{log}"
            );
        }
    }
    env.finish().await.unwrap();
}
