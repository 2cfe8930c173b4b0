//! A worker with custom handlers: the order-processing steps of a tasker-engine 1.x
//! template (`tests/fixtures/tasker_engine_order_processing.yaml`), written in Rust under
//! the Ruby class names the template already uses, plus the built-in handlers.
//!
//! Run it like `tasker-worker` (same settings):
//!
//! ```sh
//! cargo run -p tasker-worker --example order_worker
//! ```

use serde_json::{Value, json};
use tasker_worker::{HandlerRegistry, StepContext, StepError, StepHandler};

/// Checks the order and prices it.
struct ValidateOrder;

#[async_trait::async_trait]
impl StepHandler for ValidateOrder {
    async fn call(&self, step: &StepContext) -> Result<Value, StepError> {
        let items = step.context["cart_items"]
            .as_array()
            .filter(|items| !items.is_empty())
            .ok_or_else(|| {
                StepError::permanent("the order has no cart_items").with_code("empty_cart")
            })?;
        let mut total = 0.0;
        for (index, item) in items.iter().enumerate() {
            let price = item["price"].as_f64();
            let quantity = item["quantity"].as_f64();
            match (price, quantity) {
                (Some(price), Some(quantity)) if price >= 0.0 && quantity > 0.0 => {
                    total += price * quantity
                }
                _ => {
                    return Err(StepError::permanent(format!(
                        "cart_items[{index}] needs a price >= 0 and a quantity > 0"
                    ))
                    .with_code("invalid_item"));
                }
            }
        }
        Ok(json!({"validated": true, "item_count": items.len(), "total": total}))
    }
}

/// Reserves stock for every item.
struct ReserveInventory;

#[async_trait::async_trait]
impl StepHandler for ReserveInventory {
    async fn call(&self, step: &StepContext) -> Result<Value, StepError> {
        let count = step.parents["validate_order"]["item_count"]
            .as_u64()
            .unwrap_or(0);
        Ok(json!({"reserved_items": count, "warehouse": step.config["warehouse"]}))
    }
}

/// Charges the validated total.
struct ChargePayment;

#[async_trait::async_trait]
impl StepHandler for ChargePayment {
    async fn call(&self, step: &StepContext) -> Result<Value, StepError> {
        let total = step.parents["validate_order"]["total"]
            .as_f64()
            .ok_or_else(|| StepError::permanent("validate_order gave no total"))?;
        Ok(json!({
            "charged": total,
            "gateway": step.config["gateway"],
            "payment_id": format!("pay_{}", step.context["order_id"]),
        }))
    }
}

/// Ships once stock is reserved and payment taken.
struct ShipOrder;

#[async_trait::async_trait]
impl StepHandler for ShipOrder {
    async fn call(&self, step: &StepContext) -> Result<Value, StepError> {
        let payment = &step.parents["process_payment"]["payment_id"];
        let reserved = &step.parents["reserve_inventory"]["reserved_items"];
        Ok(
            json!({"tracking": format!("TRK-{}", step.context["order_id"]), "payment_id": payment, "items": reserved}),
        )
    }
}

/// Tells the customer.
struct SendConfirmation;

#[async_trait::async_trait]
impl StepHandler for SendConfirmation {
    async fn call(&self, step: &StepContext) -> Result<Value, StepError> {
        Ok(json!({
            "sent_to": step.context["customer_email"],
            "tracking": step.parents["ship_order"]["tracking"],
        }))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let registry = HandlerRegistry::with_builtins()
        .register(
            "OrderProcessing::StepHandler::ValidateOrderHandler",
            ValidateOrder,
        )
        .register(
            "OrderProcessing::StepHandler::ReserveInventoryHandler",
            ReserveInventory,
        )
        .register(
            "OrderProcessing::StepHandler::ProcessPaymentHandler",
            ChargePayment,
        )
        .register("OrderProcessing::StepHandler::ShipOrderHandler", ShipOrder)
        .register(
            "OrderProcessing::StepHandler::SendConfirmationHandler",
            SendConfirmation,
        );
    tasker_worker::run("order-worker", registry).await
}
