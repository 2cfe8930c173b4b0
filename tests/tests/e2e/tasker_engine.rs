//! A tasker-engine 1.x template file registers unchanged and its tasks run.

use std::time::Duration;

use serde_json::json;
use tasker_tests::{StatusCode, TestEnv, binary};

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
