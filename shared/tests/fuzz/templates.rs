//! The template parser: never a panic on anything, and generated valid DAGs (project and
//! tasker-engine format, as YAML and as JSON) parse to what they describe and round-trip.

use std::collections::{BTreeMap, HashMap, HashSet};

use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Value, json};
use tasker_shared::template::{
    Backoff, ConcurrencyLimit, DEFAULT_MAX_DEFERRALS, DEFAULT_RETRY_LIMIT, DEFAULT_TIMEOUT_MS,
    DEFAULT_VERSION, MAX_DOCUMENT_VALUES, OnLimit, RateLimit, StepDefinition, TaskConcurrency,
    TemplateDefinition, TemplateLimits, codes, parse_template, parse_template_with_limits,
    template_from_value, template_keys,
};

use crate::strategies::{any_string, json_value, mutate, mutations, syntax_soup};

const REGRESSIONS: &str = "proptest-regressions/fuzz-templates.txt";
const ENVIRONMENTS: [&str; 4] = ["development", "production", "test", ""];

/// Render as YAML with the same library the parser reads YAML with.
fn yaml(value: &Value) -> Option<String> {
    yaml_serde::to_string(value).ok()
}

/// Parse `value` as a value, as JSON text and as YAML text; none may panic. Every
/// definition that comes out must round-trip through its stored JSON form.
fn parse_every_way(value: &Value) {
    for environment in ENVIRONMENTS {
        if let Ok(definition) = template_from_value(value, environment) {
            assert_round_trips(&definition);
        }
    }
    let json = serde_json::to_string(value).expect("a Value serialises");
    if let Ok(definition) = parse_template(&json, "development") {
        assert_round_trips(&definition);
    }
    if let Some(text) = yaml(value)
        && let Ok(definition) = parse_template(&text, "development")
    {
        assert_round_trips(&definition);
    }
}

/// A definition reads back through the parser unchanged (the coordinator stores it as
/// JSON and serves it), and through serde.
fn assert_round_trips(definition: &TemplateDefinition) {
    let stored = serde_json::to_value(definition).expect("a definition serialises");
    let reparsed = template_from_value(&stored, "development").unwrap_or_else(|error| {
        panic!(
            "the stored form of a valid definition is refused: {:?}\n{stored:#}",
            error.problems()
        )
    });
    assert_eq!(&reparsed, definition, "parser round trip");
    let decoded: TemplateDefinition =
        serde_json::from_value(stored).expect("the stored form decodes");
    assert_eq!(&decoded, definition, "serde round trip");
}

/// Objects with the keys of a template and values of any shape.
fn template_shaped() -> impl Strategy<Value = Value> {
    // The parsers' own key lists, hint keys included.
    let keys = template_keys();
    let value = prop_oneof![
        3 => json_value(),
        1 => "[a-z][a-z0-9_]{0,6}".prop_map(Value::String),
        1 => vec("[a-z][a-z0-9_]{0,3}", 0..4).prop_map(|names| json!(names)),
        1 => btree_map(select(keys.step.clone()), json_value(), 0..4)
            .prop_map(|map| Value::Object(map.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
    ];
    let step = btree_map(select(keys.step), value.clone(), 0..10)
        .prop_map(|map| Value::Object(map.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()));
    let steps = vec(prop_oneof![5 => step, 1 => json_value()], 0..6);
    (
        btree_map(select(keys.top), value, 0..8),
        steps,
        any::<bool>(),
    )
        .prop_map(|(top, steps, legacy)| {
            let mut object: Map<String, Value> =
                top.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            let key = if legacy { "step_templates" } else { "steps" };
            object.insert(key.to_owned(), Value::Array(steps));
            Value::Object(object)
        })
}

/// The templates of the corpus that are valid, as JSON values: seeds for mutations.
fn valid_corpus_templates() -> Vec<Value> {
    crate::corpus::files("templates")
        .into_iter()
        .filter(|(name, _)| crate::corpus::expect_valid(name))
        .map(|(name, bytes)| {
            let text = String::from_utf8(bytes).expect("corpus templates are UTF-8");
            let value: Value = yaml_serde::from_str(&text)
                .unwrap_or_else(|error| panic!("corpus template {name}: {error}"));
            value
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Generated valid templates
// ---------------------------------------------------------------------------------------

/// A backoff as written in a template (milliseconds here, seconds in the document).
#[derive(Debug, Clone)]
enum GenBackoff {
    Exponential {
        base_ms: Option<i64>,
        max_ms: Option<i64>,
        jitter: Option<bool>,
    },
    Schedule {
        delays_ms: Vec<i64>,
        max_ms: Option<i64>,
    },
}

impl GenBackoff {
    /// What the parser makes of it, starting from `inherited`.
    fn resolve(&self, inherited: &Backoff) -> Backoff {
        match self {
            GenBackoff::Exponential {
                base_ms,
                max_ms,
                jitter,
            } => Backoff {
                base_ms: base_ms.unwrap_or(inherited.base_ms),
                max_ms: max_ms.unwrap_or(inherited.max_ms),
                jitter: jitter.unwrap_or(inherited.jitter),
                schedule_ms: None,
            },
            GenBackoff::Schedule { delays_ms, max_ms } => Backoff {
                base_ms: Backoff::default().base_ms,
                max_ms: max_ms
                    .unwrap_or_else(|| delays_ms.iter().copied().max().unwrap_or(0).max(1)),
                jitter: false,
                schedule_ms: Some(delays_ms.clone()),
            },
        }
    }

    /// Make the exponential policy valid (`max >= base`) on top of `inherited`.
    fn normalise(&mut self, inherited: &Backoff) {
        let resolved = self.resolve(inherited);
        if let GenBackoff::Exponential { max_ms, .. } = self
            && resolved.max_ms < resolved.base_ms
        {
            *max_ms = Some(resolved.base_ms);
        }
    }

    fn render(&self) -> Value {
        let seconds = |ms: i64| json!(ms as f64 / 1000.0);
        let mut object = Map::new();
        match self {
            GenBackoff::Exponential {
                base_ms,
                max_ms,
                jitter,
            } => {
                if let Some(ms) = base_ms {
                    object.insert("base_seconds".into(), seconds(*ms));
                }
                if let Some(ms) = max_ms {
                    object.insert("max_seconds".into(), seconds(*ms));
                }
                if let Some(jitter) = jitter {
                    object.insert("jitter".into(), json!(jitter));
                }
            }
            GenBackoff::Schedule { delays_ms, max_ms } => {
                object.insert(
                    "schedule".into(),
                    Value::Array(delays_ms.iter().map(|ms| seconds(*ms)).collect()),
                );
                if let Some(ms) = max_ms {
                    object.insert("max_seconds".into(), seconds(*ms));
                }
            }
        }
        Value::Object(object)
    }
}

fn backoff() -> impl Strategy<Value = GenBackoff> {
    let ms = 1_i64..=86_400_000;
    prop_oneof![
        (
            option::of(ms.clone()),
            option::of(ms.clone()),
            option::of(any::<bool>())
        )
            .prop_map(|(base_ms, max_ms, jitter)| GenBackoff::Exponential {
                base_ms,
                max_ms,
                jitter
            }),
        (vec(0_i64..=86_400_000, 1..5), option::of(ms))
            .prop_map(|(delays_ms, max_ms)| { GenBackoff::Schedule { delays_ms, max_ms } }),
    ]
}

/// JSON whose every value survives a trip through JSON and YAML text exactly.
fn exact_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        // Binary fractions print and read back exactly.
        any::<i32>().prop_map(|n| json!(f64::from(n) / 8.0)),
        any_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            // `<<` is YAML's merge key: not a key a config can use in YAML.
            btree_map(
                any_string().prop_filter("merge key", |k| k != "<<"),
                inner,
                0..5
            )
            .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// A handler name, dependent system or class name: printable, not blank.
fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[A-Za-z][A-Za-z0-9_.:]{0,30}",
        1 => "\\PC{1,40}".prop_filter("not blank", |s| !s.trim().is_empty()),
    ]
}

fn identifier(max_extra: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-zA-Z0-9][a-zA-Z0-9_.-]{{0,{max_extra}}}"))
        .expect("a valid regex")
}

fn version() -> impl Strategy<Value = String> {
    (
        0_u64..100,
        0_u64..100,
        0_u64..1000,
        option::of("[a-z][a-z0-9]{0,5}"),
    )
        .prop_map(|(major, minor, patch, pre)| match pre {
            Some(pre) => format!("{major}.{minor}.{patch}-{pre}"),
            None => format!("{major}.{minor}.{patch}"),
        })
}

/// Valid context schemas.
fn context_schema() -> impl Strategy<Value = Value> {
    select(vec![
        json!({"type": "object"}),
        json!({"type": "object", "required": ["order_id"], "properties": {"order_id": {"type": "integer"}}}),
        json!({"type": "object", "properties": {"email": {"type": "string", "format": "email"}}}),
        json!({"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "additionalProperties": false}),
        json!({"$defs": {"id": {"type": "string", "pattern": "^[a-z]+$"}}, "properties": {"id": {"$ref": "#/$defs/id"}}}),
    ])
}

#[derive(Debug, Clone)]
struct GenStep {
    stem: String,
    handler: String,
    /// Raw picks: dependency `k` of step `i` is step `k % i` (so the graph is a DAG).
    deps: Vec<usize>,
    description: Option<String>,
    retryable: Option<bool>,
    retry_limit: Option<i32>,
    timeout_ms: Option<i64>,
    config: Option<Value>,
    skippable: Option<bool>,
    dependent_system: Option<String>,
    backoff: Option<GenBackoff>,
    max_deferrals: Option<i32>,
    concurrency: Option<ConcurrencyLimit>,
    rate_limit: Option<RateLimit>,
    /// tasker-engine format: write the first dependency as `depends_on_step`.
    single_dep_key: bool,
}

/// Keys that compile: the generator writes limits that must parse back unchanged.
const KEYS: &[&str] = &[
    "context.customer_id",
    "'partner-api'",
    "task.name + ':' + string(task.priority)",
    "context.region == 'eu'",
];

fn concurrency() -> impl Strategy<Value = ConcurrencyLimit> {
    (select(KEYS), 1_i32..=10_000).prop_map(|(key, limit)| ConcurrencyLimit {
        key: key.to_owned(),
        limit,
    })
}

fn task_concurrency() -> impl Strategy<Value = TaskConcurrency> {
    (
        select(KEYS),
        1_i32..=10_000,
        select(&[OnLimit::Queue, OnLimit::CancelNewest, OnLimit::CancelOldest][..]),
    )
        .prop_map(|(key, limit, on_limit)| TaskConcurrency {
            key: key.to_owned(),
            limit,
            on_limit,
        })
}

fn rate_limit() -> impl Strategy<Value = RateLimit> {
    (
        select(KEYS),
        1_i32..=10_000,
        select(&["1s", "10s", "1m", "1h", "24h"][..]),
    )
        .prop_map(|(key, limit, per)| RateLimit {
            key: key.to_owned(),
            limit,
            per: per.to_owned(),
        })
}

fn step() -> impl Strategy<Value = GenStep> {
    (
        (identifier(12), label(), vec(any::<usize>(), 0..4)),
        (
            option::of(any_string()),
            option::of(any::<bool>()),
            option::of(1_i32..=100),
            option::of(1_i64..=86_400_000),
        ),
        (
            option::of(exact_json()),
            option::of(any::<bool>()),
            option::of(label()),
            option::of(backoff()),
            option::of(0_i32..=10_000),
            any::<bool>(),
        ),
        (option::of(concurrency()), option::of(rate_limit())),
    )
        .prop_map(
            |(
                (stem, handler, deps),
                (description, retryable, retry_limit, timeout_ms),
                (config, skippable, dependent_system, backoff, max_deferrals, single_dep_key),
                (concurrency, rate_limit),
            )| GenStep {
                stem,
                handler,
                deps,
                description,
                retryable,
                retry_limit,
                timeout_ms,
                config,
                skippable,
                dependent_system,
                backoff,
                max_deferrals,
                concurrency,
                rate_limit,
                single_dep_key,
            },
        )
}

#[derive(Debug, Clone, Default)]
struct GenDefaults {
    retryable: Option<bool>,
    retry_limit: Option<i32>,
    timeout_ms: Option<i64>,
    backoff: Option<GenBackoff>,
    max_deferrals: Option<i32>,
}

fn defaults() -> impl Strategy<Value = GenDefaults> {
    (
        option::of(any::<bool>()),
        option::of(1_i32..=100),
        option::of(1_i64..=86_400_000),
        option::of(backoff()),
        option::of(0_i32..=10_000),
    )
        .prop_map(
            |(retryable, retry_limit, timeout_ms, backoff, max_deferrals)| GenDefaults {
                retryable,
                retry_limit,
                timeout_ms,
                backoff,
                max_deferrals,
            },
        )
}

#[derive(Debug, Clone)]
struct GenTemplate {
    namespace: String,
    name: String,
    version: Option<String>,
    description: Option<String>,
    context_schema: Option<Value>,
    /// Project format only (tasker-engine files have none: their tasks get 5).
    priority: Option<i16>,
    /// Project format only: the template's own concurrency limits.
    concurrency: Vec<TaskConcurrency>,
    defaults: Option<GenDefaults>,
    steps: Vec<GenStep>,
    /// tasker-engine format only.
    task_handler_class: String,
    default_dependent_system: Option<String>,
    /// tasker-engine format only: `(environment, [(step index, handler_config)])`.
    environment: Option<(String, Vec<(usize, Value)>)>,
}

fn template() -> impl Strategy<Value = GenTemplate> {
    (
        (identifier(20), identifier(30), option::of(version())),
        (
            option::of(any_string()),
            option::of(context_schema()),
            option::of(defaults()),
            option::of(0..=9i16),
            vec(task_concurrency(), 0..3),
        ),
        vec(step(), 1..16),
        (
            label(),
            option::of(label()),
            option::of((
                select(vec!["development", "production"]).prop_map(str::to_owned),
                vec((any::<usize>(), exact_json()), 0..4),
            )),
        ),
    )
        .prop_map(
            |(
                (namespace, name, version),
                (description, context_schema, defaults, priority, concurrency),
                steps,
                (task_handler_class, default_dependent_system, environment),
            )| {
                let mut template = GenTemplate {
                    namespace,
                    name,
                    version,
                    description,
                    context_schema,
                    priority,
                    concurrency,
                    defaults,
                    steps,
                    task_handler_class,
                    default_dependent_system,
                    environment,
                };
                template.normalise();
                template
            },
        )
}

impl GenTemplate {
    fn step_name(&self, index: usize) -> String {
        format!("{}_{index}", self.steps[index].stem)
    }

    /// The dependencies of step `index`, as written (repeats included).
    fn deps(&self, index: usize) -> Vec<String> {
        if index == 0 {
            return Vec::new();
        }
        self.steps[index]
            .deps
            .iter()
            .map(|pick| self.step_name(pick % index))
            .collect()
    }

    fn inherited_backoff(&self) -> Backoff {
        self.defaults
            .as_ref()
            .and_then(|d| d.backoff.as_ref())
            .map_or_else(Backoff::default, |b| b.resolve(&Backoff::default()))
    }

    /// Make every backoff valid in the project format.
    fn normalise(&mut self) {
        if let Some(backoff) = self.defaults.as_mut().and_then(|d| d.backoff.as_mut()) {
            backoff.normalise(&Backoff::default());
        }
        let inherited = self.inherited_backoff();
        for step in &mut self.steps {
            if let Some(backoff) = &mut step.backoff {
                backoff.normalise(&inherited);
            }
        }
        if let Some((_, overrides)) = &mut self.environment {
            let count = self.steps.len();
            for (index, _) in overrides.iter_mut() {
                *index %= count;
            }
        }
    }

    fn project_document(&self) -> Value {
        let mut root = Map::new();
        root.insert("namespace".into(), json!(self.namespace));
        root.insert("name".into(), json!(self.name));
        if let Some(version) = &self.version {
            root.insert("version".into(), json!(version));
        }
        if let Some(description) = &self.description {
            root.insert("description".into(), json!(description));
        }
        if let Some(schema) = &self.context_schema {
            root.insert("context_schema".into(), schema.clone());
        }
        if let Some(priority) = self.priority {
            root.insert("priority".into(), json!(priority));
        }
        if !self.concurrency.is_empty() {
            root.insert("concurrency".into(), json!(self.concurrency));
        }
        if let Some(defaults) = &self.defaults {
            let mut object = Map::new();
            insert_opt(&mut object, "retryable", defaults.retryable);
            insert_opt(&mut object, "retry_limit", defaults.retry_limit);
            insert_opt(&mut object, "timeout_ms", defaults.timeout_ms);
            insert_opt(&mut object, "max_deferrals", defaults.max_deferrals);
            if let Some(backoff) = &defaults.backoff {
                object.insert("backoff".into(), backoff.render());
            }
            root.insert("defaults".into(), Value::Object(object));
        }
        let steps = (0..self.steps.len())
            .map(|i| {
                let step = &self.steps[i];
                let mut object = Map::new();
                object.insert("name".into(), json!(self.step_name(i)));
                object.insert("handler".into(), json!(step.handler));
                let deps = self.deps(i);
                if !deps.is_empty() {
                    object.insert("depends_on".into(), json!(deps));
                }
                insert_opt(&mut object, "description", step.description.clone());
                insert_opt(&mut object, "retryable", step.retryable);
                insert_opt(&mut object, "retry_limit", step.retry_limit);
                insert_opt(&mut object, "timeout_ms", step.timeout_ms);
                insert_opt(&mut object, "config", step.config.clone());
                insert_opt(&mut object, "skippable", step.skippable);
                insert_opt(
                    &mut object,
                    "dependent_system",
                    step.dependent_system.clone(),
                );
                insert_opt(&mut object, "max_deferrals", step.max_deferrals);
                if let Some(backoff) = &step.backoff {
                    object.insert("backoff".into(), backoff.render());
                }
                insert_opt(&mut object, "concurrency", step.concurrency.clone());
                insert_opt(&mut object, "rate_limit", step.rate_limit.clone());
                Value::Object(object)
            })
            .collect();
        root.insert("steps".into(), Value::Array(steps));
        Value::Object(root)
    }

    fn project_definition(&self) -> TemplateDefinition {
        let defaults = self.defaults.clone().unwrap_or_default();
        let inherited = self.inherited_backoff();
        TemplateDefinition {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            version: self
                .version
                .clone()
                .unwrap_or_else(|| DEFAULT_VERSION.to_owned()),
            description: self.description.clone(),
            context_schema: self.context_schema.clone(),
            priority: self.priority.unwrap_or(5),
            concurrency: self.concurrency.clone(),
            timeout: None,
            schedules: Vec::new(),
            steps: (0..self.steps.len())
                .map(|i| {
                    let step = &self.steps[i];
                    StepDefinition {
                        name: self.step_name(i),
                        handler: step.handler.clone(),
                        description: step.description.clone(),
                        depends_on: dedup(self.deps(i)),
                        retryable: step.retryable.or(defaults.retryable).unwrap_or(true),
                        retry_limit: step
                            .retry_limit
                            .or(defaults.retry_limit)
                            .unwrap_or(DEFAULT_RETRY_LIMIT),
                        timeout_ms: step
                            .timeout_ms
                            .or(defaults.timeout_ms)
                            .unwrap_or(DEFAULT_TIMEOUT_MS),
                        config: config_or_empty(step.config.as_ref()),
                        skippable: step.skippable.unwrap_or(false),
                        dependent_system: step.dependent_system.clone(),
                        backoff: step
                            .backoff
                            .as_ref()
                            .map_or_else(|| inherited.clone(), |b| b.resolve(&inherited)),
                        max_deferrals: step
                            .max_deferrals
                            .or(defaults.max_deferrals)
                            .unwrap_or(DEFAULT_MAX_DEFERRALS),
                        concurrency: step.concurrency.clone(),
                        rate_limit: step.rate_limit.clone(),
                        when: None,
                        for_each: None,
                        max_parallel: None,
                        trigger: Default::default(),
                    }
                })
                .collect(),
        }
    }

    fn legacy_document(&self) -> Value {
        let mut root = Map::new();
        root.insert("name".into(), json!(self.name));
        root.insert("task_handler_class".into(), json!(self.task_handler_class));
        if self.namespace != "default" {
            root.insert("namespace_name".into(), json!(self.namespace));
        }
        if let Some(version) = &self.version {
            root.insert("version".into(), json!(version));
        }
        insert_opt(&mut root, "description", self.description.clone());
        if let Some(schema) = &self.context_schema {
            root.insert("schema".into(), schema.clone());
        }
        insert_opt(
            &mut root,
            "default_dependent_system",
            self.default_dependent_system.clone(),
        );
        let names: Vec<String> = (0..self.steps.len()).map(|i| self.step_name(i)).collect();
        root.insert("named_steps".into(), json!(names));
        let steps = (0..self.steps.len())
            .map(|i| {
                let step = &self.steps[i];
                let mut object = Map::new();
                object.insert("name".into(), json!(self.step_name(i)));
                object.insert("handler_class".into(), json!(step.handler));
                let deps = self.deps(i);
                match deps.split_first() {
                    Some((first, rest)) if step.single_dep_key => {
                        object.insert("depends_on_step".into(), json!(first));
                        if !rest.is_empty() {
                            object.insert("depends_on_steps".into(), json!(rest));
                        }
                    }
                    Some(_) => {
                        object.insert("depends_on_steps".into(), json!(deps));
                    }
                    None => {}
                }
                insert_opt(&mut object, "description", step.description.clone());
                insert_opt(&mut object, "default_retryable", step.retryable);
                insert_opt(&mut object, "default_retry_limit", step.retry_limit);
                insert_opt(&mut object, "handler_config", step.config.clone());
                insert_opt(&mut object, "skippable", step.skippable);
                insert_opt(
                    &mut object,
                    "dependent_system",
                    step.dependent_system.clone(),
                );
                Value::Object(object)
            })
            .collect();
        root.insert("step_templates".into(), Value::Array(steps));
        if let Some((environment, overrides)) = &self.environment {
            let entries: Vec<Value> = overrides
                .iter()
                .map(|(index, config)| json!({"name": self.step_name(*index), "handler_config": config}))
                .collect();
            root.insert(
                "environments".into(),
                json!({ environment.as_str(): {"step_templates": entries} }),
            );
        }
        Value::Object(root)
    }

    /// The definition of the tasker-engine document, read for `development`.
    fn legacy_definition(&self) -> TemplateDefinition {
        let mut configs: Vec<Value> = self
            .steps
            .iter()
            .map(|step| config_or_empty(step.config.as_ref()))
            .collect();
        if let Some((environment, overrides)) = &self.environment
            && environment == "development"
        {
            for (index, config) in overrides {
                if !config.is_null() {
                    deep_merge(&mut configs[*index], config);
                }
            }
        }
        TemplateDefinition {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            version: self
                .version
                .clone()
                .unwrap_or_else(|| DEFAULT_VERSION.to_owned()),
            description: self.description.clone(),
            context_schema: self.context_schema.clone(),
            priority: 5,
            concurrency: Vec::new(),
            timeout: None,
            schedules: Vec::new(),
            steps: (0..self.steps.len())
                .map(|i| {
                    let step = &self.steps[i];
                    StepDefinition {
                        name: self.step_name(i),
                        handler: step.handler.clone(),
                        description: step.description.clone(),
                        depends_on: dedup(self.deps(i)),
                        retryable: step.retryable.unwrap_or(true),
                        retry_limit: step.retry_limit.unwrap_or(DEFAULT_RETRY_LIMIT),
                        timeout_ms: DEFAULT_TIMEOUT_MS,
                        config: configs[i].clone(),
                        skippable: step.skippable.unwrap_or(false),
                        dependent_system: step
                            .dependent_system
                            .clone()
                            .or_else(|| self.default_dependent_system.clone()),
                        backoff: Backoff::default(),
                        max_deferrals: DEFAULT_MAX_DEFERRALS,
                        concurrency: None,
                        rate_limit: None,
                        when: None,
                        for_each: None,
                        max_parallel: None,
                        trigger: Default::default(),
                    }
                })
                .collect(),
        }
    }
}

fn insert_opt<T: serde::Serialize>(object: &mut Map<String, Value>, key: &str, value: Option<T>) {
    if let Some(value) = value {
        object.insert(
            key.to_owned(),
            serde_json::to_value(value).expect("serialisable"),
        );
    }
}

/// `null` or absent configuration is `{}`.
fn config_or_empty(config: Option<&Value>) -> Value {
    match config {
        None | Some(Value::Null) => json!({}),
        Some(config) => config.clone(),
    }
}

fn dedup(names: Vec<String>) -> Vec<String> {
    let mut seen = HashSet::new();
    names
        .into_iter()
        .filter(|name| seen.insert(name.clone()))
        .collect()
}

/// tasker-engine's merge of environment overrides, restated.
fn deep_merge(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(key) {
                    Some(existing) => deep_merge(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, overlay) => *base = overlay.clone(),
    }
}

/// Parse `document` as a value, as JSON and as YAML; each must give `expected`.
fn assert_parses_to(document: &Value, expected: &TemplateDefinition) {
    let from_value = template_from_value(document, "development")
        .unwrap_or_else(|error| panic!("refused: {:?}\n{document:#}", error.problems()));
    assert_eq!(&from_value, expected, "from the value");
    let json = serde_json::to_string_pretty(document).expect("serialises");
    let from_json = parse_template(&json, "development")
        .unwrap_or_else(|error| panic!("JSON refused: {:?}\n{json}", error.problems()));
    assert_eq!(&from_json, expected, "from JSON text");
    let text = yaml(document).expect("a Value renders as YAML");
    let from_yaml = parse_template(&text, "development")
        .unwrap_or_else(|error| panic!("YAML refused: {:?}\n{text}", error.problems()));
    assert_eq!(&from_yaml, expected, "from YAML text:\n{text}");
    assert_round_trips(expected);
    assert_topological(expected);
}

/// Every step once, each after all of its dependencies.
fn assert_topological(definition: &TemplateDefinition) {
    let order = definition.topological_order();
    assert_eq!(order.len(), definition.steps.len());
    let position: HashMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, step)| (step.name.as_str(), i))
        .collect();
    assert_eq!(position.len(), definition.steps.len(), "every step once");
    for step in &definition.steps {
        for dep in &step.depends_on {
            assert!(position[dep.as_str()] < position[step.name.as_str()]);
        }
    }
}

proptest! {
    #![proptest_config(crate::config(128, REGRESSIONS))]

    #[test]
    fn any_text_is_refused_or_parsed_without_panicking(
        text in prop_oneof![any::<String>(), syntax_soup()],
        environment in select(ENVIRONMENTS.to_vec()),
    ) {
        if let Ok(definition) = parse_template(&text, environment) {
            assert_round_trips(&definition);
        }
    }

    #[test]
    fn any_bytes_are_refused_or_parsed_without_panicking(
        bytes in vec(any::<u8>(), 0..512),
    ) {
        let _ = parse_template(&String::from_utf8_lossy(&bytes), "development");
    }

    #[test]
    fn json_trees_of_any_shape_never_panic(value in json_value()) {
        parse_every_way(&value);
    }

    #[test]
    fn template_shaped_objects_with_wrong_values_never_panic(value in template_shaped()) {
        parse_every_way(&value);
    }

    #[test]
    fn mutated_corpus_templates_never_panic(
        seed in select(valid_corpus_templates()),
        mutations in mutations(),
    ) {
        let mut value = seed;
        mutate(&mut value, &mutations);
        parse_every_way(&value);
    }

    #[test]
    fn mutated_generated_templates_never_panic(
        template in template(),
        legacy in any::<bool>(),
        mutations in mutations(),
    ) {
        let mut value = if legacy { template.legacy_document() } else { template.project_document() };
        mutate(&mut value, &mutations);
        parse_every_way(&value);
    }

    #[test]
    fn generated_project_dags_parse_and_round_trip(template in template()) {
        assert_parses_to(&template.project_document(), &template.project_definition());
    }

    #[test]
    fn generated_tasker_engine_dags_parse_and_round_trip(template in template()) {
        assert_parses_to(&template.legacy_document(), &template.legacy_definition());
    }

    #[test]
    fn a_back_edge_is_reported_as_a_cycle(
        template in template().prop_filter("a step with a dependency", |t| {
            (1..t.steps.len()).any(|i| !t.steps[i].deps.is_empty())
        }),
        pick in any::<usize>(),
    ) {
        let with_deps: Vec<usize> =
            (1..template.steps.len()).filter(|&i| !template.steps[i].deps.is_empty()).collect();
        let child = with_deps[pick % with_deps.len()];
        let parent = template.deps(child)[0].clone();
        let child_name = template.step_name(child);
        let mut document = template.project_document();
        let steps = document["steps"].as_array_mut().expect("steps");
        let parent_step = steps
            .iter_mut()
            .find(|step| step["name"] == parent.as_str())
            .expect("the parent step");
        match parent_step.get_mut("depends_on").and_then(Value::as_array_mut) {
            Some(deps) => deps.push(json!(child_name)),
            None => {
                parent_step["depends_on"] = json!([child_name]);
            }
        }
        let error = template_from_value(&document, "development")
            .expect_err("a cycle is refused");
        let problem_codes: BTreeMap<&str, usize> =
            error.problems().iter().fold(BTreeMap::new(), |mut counts, problem| {
                *counts.entry(problem.code.as_str()).or_default() += 1;
                counts
            });
        prop_assert!(problem_codes.contains_key(codes::CYCLE), "{:?}", error.problems());
        prop_assert_eq!(problem_codes.len(), 1, "only cycles: {:?}", error.problems());
    }
}

/// A template whose one step's config nests anchors and aliases: `l0` is a list of
/// `fanouts[0]` strings, and each `l{i}` a list of `fanouts[i]` aliases of `l{i-1}`.
/// Returns the text and how many values the whole document expands to.
fn alias_tower(fanouts: &[usize]) -> (String, usize) {
    let mut config = Vec::new();
    // The root mapping, namespace, name, the step list, the step, its name and handler,
    // and the config mapping.
    let mut values = 8;
    let mut level = 0;
    for (i, &n) in fanouts.iter().enumerate() {
        let items = if i == 0 {
            vec!["x".to_owned(); n]
        } else {
            vec![format!("*l{}", i - 1); n]
        };
        config.push(format!("l{i}: &l{i} [{}]", items.join(", ")));
        level = 1 + n * if i == 0 { 1 } else { level };
        values += level;
    }
    let text = format!(
        "namespace: n\nname: t\nsteps:\n  - {{name: a, handler: H, config: {{{}}}}}\n",
        config.join(", ")
    );
    (text, values)
}

/// Values in a JSON tree, the way the parser counts them (keys not counted).
fn count_values(value: &Value) -> usize {
    1 + match value {
        Value::Array(items) => items.iter().map(count_values).sum(),
        Value::Object(map) => map.values().map(count_values).sum(),
        _ => 0,
    }
}

proptest! {
    #![proptest_config(crate::config(32, REGRESSIONS))]

    /// However far aliases multiply, the parser stops at the expansion limit while it
    /// reads (no allocation of the full expansion), and below it expands them exactly.
    #[test]
    fn yaml_aliases_expand_exactly_or_stop_at_the_value_limit(
        fanouts in vec(1..300_usize, 1..6),
    ) {
        let (text, values) = alias_tower(&fanouts);
        let unlimited = TemplateLimits { max_config_bytes: usize::MAX, ..TemplateLimits::default() };
        match parse_template_with_limits(&text, "development", unlimited) {
            Ok(definition) => {
                prop_assert!(values <= MAX_DOCUMENT_VALUES, "{values} values parsed");
                let config = &definition.steps[0].config;
                prop_assert_eq!(count_values(config) + 7, values);
            }
            Err(error) => {
                prop_assert_eq!(error.0.len(), 1);
                prop_assert_eq!(error.0[0].code.as_str(), codes::SYNTAX);
                let message = &error.0[0].message;
                // Past our limit, or past the YAML library's own: it follows aliases at
                // most 100 times per event of the document, so a short document that
                // multiplies far is refused before our count is reached.
                prop_assert!(
                    (values > MAX_DOCUMENT_VALUES && message.contains("values"))
                        || message.contains("repetition limit exceeded"),
                    "{values} values refused: {message}"
                );
            }
        }
    }
}

/// Found by the corpus: YAML flow collections nested thousands deep are scanned in time
/// quadratic in the depth (libyaml, under `yaml_serde`) before the 128-level recursion
/// limit refuses them. In a release build `a: ` followed by 20 000 × `{a: ` (80 KB) took
/// about a second, 80 000 (320 KB) about 40 s. A bracket count before the YAML parser
/// refuses the plain case at once; closing brackets in quoted scalars or comments get
/// past a count that ignores quotes (`{a: "]", b: ` × 40 000 took about 7 s), so the
/// number of flow collections in a document is capped as well. All must be refused
/// quickly.
#[test]
fn deep_yaml_flow_mappings_are_refused_quickly() {
    for text in [
        format!("a: {}", "{a: ".repeat(40_000)),
        format!("a: {}", "{a: \"]\", b: ".repeat(40_000)),
        format!("a: {}", "{a: x, # ]\n b: ".repeat(40_000)),
    ] {
        let started = std::time::Instant::now();
        let outcome = parse_template(&text, "development");
        let elapsed = started.elapsed();
        assert!(outcome.is_err());
        assert!(
            elapsed < std::time::Duration::from_secs(1),
            "a {} KB document took {elapsed:?}: {}…",
            text.len() / 1024,
            &text[..40]
        );
    }
}
