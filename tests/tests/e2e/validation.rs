//! Bad input gets a 4xx that names every problem; idempotency keys make creation safe to
//! repeat.

use serde_json::{Value, json};
use tasker_tests::{StatusCode, TestEnv};

const CHECKOUT: &str = r#"
namespace: shop
name: checkout
version: 1.2.0
description: Take an order
context_schema:
  type: object
  required: [order_id, email]
  properties:
    order_id: {type: integer, minimum: 1}
    email: {type: string}
  additionalProperties: false
steps:
  - name: validate
    handler: tasker.noop
  - name: charge
    handler: tasker.noop
    depends_on: [validate]
"#;

#[tokio::test]
async fn a_context_that_breaks_the_schema_is_refused_naming_each_field() {
    let env = TestEnv::start("context").await.unwrap();
    let (status, _) = env.register_template(CHECKOUT).await.unwrap();
    assert_eq!(status, StatusCode::CREATED);

    let (status, body) = env
        .create_task(json!({"namespace": "shop", "name": "checkout", "context": {"order_id": 0, "coupon": "X"}}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "invalid_context");
    let details = body["error"]["details"].as_array().unwrap();
    let text = serde_json::to_string(details).unwrap();
    assert!(text.contains("/order_id"), "order_id not named: {text}");
    assert!(text.contains("email"), "missing email not named: {text}");
    assert!(
        text.contains("coupon"),
        "unexpected coupon not named: {text}"
    );

    // Nothing was created.
    let (_, page) = env.get("/v1/tasks").await.unwrap();
    assert!(page["tasks"].as_array().unwrap().is_empty());

    // And a valid one is.
    let (status, task) = env
        .create_task(json!({"namespace": "shop", "name": "checkout", "context": {"order_id": 7, "email": "a@b.c"}}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{task}");
    assert_eq!(task["version"], "1.2.0");
    assert_eq!(task["steps"].as_array().unwrap().len(), 2);
    env.finish().await.unwrap();
}

#[tokio::test]
async fn an_invalid_template_is_refused_with_every_problem_in_one_answer() {
    let env = TestEnv::start("template").await.unwrap();
    let broken = r#"
namespace: shop
name: broken
steps:
  - name: a
    handler: tasker.noop
    depends_on: [c]
  - name: b
    handler: tasker.noop
    depends_on: [a]
  - name: c
    handler: tasker.noop
    depends_on: [b]
  - name: d
    handler: tasker.noop
    depends_on: [nowhere]
  - name: d
    handler: tasker.noop
  - name: e
    handlr: tasker.noop
"#;
    let (status, body) = env.register_template(broken).await.unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "invalid_template");
    let details = body["error"]["details"].as_array().unwrap();
    let codes: Vec<&str> = details
        .iter()
        .map(|d| d["code"].as_str().unwrap())
        .collect();
    for expected in [
        "cycle",
        "unknown_dependency",
        "duplicate_step",
        "unknown_key",
    ] {
        assert!(
            codes.contains(&expected),
            "{expected} missing from {codes:?}"
        );
    }
    let cycle = details.iter().find(|d| d["code"] == "cycle").unwrap()["message"]
        .as_str()
        .unwrap();
    for step in ["a", "b", "c"] {
        assert!(
            cycle.contains(step),
            "the cycle message should name {step}: {cycle}"
        );
    }
    let unknown = details
        .iter()
        .find(|d| d["code"] == "unknown_dependency")
        .unwrap()["message"]
        .as_str()
        .unwrap();
    assert!(unknown.contains("nowhere"), "{unknown}");

    // Malformed YAML is a 400; an unknown template a 404; nothing was registered.
    let (status, body) = env.register_template("steps: [unclosed").await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = env.get("/v1/templates/shop/broken").await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "template_not_found");
    env.finish().await.unwrap();
}

#[tokio::test]
async fn registering_is_idempotent_and_versions_are_immutable() {
    let env = TestEnv::start("versions").await.unwrap();
    let (status, first) = env.register_template(CHECKOUT).await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    let (status, again) = env.register_template(CHECKOUT).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first, again);
    let changed = CHECKOUT.replace(
        "handler: tasker.noop\n    depends_on",
        "handler: tasker.echo\n    depends_on",
    );
    let (status, body) = env.register_template(&changed).await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let newer = changed.replace("version: 1.2.0", "version: 1.10.0");
    let (status, _) = env.register_template(&newer).await.unwrap();
    assert_eq!(status, StatusCode::CREATED);

    // Latest by semver (1.10.0 > 1.2.0), or the version asked for.
    let (_, latest) = env.get("/v1/templates/shop/checkout").await.unwrap();
    assert_eq!(latest["version"], "1.10.0");
    assert_eq!(latest["steps"][1]["handler"], "tasker.echo");
    assert_eq!(latest["steps"][1]["depends_on"], json!(["validate"]));
    let (_, older) = env
        .get("/v1/templates/shop/checkout?version=1.2.0")
        .await
        .unwrap();
    assert_eq!(older["steps"][1]["handler"], "tasker.noop");
    let (_, list) = env.get("/v1/templates").await.unwrap();
    let versions: Vec<&str> = list["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["1.2.0", "1.10.0"]);
    assert_eq!(list["templates"][0]["step_count"], 2);
    env.finish().await.unwrap();
}

#[tokio::test]
async fn the_same_idempotency_key_twice_yields_one_task() {
    let env = TestEnv::start("idempotency").await.unwrap();
    env.register_template(CHECKOUT).await.unwrap();
    let request = json!({"namespace": "shop", "name": "checkout", "idempotency_key": "order-7",
        "context": {"order_id": 7, "email": "a@b.c"}, "initiator": "test", "tags": ["web"]});
    let (first_status, first) = env.create_task(request.clone()).await.unwrap();
    let (second_status, second) = env.create_task(request.clone()).await.unwrap();
    assert_eq!(first_status, StatusCode::CREATED, "{first}");
    assert_eq!(second_status, StatusCode::OK, "{second}");
    assert_eq!(first["task_id"], second["task_id"]);
    assert_eq!(second["initiator"], "test");
    let (_, page) = env.get("/v1/tasks").await.unwrap();
    assert_eq!(page["tasks"].as_array().unwrap().len(), 1);

    // A newer version registered since: the same request (naming no version) still
    // finds its task; one naming another version is a conflict.
    let (status, body) = env
        .register_template(&CHECKOUT.replace("version: 1.2.0", "version: 1.3.0"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, again) = env.create_task(request.clone()).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["task_id"], first["task_id"]);
    let mut pinned = request.clone();
    pinned["version"] = json!("1.3.0");
    let (status, body) = env.create_task(pinned).await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // The same key for a different request is a conflict, not a silent reuse.
    let mut other = request.clone();
    other["context"]["order_id"] = json!(8);
    let (status, body) = env.create_task(other).await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "idempotency_conflict");

    // A repeat is answered with its task, not judged again against what changed since:
    // the newest version's schema now wants a field the first request did not send...
    let (status, body) = env
        .register_template(
            &CHECKOUT
                .replace("version: 1.2.0", "version: 1.4.0")
                .replace(
                    "required: [order_id, email]",
                    "required: [order_id, email, phone]",
                )
                .replace(
                    "email: {type: string}",
                    "email: {type: string}\n    phone: {type: string}",
                ),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, again) = env.create_task(request.clone()).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["task_id"], first["task_id"]);
    // ... and a deadline passed since the first request.
    let deadline = (chrono::Utc::now() + chrono::TimeDelta::milliseconds(1_500)).to_rfc3339();
    let mut timed = json!({"namespace": "shop", "name": "checkout", "version": "1.2.0",
        "idempotency_key": "order-9", "deadline": deadline,
        "context": {"order_id": 9, "email": "a@b.c"}});
    let (status, made) = env.create_task(timed.clone()).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{made}");
    tokio::time::sleep(std::time::Duration::from_millis(2_000)).await;
    let (status, again) = env.create_task(timed.clone()).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["task_id"], made["task_id"]);
    // Without its key the same late request is judged as new: refused.
    timed.as_object_mut().unwrap().remove("idempotency_key");
    let (status, body) = env.create_task(timed).await.unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    // A float that `jsonb` stores as an integer is the same number when repeated.
    let (status, body) = env
        .register_template(
            "namespace: shop\nname: loose\nsteps:\n  - {name: a, handler: tasker.noop}\n",
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let big = r#"{"namespace": "shop", "name": "loose", "idempotency_key": "big", "context": {"n": 1e16, "m": [2.5, 3.0]}}"#;
    let big: Value = serde_json::from_str(big).unwrap();
    let (status, made) = env.create_task(big.clone()).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let (status, again) = env.create_task(big).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["task_id"], made["task_id"]);
    env.finish().await.unwrap();
}

#[tokio::test]
async fn malformed_requests_get_a_4xx_naming_every_problem() {
    let env = TestEnv::start("malformed").await.unwrap();
    env.register_template(CHECKOUT).await.unwrap();
    let post = |body: &'static str| {
        env.http
            .post(format!("{}/v1/tasks", env.base_url))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let response = post("{not json").await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "malformed_request");

    let response = post(r#"{"namespace": 5, "context": [], "colour": "red", "reason": 1}"#)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = response.json().await.unwrap();
    let paths = crate::detail_paths(&body);
    for expected in ["namespace", "name", "context", "colour", "reason"] {
        assert!(
            paths.iter().any(|p| p == expected),
            "{expected} not named in {body}"
        );
    }

    let (status, body) = env
        .create_task(json!({"namespace": "shop", "name": "nope"}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "template_not_found");
    let (status, body) = env.get("/v1/tasks/not-a-uuid").await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = env
        .get(&format!("/v1/tasks/{}", uuid::Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = env.get("/v1/nothing-here").await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, ready) = env.get("/health/ready").await.unwrap();
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["checks"], json!({"database": "ok", "broker": "ok"}));
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_creation_with_problems_of_every_kind_names_them_all_in_one_answer() {
    let env = TestEnv::start("every_kind").await.unwrap();
    let (status, body) = env
        .register_template(
            r#"
namespace: shop
name: picky
context_schema:
  type: object
  required: [order_id]
  properties:
    order_id: {type: integer}
steps:
  - name: check
    handler: tasker.noop
    when: "context.amount > 10"
  - name: ship
    handler: tasker.noop
    concurrency: {key: context.warehouse, limit: 2}
  - name: wrap
    handler: tasker.noop
    skippable: true
"#,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // The context breaks the schema, the bypass list names a step that is not skippable
    // and one that does not exist, the first step's condition and the step's key cannot
    // be evaluated for this context: one answer, every problem.
    let (status, body) = env
        .create_task(
            json!({"namespace": "shop", "name": "picky", "context": {"order_id": "x"},
                            "bypass_steps": ["ship", "nope"]}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "invalid_context", "{body}");
    let paths = crate::detail_paths(&body);
    for path in [
        "/order_id",
        "bypass_steps[0]",
        "bypass_steps[1]",
        "steps[0].when",
        "steps[1].concurrency.key",
    ] {
        assert!(
            paths.iter().any(|p| p == path),
            "{path} not named: {paths:?}"
        );
    }
    env.finish().await.unwrap();
}
