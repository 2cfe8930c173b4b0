//! The [`StepHandler`] trait: how a Rust user teaches a worker to run a step.
//!
//! A handler receives a [`StepContext`] (its config, the task's context, its parents'
//! results, the attempt number) and returns the step's results as JSON, or a
//! [`StepError`] that chooses what happens next:
//!
//! - [`StepError::retryable`]: try again after the step's backoff (or after
//!   [`StepError::retry_after`], when the handler knows better, e.g. from `Retry-After`);
//! - [`StepError::permanent`]: stop; the step goes to `error`;
//! - [`StepError::defer`]: "not now" (rate limited, resource busy): run again after the
//!   given delay **without spending an attempt**, up to the step's `max_deferrals`.
//!
//! A handler that panics, or outlives the step's `timeout_ms`, is a retryable failure;
//! the worker survives both.
//!
//! ```
//! use serde_json::{Value, json};
//! use tasker_worker::{HandlerRegistry, StepContext, StepError, StepHandler};
//!
//! /// Charges the order's total; the payment provider's 4xx answers are final.
//! struct ChargeCard;
//!
//! #[async_trait::async_trait]
//! impl StepHandler for ChargeCard {
//!     async fn call(&self, step: &StepContext) -> Result<Value, StepError> {
//!         let total = step.context["total"]
//!             .as_f64()
//!             .ok_or_else(|| StepError::permanent("context.total is missing").with_code("bad_context"))?;
//!         Ok(json!({"charged": total, "attempt": step.attempt}))
//!     }
//! }
//!
//! let registry = HandlerRegistry::with_builtins().register("payments.charge_card", ChargeCard);
//! assert!(registry.get("payments.charge_card").is_some());
//! assert!(registry.get("tasker.echo").is_some());
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

/// Everything a handler may know about the step it runs.
#[derive(Debug, Clone)]
pub struct StepContext {
    /// The task.
    pub task_id: Uuid,
    /// The step.
    pub step_id: Uuid,
    /// The step's name in its template.
    pub step_name: String,
    /// The task's namespace.
    pub namespace: String,
    /// `name@version` of the template.
    pub template: String,
    /// The handler's name (one handler may serve several names).
    pub handler: String,
    /// The step's configuration from the template.
    pub config: Value,
    /// The task's context.
    pub context: Value,
    /// The results of the step's parents, by parent step name.
    pub parents: BTreeMap<String, Value>,
    /// This attempt's number, starting at 1.
    pub attempt: i32,
    /// The maximum number of attempts.
    pub retry_limit: i32,
    /// How many times the step was deferred before this run.
    pub deferrals: i32,
    /// How long this attempt may run.
    pub timeout: Duration,
    /// An instance of a `for_each` step: its element of the list.
    pub item: Option<Value>,
    /// An instance of a `for_each` step: its element's index in the list, from 0.
    pub index: Option<i32>,
}

/// A failed attempt, and what should happen next.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StepError {
    /// Trying again may help.
    #[error("{message}")]
    Retryable {
        /// What went wrong.
        message: String,
        /// A machine-readable code.
        code: Option<String>,
        /// When to try again, if the handler knows (capped by the step's maximum backoff).
        retry_after: Option<Duration>,
    },
    /// Trying again would not help.
    #[error("{message}")]
    Permanent {
        /// What went wrong.
        message: String,
        /// A machine-readable code.
        code: Option<String>,
    },
    /// Not now: run again after `after`, without spending an attempt.
    #[error("deferred for {after:?}: {message}")]
    Deferred {
        /// Why (rate limited, resource busy…).
        message: String,
        /// How long to wait.
        after: Duration,
    },
}

impl StepError {
    /// A failure worth retrying.
    pub fn retryable(message: impl Into<String>) -> Self {
        StepError::Retryable {
            message: message.into(),
            code: None,
            retry_after: None,
        }
    }

    /// A failure that retrying would not fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        StepError::Permanent {
            message: message.into(),
            code: None,
        }
    }

    /// "Not now, try again after `after`": spends no attempt (bounded by the step's
    /// `max_deferrals`).
    pub fn defer(message: impl Into<String>, after: Duration) -> Self {
        StepError::Deferred {
            message: message.into(),
            after,
        }
    }

    /// Attach a machine-readable code (ignored on a deferral).
    pub fn with_code(mut self, new_code: impl Into<String>) -> Self {
        match &mut self {
            StepError::Retryable { code, .. } | StepError::Permanent { code, .. } => {
                *code = Some(new_code.into());
            }
            StepError::Deferred { .. } => {}
        }
        self
    }

    /// Ask for the next attempt after `delay` (only meaningful for retryable errors).
    pub fn retry_after(mut self, delay: Duration) -> Self {
        if let StepError::Retryable { retry_after, .. } = &mut self {
            *retry_after = Some(delay);
        }
        self
    }
}

/// A step handler. Implementations must be cheap to share: one instance serves every
/// step with its name, concurrently.
#[async_trait::async_trait]
pub trait StepHandler: Send + Sync + 'static {
    /// Run one attempt of one step.
    async fn call(&self, step: &StepContext) -> Result<Value, StepError>;
}

/// Handlers by name.
#[derive(Clone, Default)]
pub struct HandlerRegistry {
    handlers: HashMap<String, Arc<dyn StepHandler>>,
}

impl HandlerRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry with the built-in handlers (`tasker.noop`, `tasker.sleep`, `tasker.echo`,
    /// `tasker.fail`, `tasker.http`).
    pub fn with_builtins() -> Self {
        crate::handlers::register_builtins(Self::new())
    }

    /// Add (or replace) the handler for `name`.
    pub fn register(mut self, name: impl Into<String>, handler: impl StepHandler) -> Self {
        self.handlers.insert(name.into(), Arc::new(handler));
        self
    }

    /// The handler for `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn StepHandler>> {
        self.handlers.get(name).cloned()
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}
