//! The template as read from either format, before the graph checks.

use std::collections::HashSet;

use serde_json::Value;

use super::{
    Backoff, ConcurrencyLimit, RateLimit, StepDefinition, TaskConcurrency, TemplateDefinition,
    Trigger,
};

/// A dependency reference as written in the source.
pub(super) struct Dep {
    pub(super) name: String,
    pub(super) path: String,
}

/// A step as read from the source, before the graph checks.
pub(super) struct StepDraft {
    /// Path of the step itself, e.g. `steps[2]`.
    pub(super) path: String,
    /// Name used for the graph (present even when the name was reported as invalid).
    pub(super) name: Option<String>,
    pub(super) name_path: String,
    pub(super) handler: Option<String>,
    pub(super) description: Option<String>,
    pub(super) deps: Vec<Dep>,
    pub(super) retryable: bool,
    pub(super) retry_limit: i32,
    pub(super) timeout_ms: i64,
    pub(super) config: Value,
    pub(super) skippable: bool,
    pub(super) dependent_system: Option<String>,
    pub(super) backoff: Backoff,
    pub(super) max_deferrals: i32,
    pub(super) concurrency: Option<ConcurrencyLimit>,
    pub(super) rate_limit: Option<RateLimit>,
    pub(super) when: Option<String>,
    pub(super) for_each: Option<String>,
    pub(super) max_parallel: Option<i32>,
    pub(super) trigger: Trigger,
}

/// A template as read from the source, before the graph checks.
pub(super) struct Draft {
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
    pub(super) version: String,
    pub(super) description: Option<String>,
    pub(super) context_schema: Option<Value>,
    pub(super) priority: i16,
    pub(super) concurrency: Vec<TaskConcurrency>,
    pub(super) timeout: Option<String>,
    pub(super) steps: Vec<StepDraft>,
    pub(super) schedules: Vec<super::TemplateSchedule>,
}

impl Draft {
    /// Only called when no problem was found, so every required field is set.
    pub(super) fn into_definition(self) -> TemplateDefinition {
        TemplateDefinition {
            namespace: self.namespace.unwrap_or_default(),
            name: self.name.unwrap_or_default(),
            version: self.version,
            description: self.description,
            context_schema: self.context_schema,
            priority: self.priority,
            timeout: self.timeout,
            concurrency: self.concurrency,
            schedules: self.schedules,
            steps: self
                .steps
                .into_iter()
                .map(|step| StepDefinition {
                    name: step.name.unwrap_or_default(),
                    handler: step.handler.unwrap_or_default(),
                    description: step.description,
                    depends_on: step.deps.into_iter().map(|dep| dep.name).collect(),
                    retryable: step.retryable,
                    retry_limit: step.retry_limit,
                    timeout_ms: step.timeout_ms,
                    config: step.config,
                    skippable: step.skippable,
                    dependent_system: step.dependent_system,
                    backoff: step.backoff,
                    max_deferrals: step.max_deferrals,
                    concurrency: step.concurrency,
                    rate_limit: step.rate_limit,
                    when: step.when,
                    for_each: step.for_each,
                    max_parallel: step.max_parallel,
                    trigger: step.trigger,
                })
                .collect(),
        }
    }
}

/// Removes repeated dependency names, keeping the first occurrence.
pub(super) fn dedup_deps(deps: Vec<Dep>) -> Vec<Dep> {
    let mut seen = HashSet::new();
    deps.into_iter()
        .filter(|dep| seen.insert(dep.name.clone()))
        .collect()
}
