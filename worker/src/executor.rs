//! Decides the outcome of one step: runs its handler under the step's timeout, turning a
//! panic or a timeout into a retryable failure, and builds the result message. It never
//! touches the broker: the runtime publishes what it decides.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tasker_shared::messages::{
    Outcome, SCHEMA_VERSION, StepError as WireError, StepMessage, StepResult,
};

use crate::handler::{StepContext, StepError, StepHandler};

/// Run `handler` for `message` and decide the result.
pub(crate) async fn execute(
    handler: Arc<dyn StepHandler>,
    message: &StepMessage,
    worker_id: &str,
) -> StepResult {
    let timeout = Duration::from_millis(u64::try_from(message.timeout_ms).unwrap_or(0).max(1));
    let context = StepContext {
        task_id: message.task_id,
        step_id: message.step_id,
        step_name: message.step_name.clone(),
        namespace: message.namespace.clone(),
        template: message.template.clone(),
        handler: message.handler.clone(),
        config: message.config.clone(),
        context: message.context.clone(),
        parents: message.parents.clone(),
        attempt: message.attempt,
        retry_limit: message.retry_limit,
        timeout,
    };
    let started_at = Utc::now();
    // A task of its own, so a panic is caught as a JoinError instead of unwinding here.
    let mut run = tokio::spawn(async move { handler.call(&context).await });
    let outcome = match tokio::time::timeout(timeout, &mut run).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(join_error)) => Err(StepError::retryable(format!(
            "handler panicked: {}",
            panic_message(join_error)
        ))
        .with_code("panic")),
        Err(_) => {
            run.abort();
            Err(StepError::retryable(format!(
                "handler did not finish within timeout_ms = {}",
                message.timeout_ms
            ))
            .with_code("timeout"))
        }
    };
    let finished_at = Utc::now();
    let (outcome, results, error) = match outcome {
        Ok(results) => (Outcome::Success, Some(results), None),
        Err(StepError::Retryable {
            message,
            code,
            retry_after,
        }) => (
            Outcome::RetryableError,
            None,
            Some(WireError {
                message,
                code,
                retry_after_seconds: retry_after.map(|d| d.as_secs_f64()),
            }),
        ),
        Err(StepError::Permanent { message, code }) => (
            Outcome::PermanentError,
            None,
            Some(WireError {
                message,
                code,
                retry_after_seconds: None,
            }),
        ),
    };
    StepResult {
        schema_version: SCHEMA_VERSION,
        task_id: message.task_id,
        step_id: message.step_id,
        dispatch_token: message.dispatch_token,
        outcome,
        results,
        error,
        started_at,
        finished_at,
        worker_id: worker_id.to_owned(),
    }
}

fn panic_message(error: tokio::task::JoinError) -> String {
    if !error.is_panic() {
        return error.to_string();
    }
    let payload = error.into_panic();
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}
