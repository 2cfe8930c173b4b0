//! `tasker.noop`, `tasker.sleep`, `tasker.echo`, `tasker.fail`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::handler::{StepContext, StepError, StepHandler};

/// Succeeds with `{}`.
pub(crate) struct Noop;

#[async_trait::async_trait]
impl StepHandler for Noop {
    async fn call(&self, _step: &StepContext) -> Result<Value, StepError> {
        Ok(json!({}))
    }
}

/// Sleeps `config.ms` milliseconds (default 0), then succeeds.
pub(crate) struct Sleep;

#[async_trait::async_trait]
impl StepHandler for Sleep {
    async fn call(&self, step: &StepContext) -> Result<Value, StepError> {
        let ms = match step.config.get("ms") {
            None => 0,
            Some(value) => value.as_u64().ok_or_else(|| {
                StepError::permanent(format!(
                    "config.ms must be a whole number of milliseconds, got {value}"
                ))
                .with_code("invalid_config")
            })?,
        };
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(json!({"slept_ms": ms}))
    }
}

/// Succeeds with its config, the task's context and its parents' results, and as an
/// instance of a `for_each` step, its `item` and `index`.
pub(crate) struct Echo;

#[async_trait::async_trait]
impl StepHandler for Echo {
    async fn call(&self, step: &StepContext) -> Result<Value, StepError> {
        let mut echoed =
            json!({"config": step.config, "context": step.context, "parents": step.parents});
        if let Some(index) = step.index {
            echoed["item"] = step.item.clone().unwrap_or_default();
            echoed["index"] = index.into();
        }
        Ok(echoed)
    }
}

/// Fails while `attempt <= config.times` (default: always), with `config.kind`
/// (`retryable`, the default, or `permanent`) and an optional `retry_after_seconds`;
/// then succeeds with `{"attempt"}`. With `kind: defer` it defers (spending no attempt)
/// `times` times, each for `retry_after_seconds` (default 1), then succeeds; with
/// `kind: panic` it panics.
pub(crate) struct Fail;

#[async_trait::async_trait]
impl StepHandler for Fail {
    async fn call(&self, step: &StepContext) -> Result<Value, StepError> {
        let times = step
            .config
            .get("times")
            .and_then(Value::as_i64)
            .unwrap_or(i64::MAX);
        let retry_after = step
            .config
            .get("retry_after_seconds")
            .and_then(Value::as_f64)
            .filter(|s| *s >= 0.0)
            .map(|s| Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX));
        let kind = step
            .config
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("retryable");
        if kind == "defer" {
            if i64::from(step.deferrals) < times {
                return Err(StepError::defer(
                    format!("tasker.fail: deferral {} of {times}", step.deferrals + 1),
                    retry_after.unwrap_or(Duration::from_secs(1)),
                ));
            }
            return Ok(json!({"attempt": step.attempt, "deferrals": step.deferrals}));
        }
        if i64::from(step.attempt) > times {
            return Ok(json!({"attempt": step.attempt}));
        }
        let message = format!("tasker.fail: failing attempt {} of {times}", step.attempt);
        match kind {
            "permanent" => Err(StepError::permanent(message).with_code("tasker.fail")),
            // Proves a panicking handler is a retryable failure and the worker survives.
            "panic" => panic!("{message}"),
            "retryable" => {
                let error = StepError::retryable(message).with_code("tasker.fail");
                Err(match retry_after {
                    Some(delay) => error.retry_after(delay),
                    None => error,
                })
            }
            other => Err(StepError::permanent(format!(
                "config.kind must be `retryable`, `permanent`, `defer` or `panic`, got `{other}`"
            ))
            .with_code("invalid_config")),
        }
    }
}
