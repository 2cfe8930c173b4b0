//! Hostile HTTP input: every bad request is a 4xx in the error shape of `docs/api.md`
//! that names the problem, never a 500 or a hang, and the coordinator serves on afterwards.
//!
//! Each test ends with [`still_serving`], which also checks that the coordinator logged no
//! `request failed` (the line every 500 writes).

use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tasker_tests::http_stub::{self, HttpStub};
use tasker_tests::{EnvOptions, StatusCode, TestEnv};

const TEMPLATE: &str = r#"
namespace: hostile
name: target
version: 1.0.0
steps:
  - name: only
    handler: tasker.noop
"#;

/// A template whose context schema recurses: `nest` is a list of lists of ... of integers.
const RECURSIVE_SCHEMA: &str = r##"
namespace: hostile
name: nested
version: 1.0.0
context_schema:
  type: object
  properties:
    nest: {$ref: "#/$defs/n"}
  $defs:
    n:
      type: [integer, array]
      items: {$ref: "#/$defs/n"}
steps:
  - name: only
    handler: tasker.noop
"##;

/// One answer: status, headers, and the body as JSON (`Value::Null` when it is not JSON,
/// which fails every assertion on the error shape below).
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
    bytes: usize,
}

async fn send(
    env: &TestEnv,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> Answer {
    let mut request = env
        .http
        .request(method.clone(), format!("{}{path}", env.base_url))
        .timeout(Duration::from_secs(60))
        .body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|error| panic!("{method} {path}: no answer: {error}"));
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("the body");
    Answer {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        bytes: bytes.len(),
    }
}

/// The answer is `status` with error code `code`, and its text (message and details)
/// contains every one of `needles`.
#[track_caller]
fn refused(answer: &Answer, what: &str, status: StatusCode, code: &str, needles: &[&str]) {
    assert_eq!(answer.status, status, "{what}: {}", answer.body);
    let error = &answer.body["error"];
    assert_eq!(error["code"], code, "{what}: {}", answer.body);
    assert!(
        error["message"].is_string() && error["details"].is_array(),
        "{what}: not the error shape: {}",
        answer.body
    );
    let text = error.to_string();
    for needle in needles {
        assert!(
            text.contains(needle),
            "{what}: the answer does not name {needle:?}: {text}"
        );
    }
}

/// A test's world whose coordinator is a process, with extra environment:
/// [`still_serving`] reads its log for the 500s it answered (an in-process coordinator
/// keeps no log).
async fn hostile_env(test: &str, coordinator_env: &[(&str, &str)]) -> TestEnv {
    let options = EnvOptions {
        coordinator_env: coordinator_env
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect(),
        binary_coordinator: true,
        ..EnvOptions::default()
    };
    TestEnv::start_with(test, options).await.unwrap()
}

/// The coordinator answers, is ready, still creates tasks, and never logged a 500.
async fn still_serving(env: &TestEnv) {
    let (status, _) = env.get("/health/live").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let (status, ready) = env.get("/health/ready").await.unwrap();
    assert_eq!(status, StatusCode::OK, "{ready}");
    let (status, task) = env
        .create_task(json!({"namespace": "hostile", "name": "target", "context": {"ok": true}}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let log = env.coordinator.log();
    assert!(
        !log.contains("request failed"),
        "the coordinator answered a 500:\n{log}"
    );
}

/// `depth` nested arrays around `inner`.
fn nested(depth: usize, inner: &str) -> String {
    format!("{}{inner}{}", "[".repeat(depth), "]".repeat(depth))
}

/// POST a template as JSON: most cases below send one.
async fn post_template(env: &TestEnv, template: impl Into<reqwest::Body>) -> Answer {
    send(
        env,
        Method::POST,
        "/v1/templates",
        Some("application/json"),
        template,
    )
    .await
}

/// The answer came in time: a hostile template costs bounded work.
fn answered_within(started: Instant, seconds: u64) {
    let took = started.elapsed();
    assert!(took < Duration::from_secs(seconds), "{took:?}");
}

/// A project-format template of `count` steps, each depending on the one before; with
/// `cycle`, the first depends on the last.
fn chain(name: &str, count: usize, cycle: bool) -> String {
    let steps: Vec<Value> = (0..count)
        .map(|i| {
            let parent = if i > 0 {
                Some(i - 1)
            } else if cycle {
                Some(count - 1)
            } else {
                None
            };
            match parent {
                Some(p) => json!({"name": format!("s{i}"), "handler": "tasker.noop",
                                  "depends_on": [format!("s{p}")]}),
                None => json!({"name": format!("s{i}"), "handler": "tasker.noop"}),
            }
        })
        .collect();
    json!({"namespace": "hostile", "name": name, "steps": steps}).to_string()
}

#[tokio::test]
async fn malformed_bodies_wrong_types_and_unknown_fields_are_named() {
    let env = hostile_env("hostile-bodies", &[]).await;
    let (status, body) = env.register_template(TEMPLATE).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let json = Some("application/json");
    let post = |path: &'static str, content_type: Option<&'static str>, body: String| {
        send(&env, Method::POST, path, content_type, body)
    };

    let answer = post("/v1/tasks", json, "{not json".into()).await;
    refused(
        &answer,
        "not JSON",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["not valid JSON"],
    );
    let answer = post("/v1/tasks", json, String::new()).await;
    refused(
        &answer,
        "empty body",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["EOF"],
    );
    let answer = post("/v1/tasks", None, String::new()).await;
    refused(
        &answer,
        "no body, no type",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["EOF"],
    );
    let answer = post("/v1/tasks", json, "\u{feff}\u{0}\u{1}".into()).await;
    refused(
        &answer,
        "binary",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["not valid JSON"],
    );
    let answer = post("/v1/tasks", json, "[1, 2]".into()).await;
    refused(
        &answer,
        "a list",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
        &["must be a JSON object", "an array"],
    );
    let answer = post("/v1/tasks", json, "null".into()).await;
    refused(
        &answer,
        "null",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
        &["must be a JSON object"],
    );

    // Wrong types and unknown fields: every one named, in one answer.
    let body = json!({"namespace": 5, "name": ["x"], "version": {}, "context": "text",
        "initiator": true, "source_system": 1.5, "reason": [], "idempotency_key": 7,
        "colour": "red", "NAMESPACE": "hostile"});
    let answer = post("/v1/tasks", json, body.to_string()).await;
    refused(
        &answer,
        "wrong types",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
        &[
            "must be a string, found a number",
            "unknown field `colour`",
            "must be a JSON object",
        ],
    );
    let paths = crate::detail_paths(&answer.body);
    for expected in [
        "namespace",
        "name",
        "version",
        "context",
        "initiator",
        "source_system",
        "reason",
        "idempotency_key",
        "colour",
        "NAMESPACE",
    ] {
        assert!(
            paths.iter().any(|p| p == expected),
            "{expected} not named in {paths:?}"
        );
    }
    // Thousands of unknown fields: named up to a cap, the rest counted; a small answer.
    let mut many = serde_json::Map::new();
    many.insert("namespace".into(), json!("hostile"));
    many.insert("name".into(), json!("target"));
    for i in 0..5_000 {
        many.insert(format!("field{i}"), json!(i));
    }
    let answer = post("/v1/tasks", json, Value::Object(many).to_string()).await;
    refused(
        &answer,
        "5,000 unknown fields",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
        &[
            "unknown field `field0`",
            "4950 more unknown fields are not listed",
        ],
    );
    assert!(answer.bytes < 20_000, "{} bytes", answer.bytes);
    // Too long: the limit is named.
    let answer = post(
        "/v1/tasks",
        json,
        json!({"namespace": "hostile", "name": "target", "initiator": "i".repeat(129)}).to_string(),
    )
    .await;
    refused(
        &answer,
        "long initiator",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
        &["`initiator` is longer than 128 characters"],
    );
    let answer = post(
        "/v1/tasks",
        json,
        json!({"namespace": "n".repeat(10_000), "name": "target"}).to_string(),
    )
    .await;
    refused(
        &answer,
        "long namespace",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
        &["`namespace` is longer than 128 characters"],
    );

    // Operator bodies: the same rules; an empty body is `{}`.
    let task = uuid::Uuid::new_v4();
    let cancel: &'static str = Box::leak(format!("/v1/tasks/{task}/cancel").into_boxed_str());
    let resolve: &'static str =
        Box::leak(format!("/v1/tasks/{task}/steps/only/resolve").into_boxed_str());
    let answer = post(cancel, json, "{\"reason\": ".into()).await;
    refused(
        &answer,
        "cancel, bad JSON",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["not valid JSON"],
    );
    let answer = post(cancel, json, r#"{"reason": 5, "force": true}"#.into()).await;
    refused(
        &answer,
        "cancel, wrong fields",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
        &["`reason` must be a string", "unknown field `force`"],
    );
    let answer = post(resolve, json, r#"{"result": {}}"#.into()).await;
    refused(
        &answer,
        "resolve, misspelt",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
        &["unknown field `result`"],
    );
    let answer = post(cancel, None, String::new()).await;
    refused(
        &answer,
        "cancel, unknown task",
        StatusCode::NOT_FOUND,
        "task_not_found",
        &[&task.to_string()],
    );

    // Content types that are not JSON (or YAML, for templates) are refused by name; what
    // `curl -d` sends is read as JSON (the README's examples use it).
    let body = json!({"namespace": "hostile", "name": "target"}).to_string();
    let answer = post("/v1/tasks", Some("application/xml"), body.clone()).await;
    refused(
        &answer,
        "xml",
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        &["application/xml", "application/json"],
    );
    let answer = post(
        "/v1/tasks",
        Some("multipart/form-data; boundary=x"),
        body.clone(),
    )
    .await;
    refused(
        &answer,
        "multipart",
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        &["multipart/form-data"],
    );
    let answer = post(cancel, Some("text/html"), r#"{"reason": "x"}"#.into()).await;
    refused(
        &answer,
        "cancel as html",
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        &["text/html"],
    );
    let answer = post("/v1/templates", Some("image/png"), TEMPLATE.into()).await;
    refused(
        &answer,
        "template as png",
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        &["image/png", "application/yaml"],
    );
    let answer = post(
        "/v1/tasks",
        Some("application/x-www-form-urlencoded"),
        body.clone(),
    )
    .await;
    assert_eq!(
        answer.status,
        StatusCode::CREATED,
        "curl -d: {}",
        answer.body
    );
    let answer = post(
        "/v1/tasks",
        Some("application/vnd.api+json; charset=utf-8"),
        body,
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED, "+json: {}", answer.body);

    // Templates: not UTF-8, not YAML, the wrong shape.
    let answer = send(
        &env,
        Method::POST,
        "/v1/templates",
        Some("application/yaml"),
        vec![0xff, 0xfe, 0x00],
    )
    .await;
    refused(
        &answer,
        "template not UTF-8",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["not UTF-8"],
    );
    let answer = post(
        "/v1/templates",
        Some("application/yaml"),
        "steps: [unclosed".into(),
    )
    .await;
    refused(
        &answer,
        "template not YAML",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["syntax"],
    );
    let answer = post("/v1/templates", Some("application/yaml"), String::new()).await;
    refused(
        &answer,
        "empty template",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_template",
        &["the template is empty"],
    );
    let answer = post(
        "/v1/templates",
        json,
        r#"{"namespace": 1, "steps": "a", "extra": true}"#.into(),
    )
    .await;
    refused(
        &answer,
        "template, wrong types",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_template",
        &["namespace", "steps", "extra"],
    );

    // Unknown methods on known paths: 405 in the error shape, with Allow.
    let answer = send(&env, Method::DELETE, "/v1/tasks", None, "").await;
    refused(
        &answer,
        "DELETE /v1/tasks",
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &["DELETE"],
    );
    let allow = answer
        .headers
        .get("allow")
        .expect("an Allow header")
        .to_str()
        .unwrap();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    let answer = send(&env, Method::PUT, "/v1/templates/hostile/target", None, "").await;
    refused(
        &answer,
        "PUT a template",
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &["PUT"],
    );

    still_serving(&env).await;
    env.finish().await.unwrap();
}

#[tokio::test]
async fn bad_ids_and_query_parameters_are_named() {
    let env = hostile_env("hostile-params", &[]).await;
    env.register_template(TEMPLATE).await.unwrap();
    let (status, task) = env
        .create_task(json!({"namespace": "hostile", "name": "target"}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let get = |path: String| {
        send(
            &env,
            Method::GET,
            Box::leak(path.into_boxed_str()),
            None,
            "",
        )
    };

    for path in [
        "/v1/tasks/not-a-uuid",
        "/v1/tasks/not-a-uuid/readiness",
        "/v1/tasks/not-a-uuid/transitions",
        "/v1/tasks/123",
        "/v1/tasks/' OR 1=1 --",
    ] {
        let answer = get(path.replace(' ', "%20")).await;
        refused(
            &answer,
            path,
            StatusCode::BAD_REQUEST,
            "malformed_request",
            &["is not a task id (UUID)", "task_id"],
        );
    }
    // A very long id is quoted only in part.
    let answer = get(format!("/v1/tasks/{}", "x".repeat(5_000))).await;
    refused(
        &answer,
        "long id",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["is not a task id"],
    );
    assert!(answer.bytes < 1_000, "{} bytes", answer.bytes);
    // Percent-encoding that is not UTF-8 (axum's own rejection is plain text).
    let answer = get("/v1/tasks/%FF%FE".into()).await;
    refused(
        &answer,
        "not UTF-8",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["UTF-8"],
    );
    let answer = get("/v1/templates/%C0/x".into()).await;
    refused(
        &answer,
        "template path not UTF-8",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["UTF-8"],
    );
    for action in ["cancel", "retry"] {
        let answer = send(
            &env,
            Method::POST,
            Box::leak(format!("/v1/tasks/nope/{action}").into_boxed_str()),
            None,
            "",
        )
        .await;
        refused(
            &answer,
            action,
            StatusCode::BAD_REQUEST,
            "malformed_request",
            &["`nope` is not a task id"],
        );
    }
    let answer = send(
        &env,
        Method::POST,
        "/v1/tasks/nope/steps/only/resolve",
        None,
        "",
    )
    .await;
    refused(
        &answer,
        "resolve",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["`nope` is not a task id"],
    );

    let cases: &[(&str, &str, &str)] = &[
        ("cursor=garbage", "cursor", "next_cursor"),
        ("cursor=", "cursor", "next_cursor"),
        ("limit=-1", "limit", "from 1 to 500"),
        ("limit=0", "limit", "from 1 to 500"),
        ("limit=501", "limit", "from 1 to 500"),
        ("limit=99999999999999999999999999", "limit", "from 1 to 500"),
        ("limit=ten", "limit", "from 1 to 500"),
        ("limit=1.5", "limit", "from 1 to 500"),
        ("status=bogus", "status", "unknown status `bogus`"),
        ("status=COMPLETE", "status", "unknown status"),
        ("colour=red", "colour", "unknown query parameter `colour`"),
    ];
    for (query, path, needle) in cases {
        let answer = get(format!("/v1/tasks?{query}")).await;
        refused(
            &answer,
            query,
            StatusCode::BAD_REQUEST,
            "malformed_request",
            &[*needle],
        );
        assert!(
            crate::detail_paths(&answer.body).iter().any(|p| p == path),
            "{query}: {}",
            answer.body
        );
    }
    // Every bad parameter at once.
    let answer = get("/v1/tasks?cursor=x&limit=-1&status=bogus".into()).await;
    let mut paths = crate::detail_paths(&answer.body);
    paths.sort();
    assert_eq!(paths, ["cursor", "limit", "status"], "{}", answer.body);
    // Good ones still work, SQL-looking filters match nothing and break nothing.
    let answer = get("/v1/tasks?limit=500&status=pending".into()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let answer = get(
        "/v1/tasks?namespace=%27%20OR%20%271%27%3D%271&name=x%3B%20DROP%20TABLE%20tasks%3B--"
            .into(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.body["tasks"], json!([]));
    // U+0000 in a lookup: no stored name holds it, so nothing matches (PostgreSQL would
    // refuse to compare with it: this was a 500).
    let (_, all) = env.get("/v1/tasks").await.unwrap();
    assert!(!all["tasks"].as_array().unwrap().is_empty(), "{all}");
    for query in [
        "namespace=%00",
        "name=a%00b",
        "namespace=hostile&name=target%00",
    ] {
        let answer = get(format!("/v1/tasks?{query}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{query}: {}", answer.body);
        assert_eq!(answer.body["tasks"], json!([]), "{query}");
    }
    // More than 20 tags is refused whatever the tags hold, U+0000 or nothing.
    let many = (0..19)
        .map(|i| format!("tag=t{i}"))
        .chain(["tag=a%00b".into(), "tag=".into()])
        .collect::<Vec<_>>()
        .join("&");
    let answer = get(format!("/v1/tasks?{many}")).await;
    refused(
        &answer,
        "21 tags",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["at most 20 `tag` parameters", "a tag must be 1 to"],
    );
    for path in [
        "/v1/templates/host%00ile/target",
        "/v1/templates/hostile/tar%00get",
        "/v1/templates/hostile/target?version=%00",
    ] {
        let answer = get(path.into()).await;
        refused(
            &answer,
            path,
            StatusCode::NOT_FOUND,
            "template_not_found",
            &["no template host"],
        );
    }
    let answer = get("/v1/templates/hostile/target?colour=1".into()).await;
    refused(
        &answer,
        "colour",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["unknown query parameter `colour`"],
    );
    let answer = get("/v1/templates/'%20OR%201=1%20--/x?version=1%27%3B--".into()).await;
    refused(
        &answer,
        "SQL in a template path",
        StatusCode::NOT_FOUND,
        "template_not_found",
        &["' OR 1=1 --"],
    );
    let task = uuid::Uuid::new_v4();
    let answer = send(
        &env,
        Method::POST,
        Box::leak(format!("/v1/tasks/{task}/steps/a%00b/resolve").into_boxed_str()),
        None,
        "",
    )
    .await;
    refused(
        &answer,
        "NUL step name",
        StatusCode::NOT_FOUND,
        "step_not_found",
        &["has no step `a\\\\0b`"],
    );
    let answer = get("/v1/no/such/route".into()).await;
    refused(
        &answer,
        "unknown route",
        StatusCode::NOT_FOUND,
        "route_not_found",
        &[],
    );

    still_serving(&env).await;
    env.finish().await.unwrap();
}

#[tokio::test]
async fn nul_characters_are_refused_where_they_are_not_stored() {
    let env = hostile_env("hostile-nul", &[]).await;
    env.register_template(TEMPLATE).await.unwrap();
    // PostgreSQL's text and jsonb cannot hold U+0000: each place is named, nothing is
    // stored, and it is a 422, not the database's error as a 500.
    let body = json!({"namespace": "hostile", "name": "target", "initiator": "a\u{0}b",
        "reason": "\u{0}", "idempotency_key": "k\u{0}",
        "context": {"plain": "ok", "text": "x\u{0}y", "list": ["fine", "\u{0}"], "key\u{0}": 1},
        "tags": ["\u{0}"]});
    let (status, answer) = env.create_task(body).await.unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_request");
    let paths = crate::detail_paths(&answer);
    for expected in [
        "initiator",
        "reason",
        "idempotency_key",
        "context/text",
        "context/list/1",
        "context/key\u{0}",
        "tags/0",
    ] {
        assert!(
            paths.iter().any(|p| p == expected),
            "{expected} not in {paths:?}"
        );
    }
    assert!(!paths.iter().any(|p| p == "context/plain"), "{paths:?}");
    assert!(answer.to_string().contains("U+0000"), "{answer}");
    let (status, body) = env
        .create_task(json!({"namespace": "host\u{0}ile", "name": "target"}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["details"][0]["path"], "namespace");

    // Operator bodies.
    let task = uuid::Uuid::new_v4();
    let (status, body) = env
        .post(
            &format!("/v1/tasks/{task}/cancel"),
            json!({"reason": "\u{0}"}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["details"][0]["path"], "reason");
    let (status, body) = env
        .post(
            &format!("/v1/tasks/{task}/steps/only/resolve"),
            json!({"results": {"a": ["\u{0}"]}}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["details"][0]["path"], "results/a/0");

    // Templates: in YAML (`\0`) and JSON (`\u0000`) escapes, in any string or key.
    let yaml = "namespace: hostile\nname: nul\ndescription: \"a\\0b\"\nsteps:\n  - name: a\n    handler: tasker.noop\n    config: {\"k\\0\": 1, v: \"\\0\"}\n";
    let (status, body) = env.register_template(yaml).await.unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "invalid_template");
    let text = body.to_string();
    for pointer in [
        "/description",
        "/steps/0/config/k\\u0000",
        "/steps/0/config/v",
    ] {
        assert!(text.contains(pointer), "{pointer} not named: {text}");
    }
    let json_template = r#"{"namespace": "hostile", "name": "nul\u0000", "steps": [{"name": "a", "handler": "tasker.noop"}]}"#;
    let (status, body) = env.register_template(json_template).await.unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.to_string().contains("\"path\":\"name\""), "{body}");
    let (_, list) = env.get("/v1/templates").await.unwrap();
    assert_eq!(list["templates"].as_array().unwrap().len(), 1, "{list}");

    still_serving(&env).await;
    env.finish().await.unwrap();
}

#[tokio::test]
async fn deep_nesting_is_refused_past_the_parser_limit_and_stored_below_it() {
    let env = hostile_env("hostile-deep", &[]).await;
    env.register_template(TEMPLATE).await.unwrap();
    let (status, body) = env.register_template(RECURSIVE_SCHEMA).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let json = Some("application/json");

    // 100,000 nested arrays: serde_json's recursion limit (128) makes it a 400, not a
    // stack overflow.
    let deep = format!(
        r#"{{"namespace": "hostile", "name": "target", "context": {{"a": {}}}}}"#,
        nested(100_000, "")
    );
    let started = Instant::now();
    let answer = send(&env, Method::POST, "/v1/tasks", json, deep).await;
    refused(
        &answer,
        "100,000 arrays",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["recursion limit exceeded"],
    );
    answered_within(started, 10);
    let deep_objects = format!(
        r#"{{"namespace": "hostile", "name": "target", "context": {}1{}}}"#,
        r#"{"a":"#.repeat(50_000),
        "}".repeat(50_000)
    );
    let answer = send(&env, Method::POST, "/v1/tasks", json, deep_objects).await;
    refused(
        &answer,
        "50,000 objects",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["recursion limit exceeded"],
    );
    // The same in templates, as JSON and as YAML.
    let template = format!(
        r#"{{"namespace": "hostile", "name": "deep", "steps": [{{"name": "a", "handler": "tasker.noop", "config": {}}}]}}"#,
        nested(100_000, "")
    );
    let answer = post_template(&env, template).await;
    refused(
        &answer,
        "deep JSON template",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["recursion limit exceeded"],
    );
    let template = format!(
        "namespace: hostile\nname: deep\nsteps:\n  - name: a\n    handler: tasker.noop\n    config: {}\n",
        nested(100_000, "")
    );
    let answer = send(
        &env,
        Method::POST,
        "/v1/templates",
        Some("application/yaml"),
        template,
    )
    .await;
    refused(
        &answer,
        "deep YAML template",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["recursion limit exceeded"],
    );

    // Deep but allowed (100 levels, the most Tasker carries): checked by the recursive
    // schema, stored in jsonb and read back unchanged.
    let context: Value =
        serde_json::from_str(&format!(r#"{{"nest": {}}}"#, nested(99, "7"))).unwrap();
    let (status, task) = env
        .create_task(json!({"namespace": "hostile", "name": "nested", "context": context}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let (_, read) = env
        .get(&format!("/v1/tasks/{}", task["task_id"].as_str().unwrap()))
        .await
        .unwrap();
    assert_eq!(read["context"], context);
    // ... and a schema violation deep down is found and placed.
    let bad: Value =
        serde_json::from_str(&format!(r#"{{"nest": {}}}"#, nested(99, "\"seven\""))).unwrap();
    let (status, body) = env
        .create_task(json!({"namespace": "hostile", "name": "nested", "context": bad}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "invalid_context");
    assert!(
        body["error"]["details"][0]["path"]
            .as_str()
            .unwrap()
            .starts_with("/nest/0/0/0"),
        "{body}"
    );
    // A deep step config is stored too, up to the same limit.
    let template = |levels| {
        format!(
            "namespace: hostile\nname: deep-config\nsteps:\n  - name: a\n    handler: tasker.noop\n    config: {{k: {}}}\n",
            nested(levels, "1")
        )
    };
    let (status, body) = env.register_template(&template(100)).await.unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        body["error"]["details"][0]["path"], "steps[0].config",
        "{body}"
    );
    let (status, body) = env.register_template(&template(99)).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");

    still_serving(&env).await;
    env.finish().await.unwrap();
}

#[tokio::test]
async fn sql_looking_and_unicode_strings_are_stored_verbatim() {
    let env = hostile_env("hostile-strings", &[]).await;
    let sql = "'; DROP TABLE tasks; -- \" OR 1=1 /* $1 %s \\x00 */";
    let unicode = "Zürich 東京 🦀 \u{202e}reversed\u{202c} e\u{301} \u{feff}";
    let template = json!({"namespace": "hostile", "name": "target", "version": "1.0.0",
        "description": format!("{sql} {unicode}"),
        "steps": [{"name": "only", "handler": "tasker.noop", "description": sql,
                   "config": {sql: unicode, "nested": [sql, unicode]}}]});
    let answer = post_template(&env, template.to_string()).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    let (_, stored) = env.get("/v1/templates/hostile/target").await.unwrap();
    assert_eq!(stored["description"], format!("{sql} {unicode}"));
    assert_eq!(stored["steps"][0]["config"], template["steps"][0]["config"]);

    let context =
        json!({"comment": sql, "name": unicode, sql: [sql, unicode], "emoji": "🦀".repeat(1_000)});
    let (status, task) = env
        .create_task(
            json!({"namespace": "hostile", "name": "target", "context": context,
            "initiator": sql, "source_system": unicode, "reason": "x".repeat(128),
            "idempotency_key": sql, "tags": [sql, unicode]}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let (_, read) = env
        .get(&format!("/v1/tasks/{}", task["task_id"].as_str().unwrap()))
        .await
        .unwrap();
    assert_eq!(read["context"], context);
    assert_eq!(read["initiator"], sql);
    assert_eq!(read["source_system"], unicode);
    assert_eq!(read["tags"], json!([sql, unicode]));
    // 128 characters is 128 characters, however many bytes.
    let (status, body) = env
        .create_task(json!({"namespace": "hostile", "name": "target", "reason": "🦀".repeat(128)}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // SQL in names: not an identifier, so named as a template problem, not run.
    let bad = json!({"namespace": sql, "name": "x'--", "steps": [{"name": "a; DROP", "handler": "tasker.noop"}]});
    let answer = post_template(&env, bad.to_string()).await;
    refused(
        &answer,
        "SQL names",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_template",
        &[],
    );
    let paths = crate::detail_paths(&answer.body);
    for expected in ["namespace", "name", "steps[0].name"] {
        assert!(
            paths.iter().any(|p| p == expected),
            "{expected} not in {paths:?}"
        );
    }
    let answer = post_template(&env, json!({"namespace": "n".repeat(65), "name": "n".repeat(129), "steps": [{"name": "s".repeat(129), "handler": "tasker.noop"}]}).to_string()).await;
    refused(
        &answer,
        "long names",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_template",
        &["64", "128"],
    );
    assert_eq!(
        crate::detail_paths(&answer.body).len(),
        3,
        "{}",
        answer.body
    );
    let (status, body) = env
        .create_task(json!({"namespace": sql, "name": sql}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "template_not_found");
    let (_, tables) = env.get("/v1/tasks").await.unwrap();
    assert_eq!(tables["tasks"].as_array().unwrap().len(), 2, "{tables}");

    still_serving(&env).await;
    env.finish().await.unwrap();
}

#[tokio::test]
async fn size_limits_answer_413_or_422_naming_the_setting_and_its_value() {
    let env = hostile_env(
        "hostile-limits",
        &[
            ("TASKER_MAX_BODY_BYTES", "262144"),
            ("TASKER_MAX_CONTEXT_BYTES", "65536"),
            ("TASKER_MAX_TEMPLATE_BYTES", "131072"),
            ("TASKER_MAX_TEMPLATE_STEPS", "100"),
        ],
    )
    .await;
    env.register_template(TEMPLATE).await.unwrap();
    let json = Some("application/json");
    let task = |context: Value| {
        json!({"namespace": "hostile", "name": "target", "context": context}).to_string()
    };

    // The body limit, for every body-reading route.
    let huge = task(json!({"blob": "x".repeat(300_000)}));
    for path in [
        "/v1/tasks",
        "/v1/templates",
        "/v1/tasks/00000000-0000-0000-0000-000000000000/cancel",
    ] {
        let answer = send(&env, Method::POST, path, json, huge.clone()).await;
        refused(
            &answer,
            path,
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            &["TASKER_MAX_BODY_BYTES", "262144"],
        );
    }
    // A chunked body, which declares no length, past the limit: the same answer.
    {
        use tokio::io::AsyncWriteExt;
        let address = env.base_url.trim_start_matches("http://").to_owned();
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        let head = "POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut request = head.as_bytes().to_vec();
        request.extend_from_slice(format!("{:x}\r\n", huge.len()).as_bytes());
        request.extend_from_slice(huge.as_bytes());
        request.extend_from_slice(b"\r\n0\r\n\r\n");
        stream.write_all(&request).await.unwrap();
        let answer = read_answer(&mut stream, "262144", Duration::from_secs(20)).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "chunked: {answer}");
        assert!(answer.contains("payload_too_large"), "chunked: {answer}");
    }
    // The context limit: 65,536 bytes of compact JSON. Just under passes, just over is 413.
    let under = json!({"blob": "x".repeat(65_536 - 11)});
    assert_eq!(serde_json::to_string(&under).unwrap().len(), 65_536);
    let answer = send(&env, Method::POST, "/v1/tasks", json, task(under)).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    let over = json!({"blob": "x".repeat(65_536 - 10)});
    let answer = send(&env, Method::POST, "/v1/tasks", json, task(over)).await;
    refused(
        &answer,
        "context over",
        StatusCode::PAYLOAD_TOO_LARGE,
        "context_too_large",
        &["TASKER_MAX_CONTEXT_BYTES", "65536", "65537"],
    );
    assert_eq!(answer.body["error"]["details"][0]["max"], 65_536);
    assert_eq!(answer.body["error"]["details"][0]["actual"], 65_537);

    // The template byte limit.
    let long = format!(
        "namespace: hostile\nname: long\ndescription: {}\nsteps:\n  - {{name: a, handler: tasker.noop}}\n",
        "d".repeat(140_000)
    );
    let answer = send(
        &env,
        Method::POST,
        "/v1/templates",
        Some("application/yaml"),
        long,
    )
    .await;
    refused(
        &answer,
        "template bytes",
        StatusCode::PAYLOAD_TOO_LARGE,
        "template_too_large",
        &["TASKER_MAX_TEMPLATE_BYTES", "131072"],
    );
    // The step limit: 100 is fine, 101 is one problem naming the limit.
    let answer = post_template(&env, chain("hundred", 100, false)).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    let answer = post_template(&env, chain("more", 101, true)).await;
    refused(
        &answer,
        "101 steps",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_template",
        &[
            "TASKER_MAX_TEMPLATE_STEPS",
            "at most 100 steps, this one has 101",
            "too_many_steps",
        ],
    );
    assert_eq!(crate::detail_paths(&answer.body), ["steps"]);

    still_serving(&env).await;
    env.finish().await.unwrap();
}

#[tokio::test]
async fn huge_templates_and_long_cycles_answer_fast_and_small() {
    // Default limits: 1,000 steps.
    let env = hostile_env("hostile-huge", &[]).await;
    env.register_template(TEMPLATE).await.unwrap();

    let started = Instant::now();
    let answer = post_template(&env, chain("ten-thousand", 10_000, true)).await;
    refused(
        &answer,
        "10,000 steps",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_template",
        &[
            "TASKER_MAX_TEMPLATE_STEPS",
            "at most 1000 steps, this one has 10000",
        ],
    );
    assert!(answer.bytes < 2_000, "{} bytes", answer.bytes);
    answered_within(started, 5);

    // 1,000 steps (the default limit) register; a 1,000-step cycle is named briefly.
    let started = Instant::now();
    let answer = post_template(&env, chain("thousand", 1_000, false)).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    answered_within(started, 10);
    let answer = post_template(&env, chain("ring", 1_000, true)).await;
    refused(
        &answer,
        "1,000-step cycle",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_template",
        &[
            "dependency cycle: s0 -> s1 -> ",
            "(980 more steps)",
            "s999 -> s0",
        ],
    );
    assert!(answer.bytes < 2_000, "{} bytes", answer.bytes);

    // Thousands of problems: listed up to a cap, the rest counted.
    let steps: Vec<Value> = (0..1_000)
        .map(|i| json!({"name": format!("s{i}"), "handler": 5, "depends_on": ["nowhere"], "colour": i}))
        .collect();
    let broken = json!({"namespace": "hostile", "name": "broken", "steps": steps}).to_string();
    let answer = post_template(&env, broken).await;
    refused(
        &answer,
        "3,000 problems",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_template",
        &[
            "more_problems",
            "more problem(s) were found and are not listed",
        ],
    );
    assert_eq!(
        answer.body["error"]["details"].as_array().unwrap().len(),
        201
    );
    assert!(answer.bytes < 100_000, "{} bytes", answer.bytes);

    still_serving(&env).await;
    env.finish().await.unwrap();
}

#[tokio::test]
async fn raised_limits_take_ten_thousand_steps_and_name_a_five_thousand_step_cycle_briefly() {
    let env = hostile_env(
        "hostile-raised",
        &[
            ("TASKER_MAX_TEMPLATE_STEPS", "10000"),
            ("TASKER_MAX_TEMPLATE_BYTES", "8388608"),
        ],
    )
    .await;
    env.register_template(TEMPLATE).await.unwrap();

    let started = Instant::now();
    let answer = post_template(&env, chain("ring", 5_000, true)).await;
    refused(
        &answer,
        "5,000-step cycle",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_template",
        &[
            "dependency cycle: s0 -> s1 -> ",
            "(4980 more steps)",
            "s4999 -> s0",
        ],
    );
    assert!(answer.bytes < 2_000, "{} bytes", answer.bytes);
    answered_within(started, 5);

    let started = Instant::now();
    let answer = post_template(&env, chain("long", 10_000, false)).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    answered_within(started, 20);
    let (_, list) = env.get("/v1/templates").await.unwrap();
    let long = list["templates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "long")
        .unwrap();
    assert_eq!(long["step_count"], 10_000);
    let answer = post_template(&env, chain("more", 10_001, false)).await;
    refused(
        &answer,
        "10,001 steps",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_template",
        &["at most 10000 steps"],
    );

    still_serving(&env).await;
    env.finish().await.unwrap();
}

/// Peak resident memory of a process, in MB (`VmHWM`).
fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .unwrap();
    kb / 1024.0
}

async fn post_yaml(env: &TestEnv, template: String) -> Answer {
    send(
        env,
        Method::POST,
        "/v1/templates",
        Some("application/yaml"),
        template,
    )
    .await
}

/// YAML aliases are counted at every use while the document is parsed: an alias bomb is
/// refused before it fills memory, and a config that expands past the template byte limit
/// is refused by name. A wide template (many parents per step) registers, and a task of
/// it is created in time linear in its edges.
#[tokio::test]
async fn alias_bombs_are_refused_while_parsing_and_wide_templates_create_fast() {
    // A process of its own: its peak memory is the coordinator's alone.
    let env = hostile_env("hostile-aliases", &[]).await;
    env.register_template(TEMPLATE).await.unwrap();
    let pid = env.coordinator.pid().unwrap();

    // 100 × 100 × 100 × 100 = 100 million strings from a document of about 1.5 KB.
    let items = |alias: &str| format!("[{}]", vec![alias; 100].join(", "));
    let bomb = format!(
        "namespace: hostile\nname: bomb\na: &a {}\nb: &b {}\nc: &c {}\nd: &d {}\nsteps:\n  - {{name: only, handler: tasker.noop}}\n",
        items("x"),
        items("*a"),
        items("*b"),
        items("*c"),
    );
    let started = Instant::now();
    let answer = post_yaml(&env, bomb).await;
    refused(
        &answer,
        "alias bomb",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["expands to more than 250000 values", "YAML alias"],
    );
    answered_within(started, 5);

    // A 10 KB string aliased 900 times in one step's config: 9 MB of config from 12 KB.
    let uses = vec!["*big"; 900].join(", ");
    let expanding = format!(
        "namespace: hostile\nname: expanding\nsteps:\n  - name: only\n    handler: tasker.noop\n    config:\n      seed: &big {}\n      copies: [{uses}]\n",
        "x".repeat(10_000)
    );
    let answer = post_yaml(&env, expanding).await;
    refused(
        &answer,
        "expanding config",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_template",
        &["config_too_large", "TASKER_MAX_TEMPLATE_BYTES", "1048576"],
    );
    let peak = peak_rss_mb(pid);
    assert!(
        peak < 200.0,
        "the coordinator's peak RSS reached {peak:.0} MB"
    );

    // 1,000 steps: 200 roots, and 800 steps that each depend on all of them through one
    // alias (160,000 edges).
    let mut wide = String::from("namespace: hostile\nname: wide\nsteps:\n");
    let roots: Vec<String> = (0..200).map(|i| format!("r{i}")).collect();
    for root in &roots {
        wide.push_str(&format!("  - {{name: {root}, handler: tasker.noop}}\n"));
    }
    wide.push_str(&format!(
        "  - name: c0\n    handler: tasker.noop\n    depends_on: &roots [{}]\n",
        roots.join(", ")
    ));
    for i in 1..800 {
        wide.push_str(&format!(
            "  - {{name: c{i}, handler: tasker.noop, depends_on: *roots}}\n"
        ));
    }
    let answer = post_yaml(&env, wide).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    let started = Instant::now();
    let (status, task) = env
        .create_task(json!({"namespace": "hostile", "name": "wide", "context": {}}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let took = started.elapsed();
    eprintln!("a task of 1,000 steps and 160,000 edges created in {took:?}");
    answered_within(started, 10);
    let edges: i64 = sqlx::query_scalar("SELECT count(*) FROM step_edges")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(edges, 160_000);

    still_serving(&env).await;
    env.finish().await.unwrap();
}

/// Register a one-step `tasker.http` template `name` in namespace `ns` calling `url`, run
/// a task of it to its end, and return its step.
async fn http_step(env: &TestEnv, ns: &str, name: &str, url: &str) -> Value {
    let template = json!({"namespace": ns, "name": name, "steps": [
        {"name": "call", "handler": "tasker.http", "retry_limit": 1, "config": {"url": url}}
    ]});
    let (status, body) = env.register_template(&template.to_string()).await.unwrap();
    assert!(status.is_success(), "{body}");
    let task = env
        .run_task(
            json!({"namespace": ns, "name": name}),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    TestEnv::step(&task, "call").clone()
}

/// `tasker.http` keeps to its outbound policy: internal destinations are refused by
/// address and by name, other schemes always, every redirect is checked again, and a
/// response past the size limit is not read. Each is a permanent failure with its own
/// code, and a refused call never reaches its target.
#[tokio::test]
async fn tasker_http_refuses_internal_destinations_redirects_and_huge_bodies() {
    let mut env = hostile_env("hostile-ssrf", &[]).await;
    env.register_template(TEMPLATE).await.unwrap();
    env.start_worker("open", &["ssrf"]).await.unwrap();
    let target = HttpStub::start(vec![http_stub::Answer::new(200, r#"{"secret": true}"#)])
        .await
        .unwrap();
    let port = target
        .url
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches('/')
        .to_owned();
    for (name, url, needle) in [
        ("by-address", target.url.clone(), "internal address"),
        (
            "by-name",
            format!("http://localhost:{port}/"),
            "internal address",
        ),
        (
            "metadata",
            "http://169.254.169.254/latest/meta-data/".to_owned(),
            "169.254.169.254",
        ),
        (
            "file",
            "file:///etc/passwd".to_owned(),
            "only http and https",
        ),
        (
            "credentials",
            "http://user:s3cret@169.254.169.254/?token=t0k3n".to_owned(),
            "user:***@169.254.169.254/?token=***",
        ),
    ] {
        let step = http_step(&env, "ssrf", name, &url).await;
        assert_eq!(step["status"], "error", "{name}: {step:#}");
        assert_eq!(step["attempts"], 1, "{name}: permanent: {step:#}");
        assert_eq!(
            step["last_error"]["code"], "http_denied",
            "{name}: {step:#}"
        );
        let message = step["last_error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{name}: {message}");
        assert!(
            !message.contains("s3cret") && !message.contains("t0k3n"),
            "{name}: {message}"
        );
    }
    assert!(
        target.arrivals().is_empty(),
        "a refused call reached its target"
    );

    // A worker allowed to call loopback only: its redirects are checked again, and its
    // bodies are read up to 1,000 bytes.
    env.start_worker_with(
        tasker_tests::binary("tasker-worker"),
        "listed",
        &["listed"],
        4,
        &[
            ("TASKER_HTTP_ALLOW", "127.0.0.1"),
            ("TASKER_HTTP_MAX_RESPONSE_BYTES", "1000"),
        ],
    )
    .await
    .unwrap();
    let step = http_step(&env, "listed", "allowed", &target.url).await;
    assert_eq!(step["status"], "complete", "{step:#}");
    assert_eq!(step["results"]["body"], json!({"secret": true}));

    let redirect = HttpStub::start(vec![
        http_stub::Answer::new(302, "")
            .header("location", "http://169.254.169.254/latest/meta-data/"),
    ])
    .await
    .unwrap();
    let step = http_step(&env, "listed", "redirected", &redirect.url).await;
    assert_eq!(step["last_error"]["code"], "http_denied", "{step:#}");
    assert_eq!(redirect.arrivals().len(), 1);

    let huge = HttpStub::start(vec![http_stub::Answer::new(200, &"x".repeat(5_000))])
        .await
        .unwrap();
    let step = http_step(&env, "listed", "huge", &huge.url).await;
    assert_eq!(step["status"], "error", "{step:#}");
    assert_eq!(
        step["last_error"]["code"], "http_response_too_large",
        "{step:#}"
    );
    assert!(
        step["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("TASKER_HTTP_MAX_RESPONSE_BYTES")
    );
    // An unsuccessful answer is judged by its status, whatever the size of its body: a
    // 503 with a large error page is retried when its `Retry-After` says.
    let busy = HttpStub::start(vec![
        http_stub::Answer::new(503, &"busy ".repeat(1_000)).header("retry-after", "1"),
        http_stub::Answer::new(200, r#"{"done": true}"#),
    ])
    .await
    .unwrap();
    let template = json!({"namespace": "listed", "name": "busy", "steps": [
        {"name": "call", "handler": "tasker.http", "retry_limit": 2, "config": {"url": busy.url}}
    ]});
    let (status, body) = env.register_template(&template.to_string()).await.unwrap();
    assert!(status.is_success(), "{body}");
    let task = env
        .run_task(
            json!({"namespace": "listed", "name": "busy"}),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let step = TestEnv::step(&task, "call");
    // Retried, not failed for good as a body too large.
    assert_eq!(step["status"], "complete", "{step:#}");
    assert_eq!(step["attempts"], 2, "{step:#}");
    assert_eq!(busy.arrivals().len(), 2);

    // A setting that cannot be read stops the worker at start, naming it.
    let stderr =
        tasker_tests::worker_refusing_to_start(&[("TASKER_HTTP_ALLOW", "10.0.0.0/99")]).await;
    assert!(
        stderr.contains("TASKER_HTTP_ALLOW") && stderr.contains("10.0.0.0/99"),
        "{stderr}"
    );

    still_serving(&env).await;
    env.finish().await.unwrap();
}

/// A problem may quote the request, but an answer stays small however long the request:
/// strings in an error are cut at 1,000 bytes and at most 201 details are listed.
#[tokio::test]
async fn long_query_strings_get_short_answers() {
    let env = hostile_env("hostile-query", &[]).await;
    env.register_template(TEMPLATE).await.unwrap();
    // 2,000 unknown parameters: 63 KB of query string.
    let query: Vec<String> = (0..2_000)
        .map(|i| format!("unknown_parameter_{i:05}=value"))
        .collect();
    let path = format!("/v1/tasks?{}", query.join("&"));
    assert!(path.len() > 60_000);
    let answer = send(&env, Method::GET, &path, None, "").await;
    refused(
        &answer,
        "2,000 unknown parameters",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["unknown query parameter", "more problem(s) were found"],
    );
    assert!(answer.bytes < 40_000, "{} bytes", answer.bytes);
    // One value of 60 KB.
    let path = format!("/v1/tasks?status={}", "x".repeat(60_000));
    let answer = send(&env, Method::GET, &path, None, "").await;
    refused(
        &answer,
        "a 60 KB status",
        StatusCode::BAD_REQUEST,
        "malformed_request",
        &["unknown status", "more bytes)"],
    );
    assert!(answer.bytes < 5_000, "{} bytes", answer.bytes);
    still_serving(&env).await;
    env.finish().await.unwrap();
}

/// What the server answers on `stream`, read until it holds `until`, the stream ends or
/// `within` passes.
async fn read_answer(stream: &mut tokio::net::TcpStream, until: &str, within: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let mut buffer = [0_u8; 4096];
    let _ = tokio::time::timeout(within, async {
        while !String::from_utf8_lossy(&answer).contains(until) {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Whether the server closes `stream` within `within` (reads until end of stream).
async fn closed_by_server(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buffer = [0_u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Slow-header clients are cut off after `TASKER_HTTP_HEADER_TIMEOUT_MS`, and at most
/// `TASKER_HTTP_MAX_CONNECTIONS` connections are served at once: the next client waits
/// until one closes, and is then served. The API speaks HTTP/1 only: a client that
/// starts an HTTP/2 preface and stops, or sends one whole and nothing more, is cut off
/// too.
#[tokio::test]
async fn slow_headers_are_cut_off_and_connections_are_capped() {
    let env = hostile_env(
        "hostile-slowloris",
        &[
            ("TASKER_HTTP_HEADER_TIMEOUT_MS", "3000"),
            ("TASKER_HTTP_MAX_CONNECTIONS", "4"),
        ],
    )
    .await;
    env.register_template(TEMPLATE).await.unwrap();
    let address = env.base_url.trim_start_matches("http://").to_owned();

    // Four connections that take every slot: half a request, nothing, the first byte of
    // an HTTP/2 preface, a whole preface.
    let mut slow = Vec::new();
    for start in [
        &b"GET /health/live HTTP/1.1\r\nHost: x\r\n"[..],
        b"",
        b"P",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ] {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream.write_all(start).await.unwrap();
        slow.push(stream);
    }
    // Meanwhile a new client is not served (it waits to be accepted) until the server
    // has closed one of the slow ones (3 s after they connected). A client of its own:
    // `env.http` may hold a kept-alive connection that is already accepted.
    let waiting = reqwest::Client::new()
        .get(format!("{}/health/live", env.base_url))
        .timeout(Duration::from_secs(30))
        .send();
    tokio::pin!(waiting);
    let closes: Vec<_> = slow
        .iter_mut()
        .map(|stream| Box::pin(closed_by_server(stream, Duration::from_secs(30))))
        .collect();
    // A close and the answer it lets through can be ready together: the close first.
    let others = tokio::select! {
        biased;
        (closed, _, others) = futures::future::select_all(closes) => {
            assert!(closed, "a slow-header connection stayed open");
            others
        }
        answer = &mut waiting => panic!("served past the connection limit: {answer:?}"),
    };
    let answer = waiting.await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    // The other slow ones are closed by the server too...
    for closed in others {
        assert!(closed.await, "a slow-header connection stayed open");
    }
    // ...and everyone else is served again.
    still_serving(&env).await;
    env.finish().await.unwrap();
}

/// Anyone who can publish to the control exchange can claim to be a worker, but only a
/// plain id (letters, digits, `.`, `_`, `:`, `-`) reaches `/health/status`; a worker
/// refuses to start with any other `TASKER_WORKER_ID`.
#[tokio::test]
async fn worker_ids_are_plain_or_refused() {
    let env = hostile_env("hostile-worker-id", &[]).await;
    env.register_template(TEMPLATE).await.unwrap();
    let connection = lapin::Connection::connect(
        &tasker_tests::amqp_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let status = |worker_id: &str, namespace: &str| {
        json!({"type": "worker_status", "worker_id": worker_id, "namespaces": [namespace],
               "all_namespaces": false, "concurrency": 1, "in_flight": 0, "interval_ms": 10000})
        .to_string()
    };
    for body in [
        status("evil<script>alert(1)</script>", "hostile"),
        status("spoofed", "<img src=x>"),
        status(&"w".repeat(200), "hostile"),
        status("plain-worker.1", "hostile"),
    ] {
        channel
            .basic_publish(
                format!("{}.control", env.prefix).into(),
                "".into(),
                lapin::options::BasicPublishOptions::default(),
                body.as_bytes(),
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap();
    }
    // The plain one was published last: once it is listed, the others were read.
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let (_, health) = env.get("/health/status").await.unwrap();
        let text = health["workers"].to_string();
        if text.contains("plain-worker.1") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the plain worker was never listed: {health}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!listed.contains('<'), "{listed}");
    assert!(!listed.contains("spoofed"), "{listed}");
    assert!(!listed.contains("www"), "{listed}");
    let _ = connection.close(200, "OK".into()).await;

    let stderr =
        tasker_tests::worker_refusing_to_start(&[("TASKER_WORKER_ID", "evil<script>")]).await;
    assert!(stderr.contains("TASKER_WORKER_ID"), "{stderr}");

    still_serving(&env).await;
    env.finish().await.unwrap();
}

/// Request bodies in progress hold at most `TASKER_MAX_INFLIGHT_BODY_BYTES`: while one
/// client trickles a large body, another large one is answered 503 `overloaded` with
/// `Retry-After`, and is served once the first is gone.
#[tokio::test]
async fn request_bodies_in_progress_are_bounded() {
    use tokio::io::AsyncWriteExt;
    let env = hostile_env(
        "hostile-inflight",
        &[("TASKER_MAX_INFLIGHT_BODY_BYTES", "1000000")],
    )
    .await;
    env.register_template(TEMPLATE).await.unwrap();
    let address = env.base_url.trim_start_matches("http://").to_owned();
    let mut trickle = tokio::net::TcpStream::connect(&address).await.unwrap();
    trickle
        .write_all(
            b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 900000\r\n\r\n{\"namespace\"",
        )
        .await
        .unwrap();
    // Each request on a connection of its own: a server that answers before reading a
    // body closes that connection, and a pooled client could pick it up again.
    let big = json!({"namespace": "hostile", "name": "target",
                     "context": {"pad": "x".repeat(200_000)}})
    .to_string();
    let post_big = || async {
        reqwest::Client::new()
            .post(format!("{}/v1/tasks", env.base_url))
            .header("content-type", "application/json")
            .body(big.clone())
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .unwrap()
    };
    // The trickling request holds 900 KB of the budget once the server has read its
    // headers; wait for that by asking until the answer is 503.
    let deadline = Instant::now() + Duration::from_secs(30);
    let refusal = loop {
        let response = post_big().await;
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            break response;
        }
        assert!(
            Instant::now() < deadline,
            "never refused: {}",
            response.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(refusal.headers()["retry-after"], "1");
    let body: Value = refusal.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("TASKER_MAX_INFLIGHT_BODY_BYTES"),
        "{body}"
    );
    // Requests without a body are not held back.
    let status = reqwest::Client::new()
        .get(format!("{}/v1/tasks?limit=1", env.base_url))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::OK);
    drop(trickle);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = post_big().await;
        if response.status() == StatusCode::CREATED {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never served again: {}",
            response.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    still_serving(&env).await;
    env.finish().await.unwrap();
}

/// A body that never finishes is answered 408 once `TASKER_HTTP_BODY_TIMEOUT_MS` has
/// passed, and gives its share of `TASKER_MAX_INFLIGHT_BODY_BYTES` back while its client
/// still holds the connection.
#[tokio::test]
async fn a_body_that_never_finishes_is_answered_408_and_gives_its_budget_back() {
    use tokio::io::AsyncWriteExt;
    let env = hostile_env(
        "hostile-slow-body",
        &[
            ("TASKER_MAX_INFLIGHT_BODY_BYTES", "1000000"),
            ("TASKER_HTTP_BODY_TIMEOUT_MS", "1500"),
        ],
    )
    .await;
    env.register_template(TEMPLATE).await.unwrap();
    let address = env.base_url.trim_start_matches("http://").to_owned();
    let mut stalled = tokio::net::TcpStream::connect(&address).await.unwrap();
    stalled
        .write_all(
            b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 900000\r\n\r\n{\"namespace\"",
        )
        .await
        .unwrap();
    let answer = read_answer(
        &mut stalled,
        "TASKER_HTTP_BODY_TIMEOUT_MS",
        Duration::from_secs(20),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "no 408 in 20 s: {answer:?}"
    );
    assert!(answer.contains("request_timeout"), "{answer}");

    // Its share is back, though its connection is still open: a body of 800 KB fits.
    let big = json!({"namespace": "hostile", "name": "target",
                     "context": {"pad": "x".repeat(800_000)}})
    .to_string();
    let response = reqwest::Client::new()
        .post(format!("{}/v1/tasks", env.base_url))
        .header("content-type", "application/json")
        .body(big)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    drop(stalled);
    still_serving(&env).await;
    env.finish().await.unwrap();
}

/// Context schemas match patterns in linear time: a pattern that needs backtracking is
/// refused at registration, and the classic catastrophic pattern answers at once for
/// hundreds of long strings.
#[tokio::test]
async fn regex_patterns_cannot_make_validation_slow() {
    let env = hostile_env("hostile-redos", &[]).await;
    env.register_template(TEMPLATE).await.unwrap();
    let backreference = json!({"namespace": "hostile", "name": "backref",
        "context_schema": {"type": "object", "properties":
            {"code": {"type": "string", "pattern": "^(a+)+\\1$"}}},
        "steps": [{"name": "only", "handler": "tasker.noop"}]});
    let answer = post_template(&env, backreference.to_string()).await;
    refused(
        &answer,
        "a backreference",
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_template",
        &["invalid_schema", "context_schema"],
    );
    let nested = json!({"namespace": "hostile", "name": "nested-plus",
        "context_schema": {"type": "object", "properties":
            {"codes": {"type": "array", "items": {"type": "string", "pattern": "^(a+)+b$"}}}},
        "steps": [{"name": "only", "handler": "tasker.noop"}]});
    let answer = post_template(&env, nested.to_string()).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    let codes: Vec<String> = (0..400)
        .map(|_| format!("{}c", "a".repeat(2_000)))
        .collect();
    let started = Instant::now();
    let (status, body) = env
        .create_task(json!({"namespace": "hostile", "name": "nested-plus",
                            "context": {"codes": codes}}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "invalid_context");
    answered_within(started, 5);
    still_serving(&env).await;
    env.finish().await.unwrap();
}
