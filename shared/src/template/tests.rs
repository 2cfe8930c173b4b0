use std::collections::HashSet;

use serde_json::{Value, json};

use super::graph::elementary_cycles;
use super::legacy::deep_merge;
use super::schema::schema_problems;
use super::walker::{Walker, identifier_error, item, join};
use super::*;

fn codes_of(error: &TemplateError) -> Vec<&str> {
    error
        .0
        .iter()
        .map(|problem| problem.code.as_str())
        .collect()
}

/// Each problem's path and code, sorted.
fn paths_and_codes(found: &[Problem]) -> Vec<(&str, &str)> {
    let mut at: Vec<(&str, &str)> = found
        .iter()
        .map(|p| (p.path.as_str(), p.code.as_str()))
        .collect();
    at.sort_unstable();
    at
}

fn problems(text: &str) -> Vec<Problem> {
    match parse_template(text, "production") {
        Ok(definition) => panic!("expected problems, got {definition:?}"),
        Err(error) => error.0,
    }
}

const PROJECT_YAML: &str = r#"
namespace: ecommerce
name: order_fulfilment
version: 1.2.3
description: Fulfil a customer order
context_schema:
  type: object
  required: [order_id]
  properties:
    order_id: {type: integer}
defaults:
  retry_limit: 5
  timeout_ms: 60000
steps:
  - name: validate
    handler: Ecommerce::Validate
    description: Check the order
    config:
      strict: true
      limits: [1, 2]
  - name: charge
    handler: payments.charge
    depends_on: [validate]
    retryable: false
    retry_limit: 1
  - name: reserve
    handler: inventory.reserve
    depends_on: [validate]
    timeout_ms: 1000
    skippable: true
    dependent_system: warehouse
  - name: ship
    handler: shipping.ship
    depends_on: [charge, reserve, charge]
"#;

fn expected_project() -> TemplateDefinition {
    let step = |name: &str, handler: &str, deps: &[&str]| StepDefinition {
        name: name.to_owned(),
        handler: handler.to_owned(),
        description: None,
        depends_on: deps.iter().map(|d| (*d).to_owned()).collect(),
        retryable: true,
        retry_limit: 5,
        timeout_ms: 60_000,
        config: json!({}),
        skippable: false,
        dependent_system: None,
        backoff: Backoff::default(),
        max_deferrals: DEFAULT_MAX_DEFERRALS,
        concurrency: None,
        rate_limit: None,
        when: None,
        for_each: None,
        max_parallel: None,
        trigger: Trigger::AllSuccess,
    };
    let mut validate = step("validate", "Ecommerce::Validate", &[]);
    validate.description = Some("Check the order".to_owned());
    validate.config = json!({"strict": true, "limits": [1, 2]});
    let mut charge = step("charge", "payments.charge", &["validate"]);
    charge.retryable = false;
    charge.retry_limit = 1;
    let mut reserve = step("reserve", "inventory.reserve", &["validate"]);
    reserve.timeout_ms = 1000;
    reserve.skippable = true;
    reserve.dependent_system = Some("warehouse".to_owned());
    TemplateDefinition {
        namespace: "ecommerce".to_owned(),
        name: "order_fulfilment".to_owned(),
        version: "1.2.3".to_owned(),
        description: Some("Fulfil a customer order".to_owned()),
        context_schema: Some(json!({
            "type": "object",
            "required": ["order_id"],
            "properties": {"order_id": {"type": "integer"}}
        })),
        priority: 5,
        concurrency: Vec::new(),
        timeout: None,
        schedules: Vec::new(),
        steps: vec![
            validate,
            charge,
            reserve,
            step("ship", "shipping.ship", &["charge", "reserve"]),
        ],
    }
}

#[test]
fn project_yaml_parses_to_expected_definition() {
    let definition = parse_template(PROJECT_YAML, "development").unwrap();
    assert_eq!(definition, expected_project());
}

#[test]
fn project_json_parses_to_same_definition() {
    let json_text = r#"{
	"namespace": "ecommerce",
	"name": "order_fulfilment",
	"version": "1.2.3",
	"description": "Fulfil a customer order",
	"context_schema": {"type": "object", "required": ["order_id"],
		"properties": {"order_id": {"type": "integer"}}},
	"defaults": {"retry_limit": 5, "timeout_ms": 60000},
	"steps": [
		{"name": "validate", "handler": "Ecommerce::Validate", "description": "Check the order",
		 "config": {"strict": true, "limits": [1, 2]}},
		{"name": "charge", "handler": "payments.charge", "depends_on": ["validate"],
		 "retryable": false, "retry_limit": 1},
		{"name": "reserve", "handler": "inventory.reserve", "depends_on": ["validate"],
		 "timeout_ms": 1000, "skippable": true, "dependent_system": "warehouse"},
		{"name": "ship", "handler": "shipping.ship", "depends_on": ["charge", "reserve", "charge"]}
	]
}"#;
    let definition = parse_template(json_text, "development").unwrap();
    assert_eq!(definition, expected_project());
}

#[test]
fn minimal_template_gets_defaults() {
    let definition = parse_template(
        "namespace: ns\nname: t\nsteps:\n  - {name: a, handler: H}\n",
        "",
    )
    .unwrap();
    assert_eq!(definition.version, "0.1.0");
    assert_eq!(definition.description, None);
    assert_eq!(definition.context_schema, None);
    let step = &definition.steps[0];
    assert!(step.retryable);
    assert_eq!(step.retry_limit, 3);
    assert_eq!(step.timeout_ms, 300_000);
    assert_eq!(step.config, json!({}));
    assert!(!step.skippable);
    assert!(step.depends_on.is_empty());
}

#[test]
fn definition_round_trips_through_serde_and_the_parser() {
    let definition = expected_project();
    let stored = serde_json::to_string(&definition).unwrap();
    let back: TemplateDefinition = serde_json::from_str(&stored).unwrap();
    assert_eq!(back, definition);
    // The stored JSON is itself a valid project-format template.
    assert_eq!(parse_template(&stored, "").unwrap(), definition);
}

const ENGINE_YAML: &str = r#"
---
name: process_order
namespace_name: order_processing
version: 1.0.0
module_namespace: OrderProcessing
task_handler_class: OrderProcessing::OrderHandler
concurrent: true
description: Process an order from validation to shipment
default_dependent_system: ecommerce_system
named_steps:
  - validate_order
  - reserve_inventory
  - process_payment
  - send_confirmation
  - ship_order
schema:
  type: object
  required: [order_id, customer]
  properties:
    order_id:
      type: integer
    customer:
      type: object
      required: [email]
      properties:
        email:
          type: string
step_templates:
  - name: validate_order
    description: Validate the order contents
    handler_class: OrderProcessing::StepHandler::ValidateOrder
    handler_config:
      strict: true
  - name: reserve_inventory
    description: Reserve stock
    depends_on_step: validate_order
    handler_class: OrderProcessing::StepHandler::ReserveInventory
    dependent_system: inventory_system
    default_retryable: true
    default_retry_limit: 5
    handler_config:
      type: api
      url: https://inventory.example.com/reserve
      params:
        warehouse: main
        hold_minutes: 30
  - name: process_payment
    description: Charge the customer
    depends_on_step: validate_order
    handler_class: OrderProcessing::StepHandler::ProcessPayment
    default_retryable: false
    default_retry_limit: 1
    custom_events:
      - name: payment.charged
        description: The card was charged
      - name: payment.declined
  - name: send_confirmation
    depends_on_steps: [reserve_inventory, process_payment]
    handler_class: OrderProcessing::StepHandler::SendConfirmation
    skippable: true
  - name: ship_order
    depends_on_step: process_payment
    depends_on_steps:
      - reserve_inventory
      - process_payment
    handler_class: OrderProcessing::StepHandler::ShipOrder
environments:
  development:
    step_templates:
      - name: reserve_inventory
        handler_config:
          url: http://localhost:3000/reserve
          params:
            hold_minutes: 1
            debug: true
  production:
    step_templates:
      - name: process_payment
        handler_config:
          gateway: live
"#;

#[test]
fn tasker_engine_template_maps_to_definition() {
    let definition = parse_template(ENGINE_YAML, "development").unwrap();
    let step = |name: &str, class: &str, deps: &[&str]| StepDefinition {
        name: name.to_owned(),
        handler: format!("OrderProcessing::StepHandler::{class}"),
        description: None,
        depends_on: deps.iter().map(|d| (*d).to_owned()).collect(),
        retryable: true,
        retry_limit: 3,
        timeout_ms: 300_000,
        config: json!({}),
        skippable: false,
        dependent_system: Some("ecommerce_system".to_owned()),
        backoff: Backoff::default(),
        max_deferrals: DEFAULT_MAX_DEFERRALS,
        concurrency: None,
        rate_limit: None,
        when: None,
        for_each: None,
        max_parallel: None,
        trigger: Trigger::AllSuccess,
    };
    let mut validate = step("validate_order", "ValidateOrder", &[]);
    validate.description = Some("Validate the order contents".to_owned());
    validate.config = json!({"strict": true});
    let mut reserve = step("reserve_inventory", "ReserveInventory", &["validate_order"]);
    reserve.description = Some("Reserve stock".to_owned());
    reserve.dependent_system = Some("inventory_system".to_owned());
    reserve.retry_limit = 5;
    reserve.config = json!({
        "type": "api",
        "url": "http://localhost:3000/reserve",
        "params": {"warehouse": "main", "hold_minutes": 1, "debug": true}
    });
    let mut payment = step("process_payment", "ProcessPayment", &["validate_order"]);
    payment.description = Some("Charge the customer".to_owned());
    payment.retryable = false;
    payment.retry_limit = 1;
    let mut confirm = step(
        "send_confirmation",
        "SendConfirmation",
        &["reserve_inventory", "process_payment"],
    );
    confirm.skippable = true;
    let ship = step(
        "ship_order",
        "ShipOrder",
        &["process_payment", "reserve_inventory"],
    );
    let expected = TemplateDefinition {
        namespace: "order_processing".to_owned(),
        name: "process_order".to_owned(),
        version: "1.0.0".to_owned(),
        description: Some("Process an order from validation to shipment".to_owned()),
        context_schema: Some(json!({
            "type": "object",
            "required": ["order_id", "customer"],
            "properties": {
                "order_id": {"type": "integer"},
                "customer": {
                    "type": "object",
                    "required": ["email"],
                    "properties": {"email": {"type": "string"}}
                }
            }
        })),
        priority: 5,
        concurrency: Vec::new(),
        timeout: None,
        schedules: Vec::new(),
        steps: vec![validate, reserve, payment, confirm, ship],
    };
    assert_eq!(definition, expected);

    // Another environment only changes its own overrides.
    let production = parse_template(ENGINE_YAML, "production").unwrap();
    assert_eq!(
        production.steps[1].config["url"],
        json!("https://inventory.example.com/reserve")
    );
    assert_eq!(production.steps[2].config, json!({"gateway": "live"}));
    // An environment that is not listed means no overrides.
    let staging = parse_template(ENGINE_YAML, "staging").unwrap();
    assert_eq!(staging.steps[2].config, json!({}));
}

#[test]
fn tasker_engine_minimal_defaults() {
    let text =
        "name: t\ntask_handler_class: T\nstep_templates:\n  - name: a\n    handler_class: A\n";
    let definition = parse_template(text, "").unwrap();
    assert_eq!(definition.namespace, "default");
    assert_eq!(definition.version, "0.1.0");
    assert_eq!(definition.steps[0].dependent_system, None);
    assert_eq!(definition.steps[0].config, json!({}));
}

#[test]
fn environment_deep_merge() {
    let mut base = json!({
        "a": 1,
        "nested": {"keep": true, "replace": [1, 2], "deeper": {"x": 1, "y": 2}},
        "scalar_to_object": 5
    });
    deep_merge(
        &mut base,
        &json!({
            "b": 2,
            "nested": {"replace": [3], "deeper": {"y": 20, "z": 30}, "added": null},
            "scalar_to_object": {"now": "object"}
        }),
    );
    assert_eq!(
        base,
        json!({
            "a": 1,
            "b": 2,
            "nested": {
                "keep": true,
                "replace": [3],
                "deeper": {"x": 1, "y": 20, "z": 30},
                "added": null
            },
            "scalar_to_object": {"now": "object"}
        })
    );
    let mut replaced = json!({"a": 1});
    deep_merge(&mut replaced, &json!("text"));
    assert_eq!(replaced, json!("text"));
}

#[test]
fn environment_naming_unknown_step_is_a_warning() {
    // tasker-engine's TaskBuilder skipped an override of a step it did not define.
    let text = "name: t\ntask_handler_class: T\nstep_templates:\n  - {name: a, handler_class: A}\nenvironments:\n  test:\n    step_templates:\n      - name: nope\n        handler_config: {x: 1}\n        handler_class: X\n";
    let parsed =
        parse_template_with_warnings(text, "production", TemplateLimits::default()).unwrap();
    let warnings: Vec<(&str, &str)> = parsed
        .warnings
        .iter()
        .map(|w| (w.path.as_str(), w.code.as_str()))
        .collect();
    assert_eq!(
        warnings,
        [("environments.test.step_templates[0].name", "ignored")],
        "{:#?}",
        parsed.warnings
    );
    assert!(parsed.warnings[0].message.contains("`nope`"));
    // Selected, the same override is skipped the same way.
    let parsed = parse_template_with_warnings(text, "test", TemplateLimits::default()).unwrap();
    assert_eq!(parsed.definition.steps[0].config, json!({}));
    assert_eq!(parsed.warnings.len(), 1, "{:#?}", parsed.warnings);
}

#[test]
fn all_five_problems_are_reported_together() {
    let text = r#"
namespace: shop
name: broken
context_schema:
  type: invalid_type
steps:
  - name: a
    handler: A
    depends_on: [c]
  - name: b
    handler: B
    depends_on: [a]
  - name: c
    handler: C
    depends_on: [b]
  - name: a
    handler: A2
  - name: d
    handler: D
    descripton: typo
    depends_on: [zzz]
"#;
    let error = parse_template(text, "").unwrap_err();
    let mut found = codes_of(&error);
    found.sort_unstable();
    assert_eq!(
        found,
        [
            "cycle",
            "duplicate_step",
            "invalid_schema",
            "unknown_dependency",
            "unknown_key"
        ],
        "{error:#?}"
    );
    let by_code = |code: &str| error.0.iter().find(|p| p.code == code).unwrap();
    assert_eq!(by_code("invalid_schema").path, "context_schema");
    assert!(by_code("invalid_schema").message.contains("/type"));
    assert_eq!(by_code("duplicate_step").path, "steps[3].name");
    assert!(by_code("duplicate_step").message.contains("`a`"));
    assert_eq!(by_code("unknown_key").path, "steps[4].descripton");
    assert_eq!(
        by_code("unknown_key").message,
        "unknown key `descripton`; did you mean `description`?"
    );
    assert_eq!(by_code("unknown_dependency").path, "steps[4].depends_on[0]");
    assert!(by_code("unknown_dependency").message.contains("`d`"));
    assert!(by_code("unknown_dependency").message.contains("`zzz`"));
    assert_eq!(
        by_code("cycle").message,
        "dependency cycle: a -> b -> c -> a"
    );
    assert_eq!(by_code("cycle").path, "steps[0].depends_on[0]");
    assert_eq!(error.to_string(), "invalid template: 5 problem(s)");
}

#[test]
fn every_structural_problem_is_collected() {
    let text = r#"
name: "bad name"
version: "1.0"
extra: 1
defaults: [1]
steps:
  - name: a
    handlr: X
    retry_limit: 0
    timeout_ms: "fast"
    retryable: "yes"
    depends_on: a
  - 42
  - name: ""
    handler: "   "
    depends_on: [a, 7, ""]
    retry_limit: 2.5
"#;
    let found = problems(text);
    let pairs: Vec<(&str, &str)> = found
        .iter()
        .map(|p| (p.path.as_str(), p.code.as_str()))
        .collect();
    let expected = [
        ("extra", "unknown_key"),
        ("namespace", "missing_key"),
        ("name", "invalid_value"),
        ("version", "invalid_value"),
        ("defaults", "not_an_object"),
        ("steps[0].handlr", "unknown_key"),
        ("steps[0].handler", "missing_key"),
        ("steps[0].depends_on", "wrong_type"),
        ("steps[0].retryable", "wrong_type"),
        ("steps[0].retry_limit", "invalid_value"),
        ("steps[0].timeout_ms", "wrong_type"),
        ("steps[1]", "not_an_object"),
        ("steps[2].name", "invalid_value"),
        ("steps[2].handler", "invalid_value"),
        ("steps[2].depends_on[1]", "wrong_type"),
        ("steps[2].depends_on[2]", "invalid_value"),
        ("steps[2].retry_limit", "wrong_type"),
    ];
    assert_eq!(pairs, expected, "{found:#?}");
    assert_eq!(
        found[5].message,
        "unknown key `handlr`; did you mean `handler`?"
    );
}

#[test]
fn legacy_paths_and_problems() {
    let text = r#"
name: api_task//integration
task_handler_class: ApiTask
namespace: wrong_key
schema: [not, an, object]
step_templates:
  - name: fetch
    handler: Fetch
    depends_on_steps: [fetch, ghost]
    custom_events:
      - name: ok
        payload: 1
      - just_a_string
  - name: store
    handler_class: ApiTask::Store
    depends_on_step: 12
    default_retry_limit: 101
"#;
    let found = problems(text);
    let pairs: Vec<(&str, &str)> = found
        .iter()
        .map(|p| (p.path.as_str(), p.code.as_str()))
        .collect();
    // Unknown keys (`namespace`, `handler`, `payload`) are warnings in a tasker-engine
    // file, which tasker-engine accepted; a missing `handler_class` is still a problem.
    let expected = [
        ("name", "invalid_value"),
        ("schema", "not_an_object"),
        ("step_templates[0].handler_class", "missing_key"),
        ("step_templates[0].custom_events[1]", "not_an_object"),
        ("step_templates[1].default_retry_limit", "invalid_value"),
        ("step_templates[1].depends_on_step", "wrong_type"),
        ("step_templates[0].depends_on_steps[0]", "self_dependency"),
        (
            "step_templates[0].depends_on_steps[1]",
            "unknown_dependency",
        ),
    ];
    assert_eq!(pairs, expected, "{found:#?}");
    assert!(
        found[0].message.contains("empty part"),
        "{}",
        found[0].message
    );
}

#[test]
fn legacy_unknown_keys_are_warnings_with_suggestions() {
    let text = "name: t\ntask_handler_class: T\nnamespace: wrong_key\nmonitoring: {sla: 4}\nstep_templates:\n  - name: a\n    handler_class: A\n    depends_on: [b]\n    retry_policy: fast\n  - {name: b, handler_class: B}\n";
    let parsed =
        parse_template_with_warnings(text, "development", TemplateLimits::default()).unwrap();
    let warnings: Vec<(&str, &str, &str)> = parsed
        .warnings
        .iter()
        .map(|w| (w.path.as_str(), w.code.as_str(), w.message.as_str()))
        .collect();
    assert_eq!(
        warnings,
        [
            (
                "monitoring",
                "unknown_key",
                "unknown key `monitoring` is ignored"
            ),
            (
                "namespace",
                "unknown_key",
                "unknown key `namespace` is ignored; did you mean `namespace_name`?"
            ),
            (
                "step_templates[0].depends_on",
                "unknown_key",
                "unknown key `depends_on` is ignored; did you mean `depends_on_steps`?"
            ),
            (
                "step_templates[0].retry_policy",
                "unknown_key",
                "unknown key `retry_policy` is ignored"
            ),
        ]
    );
    assert_eq!(parsed.definition.namespace, "default");
    assert!(parsed.definition.steps[0].depends_on.is_empty());
    // The project format still refuses unknown keys.
    let found =
        problems("namespace: n\nname: t\nmonitoring: 1\nsteps:\n  - {name: a, handler: A}\n");
    assert_eq!(found[0].code, "unknown_key");
}

#[test]
fn template_names_may_hold_slashes_between_identifiers() {
    for good in ["api_task/integration_yaml_example", "a/b/c", "x.y/z-1"] {
        let text = format!("namespace: n\nname: {good}\nsteps:\n  - {{name: a, handler: A}}\n");
        assert_eq!(parse_template(&text, "").unwrap().name, good);
        let text = format!(
            "name: {good}\ntask_handler_class: T\nstep_templates:\n  - {{name: a, handler_class: A}}\n"
        );
        assert_eq!(parse_template(&text, "").unwrap().name, good);
    }
    for bad in ["/a", "a/", "a//b", "a/ b", "a/_b", "a\\b", "a?b"] {
        let text = format!("namespace: n\nname: \"{bad}\"\nsteps:\n  - {{name: a, handler: A}}\n");
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{bad}: {found:#?}");
        assert_eq!(
            (found[0].path.as_str(), found[0].code.as_str()),
            ("name", "invalid_value")
        );
    }
    // Step names and namespaces keep the identifier rule: namespaces name queues.
    let found = problems("namespace: a/b\nname: t\nsteps:\n  - {name: s/t, handler: A}\n");
    let paths: Vec<&str> = found.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["namespace", "steps[0].name"], "{found:#?}");
}

#[test]
fn named_steps_must_hold_every_step_and_dependency() {
    let text = "name: t\ntask_handler_class: T\nnamed_steps: [a]\nstep_templates:\n  - {name: a, handler_class: A}\n  - {name: b, handler_class: B, depends_on_step: a}\n  - {name: c, handler_class: C, depends_on_steps: [b]}\n";
    let found = problems(text);
    let pairs: Vec<(&str, &str)> = found
        .iter()
        .map(|p| (p.path.as_str(), p.code.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("step_templates[1].name", "invalid_value"),
            ("step_templates[2].name", "invalid_value"),
            ("step_templates[2].depends_on_steps[0]", "invalid_value"),
        ],
        "{found:#?}"
    );
}

#[test]
fn class_name_stands_for_task_handler_class() {
    let text = "name: t\nmodule_namespace: M\nclass_name: T\nconcurrent: true\nstep_templates:\n  - {name: a, handler_class: A}\n";
    let parsed = parse_template_with_warnings(text, "", TemplateLimits::default()).unwrap();
    assert!(parsed.warnings.is_empty(), "{:#?}", parsed.warnings);
    let found = problems("name: t\nstep_templates:\n  - {name: a, handler_class: A}\n");
    assert_eq!(found[0].path, "task_handler_class");
    assert_eq!(found[0].code, "missing_key");
}

#[test]
fn environments_override_any_key_as_tasker_engine_merged_them() {
    let text = r#"
name: t
task_handler_class: T
description: base
step_templates:
  - name: a
    handler_class: A
    default_retry_limit: 3
    handler_config: {url: base, params: {x: 1}}
environments:
  development:
    description: dev
    step_templates:
      - name: a
        default_retry_limit: 1
        skippable: true
        handler_config: {params: {y: 2}, extra: null}
  production:
    step_templates:
      - name: a
        handler_config: null
"#;
    let dev = parse_template(text, "development").unwrap();
    assert_eq!(dev.description.as_deref(), Some("dev"));
    assert_eq!(dev.steps[0].retry_limit, 1);
    assert!(dev.steps[0].skippable);
    assert_eq!(
        dev.steps[0].config,
        json!({"url": "base", "params": {"x": 1, "y": 2}, "extra": null})
    );
    // A null override changes nothing.
    let production = parse_template(text, "production").unwrap();
    assert_eq!(production.description.as_deref(), Some("base"));
    assert_eq!(
        production.steps[0].config,
        json!({"url": "base", "params": {"x": 1}})
    );
    assert_eq!(production.steps[0].retry_limit, 3);
}

/// Template files in tasker-engine's documented form (tests/fixtures/tasker_engine/).
const ENGINE_FILES: [(&str, &str); 4] = [
    (
        "inventory_sync",
        include_str!("../../../tests/fixtures/tasker_engine/inventory_sync.yaml"),
    ),
    (
        "nightly_reporting",
        include_str!("../../../tests/fixtures/tasker_engine/nightly_reporting.yaml"),
    ),
    (
        "guarded_checkout",
        include_str!("../../../tests/fixtures/tasker_engine/guarded_checkout.yaml"),
    ),
    (
        "returns_processing",
        include_str!("../../../tests/fixtures/tasker_engine/returns_processing.yaml"),
    ),
];

#[test]
fn tasker_engine_files_parse_with_their_warnings() {
    let mut seen = Vec::new();
    for (file, text) in ENGINE_FILES {
        for environment in ["development", "test", "production", "staging"] {
            let parsed = parse_template_with_warnings(text, environment, TemplateLimits::default())
                .unwrap_or_else(|error| panic!("{file} ({environment}): {:#?}", error.0));
            let warnings: Vec<(&str, &str)> = parsed
                .warnings
                .iter()
                .map(|w| (w.path.as_str(), w.code.as_str()))
                .collect();
            let expected: &[(&str, &str)] = match file {
                "nightly_reporting" => &[("custom_events", "ignored")],
                "guarded_checkout" => &[("handler_config", "ignored")],
                "returns_processing" => &[
                    ("monitoring", "unknown_key"),
                    ("retry_strategies", "unknown_key"),
                    ("concurrent", "ignored"),
                    ("step_templates[1].custom_events", "ignored"),
                ],
                _ => &[],
            };
            assert_eq!(
                warnings, expected,
                "{file} ({environment}): {:#?}",
                parsed.warnings
            );
            seen.push((file, environment, parsed.definition));
        }
    }
    let find = |file: &str, environment: &str| {
        &seen
            .iter()
            .find(|(f, e, _)| *f == file && *e == environment)
            .unwrap()
            .2
    };
    let inventory = find("inventory_sync", "development");
    assert_eq!(inventory.name, "warehouse/inventory_sync");
    assert_eq!(inventory.namespace, "warehouse");
    assert_eq!(
        inventory.steps[0].config,
        json!({"type": "api", "url": "http://localhost:3000/stock", "params": {"page_size": 500, "debug": true}})
    );
    assert_eq!(
        inventory.steps[0].dependent_system.as_deref(),
        Some("warehouse_system")
    );
    assert_eq!(
        inventory.steps[1].dependent_system.as_deref(),
        Some("order_system")
    );
    assert_eq!(
        inventory.steps[2].depends_on,
        ["fetch_stock_levels", "fetch_open_orders"]
    );
    let production = find("inventory_sync", "production");
    assert_eq!(
        production.steps[0].config["params"],
        json!({"page_size": 500, "api_key": "${WMS_API_KEY}"})
    );

    let returns = find("returns_processing", "development");
    assert_eq!(returns.name, "returns/process_return");
    assert_eq!(
        returns.description.as_deref(),
        Some("Returns (development)")
    );
    assert!(!returns.steps[0].retryable);
    assert_eq!(returns.steps[2].retry_limit, 1);
    assert_eq!(
        returns.steps[2].config,
        json!({"gateway": "development_sandbox"})
    );
    assert!(returns.steps[3].skippable);
    assert_eq!(
        returns.steps[4].depends_on,
        ["issue_refund", "restock_item"]
    );
    assert_eq!(
        find("returns_processing", "production").steps[2].retry_limit,
        2
    );

    let reporting = find("nightly_reporting", "development");
    assert_eq!(reporting.version, "2.3.0");
    let schema_ok = json!({"report_date": "2026-12-03", "granularity": "weekly", "recipients": ["a@example.com"]});
    assert_eq!(reporting.validate_context(&schema_ok), Ok(()));
    let bad = json!({"report_date": "yesterday", "granularity": "hourly"});
    let violations = reporting.validate_context(&bad).unwrap_err();
    let pointers: Vec<&str> = violations.iter().map(|p| p.path.as_str()).collect();
    assert!(pointers.contains(&"/report_date"), "{violations:#?}");
    assert!(pointers.contains(&"/granularity"), "{violations:#?}");
}

#[test]
fn tasker_engine_files_still_refuse_graph_mistakes_all_at_once() {
    let text = "name: a/b\ntask_handler_class: T\ncustom_events: [{name: e}]\nhandler_config: {x: 1}\nstep_templates:\n  - {name: a, handler_class: A, depends_on_step: c}\n  - {name: b, handler_class: B, depends_on_steps: [a, ghost]}\n  - {name: c, handler_class: C, depends_on_step: b}\n  - {name: a, handler_class: D}\n";
    let found = problems(text);
    let codes: Vec<&str> = found.iter().map(|p| p.code.as_str()).collect();
    assert_eq!(
        codes,
        ["duplicate_step", "unknown_dependency", "cycle"],
        "{found:#?}"
    );
}

#[test]
fn duplicate_names_reported_once_per_name() {
    let text = "namespace: n\nname: t\nsteps:\n  - {name: a, handler: H}\n  - {name: b, handler: H}\n  - {name: a, handler: H}\n  - {name: a, handler: H}\n  - {name: b, handler: H}\n";
    let found = problems(text);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert_eq!(found[0].path, "steps[2].name");
    assert!(found[0].message.contains("3 times"));
    assert!(found[0].message.contains("steps[0], steps[2], steps[3]"));
    assert_eq!(found[1].path, "steps[4].name");
}

#[test]
fn cycles_are_named_once_each() {
    let text = r#"
namespace: n
name: t
steps:
  - {name: a, handler: H, depends_on: [b, c]}
  - {name: b, handler: H, depends_on: [a]}
  - {name: c, handler: H, depends_on: [a]}
  - {name: d, handler: H, depends_on: [d]}
  - {name: e, handler: H, depends_on: [g]}
  - {name: f, handler: H, depends_on: [e]}
  - {name: g, handler: H, depends_on: [f]}
"#;
    let found = problems(text);
    let messages: Vec<(&str, &str)> = found
        .iter()
        .map(|p| (p.code.as_str(), p.message.as_str()))
        .collect();
    assert_eq!(
        messages,
        [
            ("self_dependency", "step `d` depends on itself"),
            ("cycle", "dependency cycle: a -> b -> a"),
            ("cycle", "dependency cycle: a -> c -> a"),
            ("cycle", "dependency cycle: e -> f -> g -> e"),
        ],
        "{found:#?}"
    );
}

#[test]
fn johnson_finds_every_elementary_cycle() {
    // Complete digraph on 4 nodes has 20 elementary cycles.
    let adjacency: Vec<Vec<usize>> = (0..4)
        .map(|v| (0..4).filter(|&w| w != v).collect())
        .collect();
    let (cycles, more) = elementary_cycles(&adjacency, 100);
    assert!(!more);
    assert_eq!(cycles.len(), 20);
    let unique: HashSet<Vec<usize>> = cycles.iter().cloned().collect();
    assert_eq!(unique.len(), 20);
    let (limited, more) = elementary_cycles(&adjacency, 5);
    assert!(more);
    assert_eq!(limited.len(), 5);
}

#[test]
fn too_many_cycles_are_summarised() {
    // 12 steps that all depend on each other: far more than 100 cycles.
    let names: Vec<String> = (0..12).map(|i| format!("s{i}")).collect();
    let steps: Vec<Value> = names
        .iter()
        .map(|name| {
            let deps: Vec<&String> = names.iter().filter(|other| *other != name).collect();
            json!({"name": name, "handler": "H", "depends_on": deps})
        })
        .collect();
    let value = json!({"namespace": "n", "name": "t", "steps": steps});
    let error = template_from_value(&value, "").unwrap_err();
    assert_eq!(error.0.len(), MAX_REPORTED_CYCLES + 1);
    assert!(error.0.iter().all(|p| p.code == "cycle"));
    assert!(
        error.0[MAX_REPORTED_CYCLES]
            .message
            .starts_with("more dependency cycles")
    );
}

fn chain(count: usize) -> Value {
    let steps: Vec<Value> = (0..count)
        .map(|i| {
            if i == 0 {
                json!({"name": "step-0", "handler": "H"})
            } else {
                json!({"name": format!("step-{i}"), "handler": "H",
                       "depends_on": [format!("step-{}", i - 1)]})
            }
        })
        .collect();
    json!({"namespace": "big", "name": "chain", "steps": steps})
}

#[test]
fn ten_thousand_step_chain_validates() {
    let value = chain(MAX_STEPS);
    let definition = template_from_value(&value, "").unwrap();
    assert_eq!(definition.steps.len(), MAX_STEPS);
    let order = definition.topological_order();
    assert_eq!(order.len(), MAX_STEPS);
    assert_eq!(order[0].name, "step-0");
    assert_eq!(order[MAX_STEPS - 1].name, format!("step-{}", MAX_STEPS - 1));
    // Also through the text parser.
    let text = serde_json::to_string(&value).unwrap();
    assert_eq!(parse_template(&text, "").unwrap(), definition);
}

#[test]
fn ten_thousand_step_cycle_is_found_without_recursion() {
    let mut value = chain(MAX_STEPS);
    value["steps"][0]["depends_on"] = json!([format!("step-{}", MAX_STEPS - 1)]);
    let error = template_from_value(&value, "").unwrap_err();
    assert_eq!(codes_of(&error), ["cycle"]);
    let message = &error.0[0].message;
    assert!(
        message.starts_with("dependency cycle: step-0 -> step-1 -> "),
        "{message}"
    );
    assert!(message.ends_with("step-9999 -> step-0"), "{message}");
    assert!(message.contains("(9980 more steps)"), "{message}");
    assert!(message.len() < 1_000, "{} bytes", message.len());
}

#[test]
fn more_than_ten_thousand_steps_is_rejected() {
    let value = chain(MAX_STEPS + 1);
    let error = template_from_value(&value, "").unwrap_err();
    assert_eq!(error.0.len(), 1, "{error:#?}");
    assert_eq!(error.0[0].path, "steps");
    assert_eq!(error.0[0].code, "too_many_steps");
}

#[test]
fn a_lower_step_limit_refuses_longer_templates_without_reading_their_steps() {
    let limits = TemplateLimits {
        max_steps: 1_000,
        ..TemplateLimits::default()
    };
    let at_limit = chain(1_000);
    assert!(template_from_value_with_limits(&at_limit, "", limits).is_ok());
    // Over the limit, broken steps are not even read: one problem names the limit.
    let mut over = chain(1_001);
    over["steps"][5]["handler"] = json!(7);
    over["steps"][0]["depends_on"] = json!(["step-1000"]);
    let error = template_from_value_with_limits(&over, "", limits).unwrap_err();
    assert_eq!(codes_of(&error), ["too_many_steps"], "{error:#?}");
    assert!(
        error.0[0]
            .message
            .contains("at most 1000 steps, this one has 1001"),
        "{}",
        error.0[0].message
    );
    // Through the text parser too, and a limit above MAX_STEPS is MAX_STEPS.
    let text = serde_json::to_string(&chain(MAX_STEPS + 1)).unwrap();
    let error = parse_template_with_limits(
        &text,
        "",
        TemplateLimits {
            max_steps: usize::MAX,
            ..TemplateLimits::default()
        },
    )
    .unwrap_err();
    assert_eq!(codes_of(&error), ["too_many_steps"]);
}

#[test]
fn problems_past_the_cap_are_counted_not_listed() {
    let steps: Vec<Value> = (0..1_000)
        .map(|i| json!({"name": format!("s{i}"), "handler": "H", "colour": i}))
        .collect();
    let value = json!({"namespace": "n", "name": "t", "steps": steps});
    let error = template_from_value(&value, "").unwrap_err();
    assert_eq!(error.0.len(), MAX_PROBLEMS + 1);
    let last = error.0.last().unwrap();
    assert_eq!(last.code, "more_problems");
    assert!(
        last.message.starts_with("800 more problem(s)"),
        "{}",
        last.message
    );
}

#[test]
fn a_name_used_thousands_of_times_lists_only_a_few_places() {
    let steps: Vec<Value> = (0..5_000)
        .map(|_| json!({"name": "same", "handler": "H"}))
        .collect();
    let value = json!({"namespace": "n", "name": "t", "steps": steps});
    let error = template_from_value(&value, "").unwrap_err();
    assert_eq!(codes_of(&error), ["duplicate_step"]);
    let message = &error.0[0].message;
    assert!(
        message.starts_with("step name `same` is used 5000 times (steps[0], "),
        "{message}"
    );
    assert!(message.ends_with(", ...)"), "{message}");
    assert!(message.len() < 300, "{message}");
}

#[test]
fn topological_order_breaks_ties_by_file_order() {
    let text = r#"
namespace: n
name: t
steps:
  - {name: d, handler: H, depends_on: [b]}
  - {name: a, handler: H}
  - {name: b, handler: H, depends_on: [a]}
  - {name: c, handler: H}
  - {name: e, handler: H, depends_on: [d, c]}
"#;
    let definition = parse_template(text, "").unwrap();
    let order: Vec<&str> = definition
        .topological_order()
        .iter()
        .map(|step| step.name.as_str())
        .collect();
    assert_eq!(order, ["a", "b", "d", "c", "e"]);
}

#[test]
fn topological_order_of_unvalidated_cycle_keeps_every_step() {
    let mut definition = expected_project();
    definition.steps[0].depends_on = vec!["ship".to_owned(), "missing".to_owned()];
    let order: Vec<&str> = definition
        .topological_order()
        .iter()
        .map(|step| step.name.as_str())
        .collect();
    assert_eq!(order, ["validate", "charge", "reserve", "ship"]);
}

#[test]
fn validate_context_lists_every_violation() {
    let definition = parse_template(ENGINE_YAML, "").unwrap();
    assert_eq!(
        definition.validate_context(&json!({"order_id": 1, "customer": {"email": "a@b.c"}})),
        Ok(())
    );
    let mut found = definition
        .validate_context(&json!({"customer": {"email": 42}}))
        .unwrap_err();
    found.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(found.len(), 2, "{found:#?}");
    assert_eq!(found[0].path, "");
    assert_eq!(found[0].code, "schema");
    assert!(
        found[0].message.contains("order_id"),
        "{}",
        found[0].message
    );
    assert_eq!(found[1].path, "/customer/email");
    assert_eq!(found[1].code, "schema");
    assert!(found[1].message.contains("string"), "{}", found[1].message);

    let mut no_schema = definition;
    no_schema.context_schema = None;
    assert_eq!(no_schema.validate_context(&json!("anything")), Ok(()));
}

#[test]
fn formats_are_enforced() {
    let schema = json!({"properties": {"email": {"type": "string", "format": "email"}}});
    let found = validate_against_schema(&schema, &json!({"email": "nope"})).unwrap_err();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].path, "/email");

    // Local references, date-time and ipv4 formats, an older dialect.
    let schema = json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "definitions": {"when": {"type": "string", "format": "date-time"}},
        "properties": {
            "at": {"$ref": "#/definitions/when"},
            "ip": {"type": "string", "format": "ipv4"}
        }
    });
    assert!(schema_problems(&schema).is_empty());
    let good = json!({"at": "2024-05-01T10:00:00Z", "ip": "10.0.0.1"});
    assert_eq!(validate_against_schema(&schema, &good), Ok(()));
    let mut found =
        validate_against_schema(&schema, &json!({"at": "yesterday", "ip": "x"})).unwrap_err();
    found.sort_by(|a, b| a.path.cmp(&b.path));
    let paths: Vec<&str> = found.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["/at", "/ip"]);
}

#[test]
fn schema_compile_errors_are_invalid_schema() {
    for schema in [
        json!({"pattern": "("}),
        json!({"$ref": "#/definitions/missing"}),
        json!({"$ref": "https://example.com/schema.json"}),
        json!({"$schema": "https://example.com/custom-meta"}),
        json!({"properties": {"a": {"type": 5}, "b": {"minimum": "x"}}}),
    ] {
        let value = json!({"namespace": "n", "name": "t", "context_schema": schema,
                           "steps": [{"name": "a", "handler": "H"}]});
        let error = template_from_value(&value, "").unwrap_err();
        assert!(!error.0.is_empty());
        assert!(
            error
                .0
                .iter()
                .all(|p| p.code == "invalid_schema" && p.path == "context_schema"),
            "{error:#?}"
        );
    }
}

#[test]
fn backtracking_patterns_are_refused_and_linear_ones_validate() {
    // A backreference or a look-ahead needs a backtracking engine, whose time a
    // context can make exponential: refused when the template is registered.
    for pattern in ["^(a+)+\\1$", "^(?=.*[A-Z]).+$"] {
        let value = json!({"namespace": "n", "name": "t",
                           "context_schema": {"properties": {"code": {"pattern": pattern}}},
                           "steps": [{"name": "a", "handler": "H"}]});
        let error = template_from_value(&value, "").unwrap_err();
        assert_eq!(
            codes_of(&error),
            ["invalid_schema"],
            "{pattern}: {error:#?}"
        );
    }
    let schema = json!({"properties": {"code": {"pattern": "^(a+)+b$"}}});
    let value = json!({"namespace": "n", "name": "t", "context_schema": schema,
                       "steps": [{"name": "a", "handler": "H"}]});
    let template = template_from_value(&value, "").unwrap();
    assert_eq!(template.validate_context(&json!({"code": "aaab"})), Ok(()));
    // The classic catastrophic case answers at once with a linear engine.
    let started = std::time::Instant::now();
    let hostile = format!("{}c", "a".repeat(10_000));
    let found = template
        .validate_context(&json!({"code": hostile}))
        .unwrap_err();
    assert_eq!(found[0].path, "/code");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn alias_bombs_stop_at_the_expansion_limits_while_parsing() {
    let items = |alias: &str| format!("[{}]", vec![alias; 100].join(", "));
    let bomb = format!(
        "namespace: n\nname: t\na: &a {}\nb: &b {}\nc: &c {}\nsteps: [{{name: a, handler: H}}]\n",
        items("x"),
        items("*a"),
        items("*b")
    );
    let found = problems(&bomb);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].code, "syntax");
    assert!(
        found[0].message.contains("more than 250000 values"),
        "{}",
        found[0].message
    );
    // Text counts at every use too: 2,000 uses of a 10 KB string are 20 MB.
    let text = format!(
        "namespace: n\nname: t\nbig: &big {}\ncopies: [{}]\nsteps: [{{name: a, handler: H}}]\n",
        "x".repeat(10_000),
        vec!["*big"; 2_000].join(", ")
    );
    let found = problems(&text);
    assert!(
        found[0].message.contains("more than 16 MiB of text"),
        "{found:#?}"
    );
    // Below the limits, aliases expand as YAML says.
    let fine = "namespace: n\nname: t\nsteps:\n  - {name: a, handler: H, config: &c {k: [1, 2]}}\n  - {name: b, handler: H, config: *c}\n";
    let template = parse_template(fine, "").unwrap();
    assert_eq!(template.steps[1].config, json!({"k": [1, 2]}));
}

#[test]
fn configs_that_expand_past_the_limit_are_config_too_large() {
    let uses = vec!["*big"; 200].join(", ");
    let text = format!(
        "namespace: n\nname: t\nsteps:\n  - name: a\n    handler: H\n    config: {{seed: &big {}, copies: [{uses}]}}\n",
        "x".repeat(10_000)
    );
    let error = parse_template(&text, "").unwrap_err();
    assert_eq!(codes_of(&error), ["config_too_large"], "{error:#?}");
    assert_eq!(error.0[0].path, "steps");
    assert!(error.0[0].message.contains("1048576"), "{error:#?}");
    let limits = TemplateLimits {
        max_config_bytes: 4 * 1024 * 1024,
        ..TemplateLimits::default()
    };
    assert!(parse_template_with_limits(&text, "", limits).is_ok());
}

#[test]
fn syntax_errors_carry_line_and_column() {
    let found =
        problems("namespace: n\nname: t\nsteps:\n  - name: a\n    handler: b\n   retry_limit: 3\n");
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].code, "syntax");
    assert!(
        found[0].message.contains("line 6 column 4"),
        "{}",
        found[0].message
    );

    let found = problems("{\"namespace\": \"n\",\n \"name\": [}");
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].code, "syntax");
    assert!(
        found[0].message.starts_with("JSON syntax error"),
        "{}",
        found[0].message
    );
    assert!(
        found[0].message.contains("line 2 column 11"),
        "{}",
        found[0].message
    );

    // JSON that is only valid as YAML (flow style) is still accepted.
    let flow = parse_template(
        "{namespace: n, name: t, steps: [{name: a, handler: H}]}",
        "",
    );
    assert_eq!(flow.unwrap().steps[0].name, "a");
}

#[test]
fn duplicate_keys_are_syntax_errors() {
    let found = problems("namespace: n\nname: t\nname: u\nsteps: []\n");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].code, "syntax");
    assert_eq!(
        found[0].message,
        "YAML syntax error: duplicate key `name` in the mapping that starts at line 1 column 1"
    );
    let found =
        problems("namespace: n\nname: t\nsteps:\n  - name: a\n    handler: H\n    handler: J\n");
    assert!(
        found[0].message.contains("`handler`"),
        "{}",
        found[0].message
    );
    assert!(
        found[0].message.contains("line 4 column 5"),
        "{}",
        found[0].message
    );

    let found = problems("{\"namespace\": \"n\", \"namespace\": \"m\"}");
    assert_eq!(found[0].code, "syntax");
    assert!(
        found[0].message.contains("duplicate key"),
        "{}",
        found[0].message
    );
}

#[test]
fn yaml_merge_keys_are_applied() {
    let text = r#"
namespace: n
name: t
steps:
  - &base
    name: a
    handler: Shared
    retry_limit: 7
  - <<: *base
    name: b
    depends_on: [a]
"#;
    let definition = parse_template(text, "").unwrap();
    assert_eq!(definition.steps[1].handler, "Shared");
    assert_eq!(definition.steps[1].retry_limit, 7);
    assert_eq!(definition.steps[1].name, "b");
}

#[test]
fn top_level_shapes() {
    for (text, code) in [
        ("", "not_an_object"),
        ("- a\n- b\n", "not_an_object"),
        ("just text", "not_an_object"),
        ("a: 1\n---\nb: 2\n", "syntax"),
        ("a: !tag x\n", "syntax"),
        ("a: .nan\n", "syntax"),
    ] {
        let found = problems(text);
        assert_eq!(found.len(), 1, "{text:?}: {found:#?}");
        assert_eq!(found[0].code, code, "{text:?}: {found:#?}");
        assert_eq!(found[0].path, "");
    }
}

#[test]
fn empty_steps_and_ranges() {
    let found = problems("namespace: n\nname: t\nsteps: []\n");
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].path.as_str(), found[0].code.as_str()),
        ("steps", "no_steps")
    );

    let found = problems(
        "namespace: a-very-long-namespace-that-goes-on-and-on-and-on-beyond-sixty-four-chars\nname: t\nversion: 1.0\nsteps:\n  - {name: a, handler: H, timeout_ms: 86400001, retry_limit: 10000000000000000000}\n",
    );
    let pairs: Vec<(&str, &str)> = found
        .iter()
        .map(|p| (p.path.as_str(), p.code.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("namespace", "invalid_value"),
            ("version", "wrong_type"),
            ("steps[0].retry_limit", "invalid_value"),
            ("steps[0].timeout_ms", "invalid_value"),
        ],
        "{found:#?}"
    );
}

#[test]
fn identifiers_and_handlers() {
    assert_eq!(identifier_error("order.v2_final-1", 128), None);
    assert!(identifier_error("_x", 128).is_some());
    assert!(identifier_error("a b", 128).is_some());
    assert!(identifier_error("ä", 128).is_some());
    assert!(identifier_error(&"a".repeat(129), 128).is_some());
    assert_eq!(identifier_error(&"a".repeat(128), 128), None);

    let mut walker = Walker::default();
    walker.check_label(
        "OrderProcessing::StepHandler::ValidateOrder",
        "h",
        "handler",
    );
    walker.check_label("módulo.función", "h", "handler");
    assert!(walker.problems.is_empty());
    walker.check_label(&"H".repeat(257), "h", "handler");
    walker.check_label("a\tb", "h", "handler");
    assert_eq!(walker.problems.len(), 2);
}

#[test]
fn unknown_keys_without_close_match_list_allowed_keys() {
    let found = problems("namespace: n\nname: t\nsteps:\n  - {name: a, handler: H, zzzzzz: 1}\n");
    assert_eq!(found.len(), 1);
    assert!(
        found[0]
            .message
            .starts_with("unknown key `zzzzzz`; allowed keys here: name, handler")
    );
    let found = problems("namespace: n\nname: t\nsteps:\n  - {name: a, handler_class: H}\n");
    let messages: Vec<&str> = found.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "unknown key `handler_class`; did you mean `handler`?",
            "missing required key `handler`"
        ]
    );
}

#[test]
fn odd_keys_are_quoted_in_paths() {
    assert_eq!(join("", "steps"), "steps");
    assert_eq!(join("environments", "dev.eu"), "environments[\"dev.eu\"]");
    assert_eq!(item("steps", 3), "steps[3]");
}

#[test]
fn backoff_policies_come_from_defaults_and_step_overrides() {
    let yaml = r#"
namespace: ops
name: policies
defaults:
  backoff: {base_seconds: 0.5, max_seconds: 10, jitter: false}
  max_deferrals: 3
steps:
  - {name: inherit, handler: h}
  - {name: scheduled, handler: h, backoff: {schedule: [1, 5, 30, 120]}}
  - {name: capped, handler: h, backoff: {schedule: [1, 2], max_seconds: 60}, max_deferrals: 0}
  - {name: jittery, handler: h, backoff: {jitter: true}}
"#;
    let template = parse_template(yaml, "test").expect("valid");
    let steps = &template.steps;
    assert_eq!(
        steps[0].backoff,
        Backoff {
            base_ms: 500,
            max_ms: 10_000,
            jitter: false,
            schedule_ms: None
        }
    );
    assert_eq!(steps[0].max_deferrals, 3);
    assert_eq!(
        steps[1].backoff.schedule_ms,
        Some(vec![1_000, 5_000, 30_000, 120_000])
    );
    assert_eq!(
        steps[1].backoff.max_ms, 120_000,
        "a schedule's cap defaults to its longest wait"
    );
    assert_eq!(steps[2].backoff.max_ms, 60_000);
    assert_eq!(steps[2].max_deferrals, 0);
    assert_eq!(
        steps[3].backoff,
        Backoff {
            base_ms: 500,
            max_ms: 10_000,
            jitter: true,
            schedule_ms: None
        }
    );
    // Stored form round-trips, and old stored definitions without the keys get defaults.
    let stored = serde_json::to_value(&template).expect("serialise");
    assert_eq!(
        serde_json::from_value::<TemplateDefinition>(stored).expect("read"),
        template
    );
    let mut old = serde_json::to_value(&template.steps[0]).expect("serialise");
    old.as_object_mut().expect("object").remove("backoff");
    let old: StepDefinition = serde_json::from_value(old).expect("read");
    assert_eq!(old.backoff, Backoff::default());
}

#[test]
fn bad_backoff_policies_are_all_reported() {
    let yaml = r#"
namespace: ops
name: policies
steps:
  - {name: a, handler: h, backoff: {base_seconds: 10, max_seconds: 2}}
  - {name: b, handler: h, backoff: {schedule: []}}
  - {name: c, handler: h, backoff: {schedule: [1, -2, "x"], jitter: true}}
  - {name: d, handler: h, backoff: {base_ms: 100}}
  - {name: e, handler: h, backoff: 5, max_deferrals: -1}
"#;
    let problems = parse_template(yaml, "test").expect_err("invalid").0;
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    for expected in [
        "steps[0].backoff",
        "steps[1].backoff.schedule",
        "steps[2].backoff.schedule[1]",
        "steps[2].backoff.schedule[2]",
        "steps[2].backoff",
        "steps[3].backoff.base_ms",
        "steps[4].backoff",
        "steps[4].max_deferrals",
    ] {
        assert!(paths.contains(&expected), "{expected} not in {paths:?}");
    }
    let unknown = problems
        .iter()
        .find(|p| p.path == "steps[3].backoff.base_ms")
        .expect("base_ms");
    assert!(
        unknown.message.contains("base_seconds"),
        "{}",
        unknown.message
    );
}

#[test]
fn schema_violations_past_the_cap_are_not_listed() {
    let schema = json!({"type": "array", "items": {"type": "string"}});
    let instance = Value::Array((0..10_000).map(|i| json!(i)).collect());
    let problems = validate_against_schema(&schema, &instance).unwrap_err();
    assert_eq!(problems.len(), MAX_PROBLEMS + 1);
    assert_eq!(problems[MAX_PROBLEMS].code, "more_problems");
}

#[test]
fn deeply_nested_documents_are_refused_quickly() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    for (text, said) in [
        (
            format!(
                r#"{{"namespace": "n", "name": "t", "steps": [{{"name": "a", "handler": "H", "config": {deep}}}]}}"#
            ),
            "recursion limit exceeded",
        ),
        (
            format!(
                "namespace: n\nname: t\nsteps:\n  - name: a\n    handler: H\n    config: {deep}\n"
            ),
            "recursion limit exceeded",
        ),
        (deep.clone(), "recursion limit exceeded"),
        // Flow-style YAML, which is not JSON, is bounded as any YAML.
        (format!("{{a: {deep}}}"), "JSON syntax error"),
    ] {
        let started = std::time::Instant::now();
        let error = parse_template(&text, "").unwrap_err();
        assert_eq!(codes_of(&error), ["syntax"], "{error:#?}");
        assert!(error.0[0].message.contains(said), "{}", error.0[0].message);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{:?} for {}...",
            started.elapsed(),
            &text[..40]
        );
    }
}

#[test]
fn nesting_up_to_the_limit_still_parses_as_yaml() {
    // 99 arrays: under a key below, the config nests 100 levels, the most Tasker carries.
    let config = format!("{}1{}", "[".repeat(99), "]".repeat(99));
    let text = format!(
        "namespace: n\nname: t\ndescription: 'it''s [fine] {{really}}'\nsteps:\n  - name: a\n    handler: H\n    config: {config}\n"
    );
    let definition = parse_template(&text, "").unwrap();
    assert_eq!(
        definition.steps[0].config,
        serde_json::from_str::<Value>(&config).unwrap()
    );
    // Nesting spread over many values, each under the depth limit, is fine and quick up
    // to the cap on flow collections (8,192); past it the document is refused, and told
    // to use block style.
    let with_values = |n: usize| {
        let many: Vec<String> = (0..n).map(|i| format!("k{i}: {config}")).collect();
        format!(
            "namespace: n\nname: t\nsteps:\n  - name: a\n    handler: H\n    config:\n      {}\n",
            many.join("\n      ")
        )
    };
    let started = std::time::Instant::now();
    assert!(parse_template(&with_values(82), "").is_ok());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let error = parse_template(&with_values(83), "").unwrap_err();
    assert!(error.0[0].message.contains("block style"), "{error:?}");
}

#[test]
fn priority_is_read_from_zero_to_nine_and_defaults_to_five() {
    let step = "steps:\n  - name: a\n    handler: h\n";
    let parsed =
        |extra: &str| parse_template(&format!("namespace: n\nname: t\n{extra}{step}"), "t");
    assert_eq!(parsed("").unwrap().priority, 5);
    assert_eq!(parsed("priority: 0\n").unwrap().priority, 0);
    assert_eq!(parsed("priority: 9\n").unwrap().priority, 9);
    // Stored definitions read back with it; older ones without it get the default.
    let definition = parsed("priority: 7\n").unwrap();
    let mut stored = serde_json::to_value(&definition).unwrap();
    assert_eq!(stored["priority"], 7);
    stored.as_object_mut().unwrap().remove("priority");
    let old: TemplateDefinition = serde_json::from_value(stored).unwrap();
    assert_eq!(old.priority, 5);
    for bad in [
        "priority: 10\n",
        "priority: -1\n",
        "priority: high\n",
        "priority: 2.5\n",
    ] {
        let problems = problems(&format!("namespace: n\nname: t\n{bad}{step}"));
        assert_eq!(problems.len(), 1, "{bad}: {problems:?}");
        assert_eq!(problems[0].path, "priority", "{bad}");
    }
    // tasker-engine files have no priority: their tasks get the default.
    let legacy = "name: t\nnamespace_name: n\nversion: 1.0.0\ntask_handler_class: T\nstep_templates:\n  - name: a\n    handler_class: H\n";
    assert_eq!(parse_template(legacy, "t").unwrap().priority, 5);
}

const LIMITED: &str = "namespace: shop\nname: sync\nsteps:\n  - name: fetch\n    handler: h\n    concurrency: {key: context.customer, limit: 2}\n  - name: call\n    handler: h\n    depends_on: [fetch]\n    rate_limit: {key: \"'partner'\", limit: 100, per: 10s}\n  - name: plain\n    handler: h\n";

#[test]
fn limits_are_read_and_their_keys_evaluated_per_task() {
    let definition = parse_template(LIMITED, "test").unwrap();
    assert_eq!(
        definition.steps[0].concurrency,
        Some(ConcurrencyLimit {
            key: "context.customer".into(),
            limit: 2
        })
    );
    let rate = definition.steps[1].rate_limit.clone().unwrap();
    assert_eq!(
        (rate.limit, rate.per.as_str(), rate.per_ms()),
        (100, "10s", 10_000)
    );
    assert!(definition.has_limits());

    let context = json!({"customer": 42});
    let inputs = KeyInputs {
        context: &context,
        tags: &json!([]),
        priority: 5,
    };
    let keys = definition.limit_keys(inputs).unwrap().steps;
    assert_eq!(
        keys[0].concurrency,
        Some(("shop/sync:fetch=42".to_owned(), 2))
    );
    assert_eq!(keys[1].rate, Some(("partner".to_owned(), 100, 10_000)));
    assert_eq!(keys[2], LimitKeys::default());

    // A key the context cannot give, or that gives a list, is a problem naming the
    // step and the key.
    for context in [json!({}), json!({"customer": [1, 2]})] {
        let problems = definition
            .limit_keys(KeyInputs {
                context: &context,
                ..inputs
            })
            .unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "steps[0].concurrency.key");
        assert_eq!(problems[0].code, codes::INVALID_EXPRESSION);
        assert!(
            problems[0].message.contains("step `fetch`"),
            "{}",
            problems[0].message
        );
    }
    // A template without limits evaluates nothing.
    let plain = parse_template(
        "namespace: a\nname: b\nsteps:\n  - {name: s, handler: h}\n",
        "test",
    )
    .unwrap();
    assert_eq!(plain.limit_keys(inputs).unwrap(), Limits::default());
}

#[test]
fn every_malformed_limit_is_a_problem_naming_the_step_and_the_key() {
    let text = "namespace: shop\nname: bad\nsteps:\n  - name: a\n    handler: h\n    concurrency: {key: context.x, limit: 0}\n  - name: b\n    handler: h\n    concurrency: {limit: 1}\n  - name: c\n    handler: h\n    rate_limit: {key: context.x, limit: 1, per: 1d}\n  - name: d\n    handler: h\n    rate_limit: {key: \"context.x ==\", limit: 1, per: 1s}\n  - name: e\n    handler: h\n    rate_limit: {key: customer.id, limit: 1, per: 1s, burst: 2}\n  - name: f\n    handler: h\n    concurrency: 3\n";
    let problems = parse_template(text, "test").unwrap_err().0;
    let found: Vec<(&str, &str)> = problems
        .iter()
        .map(|p| (p.path.as_str(), p.code.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            ("steps[0].concurrency.limit", codes::INVALID_VALUE),
            ("steps[1].concurrency.key", codes::MISSING_KEY),
            ("steps[2].rate_limit.per", codes::INVALID_VALUE),
            ("steps[3].rate_limit.key", codes::INVALID_EXPRESSION),
            ("steps[4].rate_limit.burst", codes::UNKNOWN_KEY),
            ("steps[4].rate_limit.key", codes::INVALID_EXPRESSION),
            ("steps[5].concurrency", codes::NOT_AN_OBJECT),
        ],
        "{problems:#?}"
    );
    for (problem, step) in problems.iter().zip(["a", "b", "c", "d"]) {
        assert!(
            problem.message.contains(&format!("step `{step}`")),
            "{problem}"
        );
    }
    assert!(
        problems[5].message.contains("`customer`"),
        "{}",
        problems[5]
    );
}

#[test]
fn rate_windows_are_whole_seconds_minutes_or_hours_up_to_a_day() {
    for (per, ms) in [
        ("1s", 1_000),
        ("10s", 10_000),
        ("1m", 60_000),
        ("1h", 3_600_000),
        ("24h", 86_400_000),
    ] {
        assert_eq!(window_ms(per), Some(ms), "{per}");
    }
    for per in [
        "", "s", "0s", "25h", "1.5s", "-1s", "1d", "100ms", " 1s", "1 s",
    ] {
        assert_eq!(window_ms(per), None, "{per:?}");
    }
}

#[test]
fn a_template_concurrency_is_a_list_of_keys_limits_and_what_to_do_past_them() {
    let text = "namespace: shop\nname: import\nconcurrency:\n  - {key: context.customer, limit: 1}\n  - {key: \"'all'\", limit: 10, on_limit: cancel_oldest}\nsteps:\n  - {name: a, handler: h}\n";
    let definition = parse_template(text, "test").unwrap();
    assert_eq!(
        definition.concurrency,
        [
            TaskConcurrency {
                key: "context.customer".into(),
                limit: 1,
                on_limit: OnLimit::Queue
            },
            TaskConcurrency {
                key: "'all'".into(),
                limit: 10,
                on_limit: OnLimit::CancelOldest
            },
        ]
    );
    let context = json!({"customer": "c1"});
    let limits = definition
        .limit_keys(KeyInputs {
            context: &context,
            tags: &json!([]),
            priority: 5,
        })
        .unwrap();
    assert_eq!(
        limits.task,
        [
            TaskKey {
                key: "shop/import=c1".into(),
                limit: 1,
                on_limit: OnLimit::Queue
            },
            TaskKey {
                key: "shop/import#1=all".into(),
                limit: 10,
                on_limit: OnLimit::CancelOldest
            },
        ]
    );
    assert!(limits.steps.is_empty(), "no step has a limit");

    let bad = "namespace: shop\nname: import\nconcurrency:\n  - {key: context.customer, limit: 1, on_limit: drop}\n  - {key: \"context.\", limit: 1}\n  - {limit: 0}\nsteps:\n  - {name: a, handler: h}\n";
    let problems = parse_template(bad, "test").unwrap_err().0;
    let found: Vec<(&str, &str)> = problems
        .iter()
        .map(|p| (p.path.as_str(), p.code.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            ("concurrency[0].on_limit", codes::INVALID_VALUE),
            ("concurrency[1].key", codes::INVALID_EXPRESSION),
            ("concurrency[2].key", codes::MISSING_KEY),
            ("concurrency[2].limit", codes::INVALID_VALUE),
        ],
        "{problems:#?}"
    );
    let one = "namespace: shop\nname: import\nconcurrency: {key: context.customer, limit: 1}\nsteps:\n  - {name: a, handler: h}\n";
    let problems = parse_template(one, "test").unwrap_err().0;
    assert_eq!(problems[0].path, "concurrency");
    assert_eq!(problems[0].code, codes::WRONG_TYPE);
}

#[test]
fn a_template_timeout_is_a_span_from_a_second_to_a_year() {
    let text = |timeout: &str| {
        format!(
            "namespace: shop\nname: t\ntimeout: {timeout}\nsteps:\n  - {{name: a, handler: h}}\n"
        )
    };
    let definition = parse_template(&text("30m"), "production").unwrap();
    assert_eq!(definition.timeout.as_deref(), Some("30m"));
    assert_eq!(definition.timeout_ms(), Some(1_800_000));
    let stored: TemplateDefinition =
        serde_json::from_value(serde_json::to_value(&definition).unwrap()).unwrap();
    assert_eq!(stored, definition, "the stored form reads back");
    assert_eq!(timeout_ms("366d"), Some(366 * 86_400_000));
    // A bare number reads as YAML's integer: a wrong type, with the same path.
    assert_eq!(problems(&text("30"))[0].path, "timeout");
    for bad in ["0s", "367d", "30x", "1w", "soon"] {
        let found = problems(&text(bad));
        assert_eq!(found.len(), 1, "{bad}: {found:?}");
        assert_eq!(found[0].path, "timeout", "{bad}");
        assert_eq!(found[0].code, codes::INVALID_VALUE, "{bad}");
    }
    let plain = parse_template(
        "namespace: shop\nname: t\nsteps:\n  - {name: a, handler: h}\n",
        "production",
    )
    .unwrap();
    assert_eq!(plain.timeout_ms(), None);
}

#[test]
fn a_condition_sees_context_parents_and_task_and_must_give_a_boolean() {
    let definition = parse_template(
        "namespace: shop\nname: t\nsteps:\n  - {name: a, handler: h}\n  - {name: b, handler: h, depends_on: [a], when: \"parents.a.total > context.min && task.priority > 3\"}\n",
        "production",
    )
    .unwrap();
    let when = definition.steps[1].when.as_deref().unwrap();
    let task = condition_task(&definition, 5, &json!([]));
    let context = json!({"min": 10});
    assert_eq!(
        evaluate_condition(when, &context, &json!({"a": {"total": 12}}), &task),
        Ok(true)
    );
    assert_eq!(
        evaluate_condition(when, &context, &json!({"a": {"total": 8}}), &task),
        Ok(false)
    );
    let missing = evaluate_condition(when, &context, &json!({}), &task).unwrap_err();
    assert!(missing.contains("failed"), "{missing}");
    let not_bool = evaluate_condition("context.min", &context, &json!({}), &task).unwrap_err();
    assert!(not_bool.contains("not a boolean"), "{not_bool}");

    let found = problems(
        "namespace: shop\nname: t\nsteps:\n  - {name: a, handler: h, when: \"item == 1\"}\n",
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "steps[0].when");
    assert_eq!(found[0].code, codes::INVALID_EXPRESSION);
    assert!(found[0].message.contains("`item`"), "{}", found[0].message);
}

#[test]
fn a_schedule_whose_context_the_schema_refuses_is_refused() {
    let found = problems(concat!(
        "namespace: clock\nname: nightly\n",
        "context_schema: {type: object, required: [day], properties: {day: {type: string}}}\n",
        "steps:\n  - {name: run, handler: tasker.noop}\n",
        "schedules:\n",
        "  - {name: fine, cron: '0 2 * * *', context: {day: mon}}\n",
        "  - {name: typed, cron: '0 3 * * *', context: {day: 7}}\n",
        "  - {name: bare, cron: '0 4 * * *'}\n",
    ));
    let at = paths_and_codes(&found);
    assert_eq!(
        at,
        [
            ("schedules[1].context/day", codes::SCHEMA),
            ("schedules[2].context", codes::SCHEMA)
        ],
        "{found:?}"
    );
}

#[test]
fn expressions_too_large_to_run_safely_are_refused_and_those_within_the_limits_run() {
    let template = |when: &str| {
        format!("namespace: shop\nname: t\nsteps:\n  - {{name: a, handler: h, when: \"{when}\"}}\n")
    };
    let chain = |terms: usize| vec!["1"; terms].join(" + ");
    // Each would overflow the stack of the thread evaluating it, or compiling it: a chain
    // of operators, a path of fields, of indexes, one hidden after a comment (which holds
    // a quote), and a source too long.
    for (when, said) in [
        (format!("{} > 0", chain(100_000)), "too long"),
        (format!("{} > 0", chain(300)), "nests too deep"),
        (
            format!("has(context{})", ".a".repeat(600)),
            "nests too deep",
        ),
        (
            format!("context{} == 1", "[0]".repeat(400)),
            "nests too deep",
        ),
        (
            format!("context.x > 0 // don't\\n || {} > 0", chain(1_000)),
            "nests too deep",
        ),
    ] {
        let found = problems(&template(&when));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, "steps[0].when");
        assert_eq!(found[0].code, codes::INVALID_EXPRESSION);
        assert!(found[0].message.contains(said), "{}", found[0].message);
        assert!(found[0].message.len() < 400, "{}", found[0].message);
    }
    // Operators inside string literals are no levels.
    let quoted = format!(
        "'{}' != '' && \\\"{}\\\" != ''",
        "+".repeat(1000),
        "-".repeat(1000)
    );
    parse_template(&template(&quoted), "production").unwrap();

    // Within the limits, compiled and evaluated on a thread with a 2 MiB stack (a
    // runtime thread's).
    // The charges that bound an evaluation's work wrap operands that are not literals,
    // which nests such a chain twice as deep when it is evaluated.
    let terms = MAX_EXPRESSION_DEPTH - 16;
    let when = format!(
        "{} == {terms} && {}1{} == 1",
        chain(terms),
        "(".repeat(32),
        ")".repeat(32)
    );
    let read = format!("{} > 0", vec!["context.one"; terms].join(" + "));
    let outcome = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let mut outcomes = Vec::new();
            for when in [when, read] {
                parse_template(&template(&when), "production").map(|_| ())?;
                outcomes.push(evaluate_condition(
                    &when,
                    &json!({"one": 1}),
                    &json!({}),
                    &json!({}),
                ));
            }
            Ok::<_, TemplateError>(outcomes)
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(outcome.unwrap(), [Ok(true), Ok(true)]);
}

#[test]
fn macros_bind_their_own_variables_and_other_names_are_refused() {
    let template = |when: &str| {
        format!(
            "namespace: shop\nname: t\nsteps:\n  - {{name: a, handler: h}}\n  - {{name: b, handler: h, depends_on: [a], when: \"{when}\"}}\n"
        )
    };
    for when in [
        "context.items.all(i, i.qty > 0)",
        "context.items.exists(i, parents.a.skus.exists(s, s == i.sku))",
        "context.items.map(i, i.qty).filter(q, q > 1).size() == 0",
    ] {
        parse_template(&template(when), "production").unwrap();
    }
    let context = json!({"items": [{"sku": "x", "qty": 2}, {"sku": "y", "qty": 1}]});
    let parents = json!({"a": {"skus": ["y"]}});
    assert_eq!(
        evaluate_condition(
            "context.items.exists(i, parents.a.skus.exists(s, s == i.sku))",
            &context,
            &parents,
            &json!({}),
        ),
        Ok(true)
    );
    assert_eq!(
        evaluate_list(
            "context.items.map(i, i.qty)",
            &context,
            &parents,
            &json!({})
        ),
        Ok(vec![json!(2), json!(1)])
    );

    // A name a macro binds is the macro's only: outside it, or another name, is refused.
    for (when, named) in [
        ("context.items.all(i, i.qty > 0) && i.qty > 0", "`i`"),
        ("context.items.all(i, item.qty > 0)", "`item`"),
    ] {
        let found = problems(&template(when));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].code, codes::INVALID_EXPRESSION);
        assert!(
            found[0].message.contains(&format!("uses {named};")),
            "{}",
            found[0].message
        );
    }
}

#[test]
fn an_evaluation_that_does_more_work_than_an_expression_may_fails() {
    let items: Vec<Value> = (0..20_000)
        .map(|id| json!({"id": id, "sku": format!("sku-{id}")}))
        .collect();
    // A pattern of a megabyte with a small program.
    let pattern = format!("(?x){}a", " ".repeat(1 << 20));
    let context = json!({
        "items": items,
        "text": "x".repeat(500_000),
        "pattern": pattern,
        "zeros": vec![0; 100_000],
        "flags": vec![true; 200_000],
    });
    let run = |when: &str| evaluate_condition(when, &context, &json!({}), &json!({}));
    // Linear work over 20,000 items, or a 500 KB text, runs (a pass costs about 80,000
    // units: an item, its two fields and their values).
    for when in [
        "context.items.all(i, i.id >= 0 && i.sku.startsWith('sku-'))",
        "context.items.filter(i, i.sku.endsWith('0')).size() == 2000",
        "context.items.map(i, i.sku).exists(s, s == 'sku-19999')",
        "context.items.all(i, i.sku.matches('^sku-[0-9]+$'))",
        "size(context.text) == 500000 && !context.text.contains('y')",
    ] {
        assert_eq!(run(when), Ok(true), "{when}");
    }
    // Comparing each item with every other (400 million comparisons), copying the list
    // into each element of a list (hundreds of MB), or reading the text at each item,
    // stops with its units spent.
    let mut costly = vec![
        "context.items.all(a, context.items.exists_one(b, a.id == b.id))".to_owned(),
        "context.items.map(i, context.items).size() > 0".to_owned(),
        "context.items.all(i, !context.text.contains(i.sku))".to_owned(),
        // An error beside `||` does not make the spent units true.
        "context.items.all(a, context.items.exists_one(b, a.id == b.id)) || true".to_owned(),
    ];
    // Loops over lists written in the expression, 64 million steps of each macro, and
    // 512,000 lookups of a megabyte (the pattern, a map's key).
    let zeros = |n: usize| format!("[{}]", vec!["0"; n].join(","));
    let z = zeros(400);
    costly.extend([
        format!("{z}.exists_one(a, {z}.exists_one(b, {z}.exists_one(c, true)))"),
        format!("{z}.filter(a, {z}.filter(b, {z}.filter(c, false) == []) == []) == []"),
        format!("{z}.map(a, {z}.map(b, {z}.map(c, 1))).size() == 0"),
    ]);
    let z = zeros(80);
    for lookup in [
        "''.matches(context.pattern)",
        "{'k': 0}[context.pattern] == 0 || true",
    ] {
        costly.push(format!("{z}.all(a, {z}.all(b, {z}.all(c, {lookup})))"));
    }
    // A path of 250 fields at each of 100,000 steps (CEL would try each of its prefixes
    // as a variable's name).
    costly.push(format!(
        "context.zeros.exists(x, context{} == 1)",
        ".aaaaaaaaaaaaaaa".repeat(250)
    ));
    // Steps whose syntax is long: 1,300 operands, or literal texts of 2 and 1 KB
    // searched, at each of 200,000 steps.
    costly.push(format!(
        "context.flags.all(b, {})",
        vec!["b"; 1_300].join("&&")
    ));
    costly.push(format!(
        "context.flags.all(b, !'{}'.contains('{}b'))",
        "a".repeat(2_000),
        "a".repeat(1_000)
    ));
    for when in &costly {
        let error = run(when).unwrap_err();
        assert!(
            error.contains(&format!(
                "did more work than an expression may: more than {MAX_EXPRESSION_COST} units"
            )),
            "{when}: {error}"
        );
    }
    // A pattern is paid for and compiled once per evaluation, and a pattern whose
    // program would be too large is refused, not compiled for each item.
    let error = run(&format!(
        "context.items.all(i, !i.sku.matches('{}'))",
        "\\\\w{50}".repeat(20)
    ))
    .unwrap_err();
    assert!(error.contains("not a pattern it can use"), "{error}");
    // The same expression over a small context is within its units.
    assert_eq!(
        evaluate_condition(
            "context.items.all(a, context.items.exists_one(b, a.id == b.id))",
            &json!({"items": [{"id": 1}, {"id": 2}, {"id": 3}]}),
            &json!({}),
            &json!({}),
        ),
        Ok(true)
    );
}

#[test]
fn a_tasker_engine_step_the_coordinator_runs_has_its_config_checked() {
    let legacy = |steps: &str| {
        format!(
            "name: waits\nnamespace_name: shop\nversion: 1.0.0\ntask_handler_class: Waits\nstep_templates:\n{steps}"
        )
    };
    let found = problems(&legacy(concat!(
        "  - {name: hold, handler_class: tasker.wait}\n",
        "  - {name: child, handler_class: tasker.task, handler_config: {namespace: shop, colour: red}}\n",
    )));
    let at = paths_and_codes(&found);
    assert_eq!(
        at,
        [
            ("step_templates[0].handler_config", "missing_key"),
            ("step_templates[1].handler_config.colour", "unknown_key"),
            ("step_templates[1].handler_config.name", "missing_key"),
        ],
        "{found:#?}"
    );
    assert!(
        found[0].message.contains("needs `handler_config: {signal"),
        "{}",
        found[0].message
    );
    // Written as the project format takes it, under `handler_config`, it registers.
    parse_template(
        &legacy("  - {name: hold, handler_class: tasker.wait, handler_config: {signal: go, timeout: 1h}}\n"),
        "production",
    )
    .unwrap();
}

#[test]
fn many_environment_overrides_of_many_steps_are_refused_quickly() {
    // 40,000 steps and as many overrides, through one alias each: the overrides used to
    // be matched against every step (1.6 billion comparisons).
    let uses = "\n  - *s".repeat(40_000);
    let overrides = "\n      - *s".repeat(40_000);
    let text = format!(
        "name: big\nnamespace_name: shop\nversion: 1.0.0\ntask_handler_class: Big\n\
         step_templates:\n  - &s {{name: a, handler_class: H}}{uses}\n\
         environments:\n  production:\n    step_templates:{overrides}\n"
    );
    let started = std::time::Instant::now();
    let error = parse_template(&text, "production").unwrap_err();
    assert!(codes_of(&error).contains(&"too_many_steps"), "{error:#?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_backoff_schedule_longer_than_a_steps_attempts_is_refused() {
    let delays = vec!["1"; 101].join(", ");
    let found = problems(&format!(
        "namespace: shop\nname: t\ndefaults:\n  backoff: {{schedule: [{delays}]}}\nsteps:\n  - {{name: a, handler: h}}\n"
    ));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "defaults.backoff.schedule");
    assert!(
        found[0].message.contains("101 delays; at most 100"),
        "{}",
        found[0].message
    );
    let delays = vec!["1"; 100].join(", ");
    parse_template(
        &format!("namespace: shop\nname: t\nsteps:\n  - {{name: a, handler: h, backoff: {{schedule: [{delays}]}}}}\n"),
        "production",
    )
    .unwrap();
}

#[test]
fn a_version_longer_than_an_index_takes_is_refused() {
    let long = format!("1.0.0-{}", "a".repeat(4_000));
    let found = problems(&format!(
        "namespace: shop\nname: t\nversion: \"{long}\"\nsteps:\n  - {{name: a, handler: h}}\n"
    ));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "version");
    assert!(
        found[0].message.contains("at most 64"),
        "{}",
        found[0].message
    );
    let fits = format!("1.0.0-{}", "a".repeat(58));
    parse_template(
        &format!(
            "namespace: shop\nname: t\nversion: \"{fits}\"\nsteps:\n  - {{name: a, handler: h}}\n"
        ),
        "production",
    )
    .unwrap();
}

#[test]
fn step_concurrency_keys_of_different_templates_never_meet() {
    let key = |text: &str| {
        let definition = parse_template(text, "production").unwrap();
        let context = json!({});
        let keys = definition
            .limit_keys(KeyInputs {
                context: &context,
                tags: &json!([]),
                priority: 5,
            })
            .unwrap()
            .steps;
        keys[0].concurrency.clone().unwrap().0
    };
    let orders = key(
        "namespace: shop\nname: orders\nsteps:\n  - {name: v2.charge, handler: h, concurrency: {key: \"'all'\", limit: 1}}\n",
    );
    let orders_v2 = key(
        "namespace: shop\nname: orders.v2\nsteps:\n  - {name: charge, handler: h, concurrency: {key: \"'all'\", limit: 1}}\n",
    );
    assert_ne!(orders, orders_v2);
}

#[test]
fn tasker_engine_booleans_written_as_yaml_1_1_are_read_as_booleans() {
    let definition = parse_template(
        "name: flags\nnamespace_name: shop\nversion: 1.0.0\ntask_handler_class: Flags\nconcurrent: Yes\n\
         step_templates:\n  - {name: a, handler_class: A, default_retryable: no, skippable: on}\n  - {name: b, handler_class: B, default_retryable: YES, skippable: Off}\n",
        "production",
    )
    .unwrap();
    assert_eq!(
        (definition.steps[0].retryable, definition.steps[0].skippable),
        (false, true)
    );
    assert_eq!(
        (definition.steps[1].retryable, definition.steps[1].skippable),
        (true, false)
    );
    // Anything else is still refused, naming the key.
    let found = problems(
        "name: flags\nnamespace_name: shop\nversion: 1.0.0\ntask_handler_class: Flags\nstep_templates:\n  - {name: a, handler_class: A, default_retryable: maybe}\n",
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "step_templates[0].default_retryable");
}

#[test]
fn a_tasker_engine_environment_invalid_once_merged_is_refused_whichever_is_selected() {
    let text = "name: envs\nnamespace_name: shop\nversion: 1.0.0\ntask_handler_class: Envs\n\
        step_templates:\n  - {name: a, handler_class: A}\n  - {name: b, handler_class: B, depends_on_step: a}\n\
        environments:\n  development:\n    step_templates:\n      - {name: a, handler_config: {url: http://localhost}}\n\
        \x20 production:\n    step_templates:\n      - {name: b, default_retry_limit: 0}\n";
    for selected in ["development", "production", "test"] {
        let found = problems_in(text, selected);
        let at: Vec<&str> = found.iter().map(|p| p.path.as_str()).collect();
        if selected == "production" {
            assert_eq!(at, ["step_templates[1].default_retry_limit"], "{found:#?}");
        } else {
            assert_eq!(at, ["environments.production"], "{found:#?}");
            assert!(
                found[0]
                    .message
                    .contains("step_templates[1].default_retry_limit"),
                "{}",
                found[0].message
            );
        }
    }
    // Each environment valid: it registers.
    parse_template(
        &text.replace("default_retry_limit: 0", "default_retry_limit: 5"),
        "test",
    )
    .unwrap();
}

fn problems_in(text: &str, environment: &str) -> Vec<Problem> {
    match parse_template(text, environment) {
        Ok(definition) => panic!("expected problems, got {definition:?}"),
        Err(error) => error.0,
    }
}
