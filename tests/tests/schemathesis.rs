//! Schemathesis fuzzes a real coordinator from its own OpenAPI description
//! (`deploy/schemathesis.sh`): no request may get a 5xx, every answer must match the
//! description (status codes, content types, schemas), schema-invalid requests must be
//! refused and schema-valid ones accepted.
//!
//! The coordinator runs with authentication on and the script gets an `admin` token, so
//! the checks that a missing or bad token is refused run as well. Needs `python3` with
//! `venv` (Schemathesis is installed, pinned, under `~/.cache/tasker` on the first run);
//! without it the test fails rather than passing unseen. Takes about two minutes
//! (`TASKER_SCHEMATHESIS_SECONDS` sets the budget).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tasker_tests::{EnvOptions, StatusCode, TestEnv};

const SECRET: &str = "schemathesis-hs256-secret-of-at-least-32-bytes";

const TEMPLATE: &str = r#"
namespace: billing
name: charge
version: 1.0.0
context_schema:
  type: object
  properties:
    order_id: {type: integer}
steps:
  - name: authorize
    handler: tasker.noop
  - name: capture
    handler: tasker.noop
    depends_on: [authorize]
"#;

fn admin_token() -> String {
    let now = chrono::Utc::now().timestamp();
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "schemathesis", "scope": "admin", "iat": now, "exp": now + 3600}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("a JWT")
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_departure_from_the_openapi_description() {
    let env = TestEnv::start_with(
        "schemathesis",
        EnvOptions {
            coordinator_env: vec![
                ("TASKER_AUTH".into(), "on".into()),
                ("TASKER_JWT_HS256_SECRET".into(), SECRET.into()),
            ],
            // A process: the test reads its log for 500s.
            binary_coordinator: true,
            ..EnvOptions::default()
        },
    )
    .await
    .unwrap();
    let token = admin_token();

    // Data to find: a template (also the description's example) and a few tasks.
    let response = env
        .http
        .post(format!("{}/v1/templates", env.base_url))
        .bearer_auth(&token)
        .header("content-type", "application/yaml")
        .body(TEMPLATE)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    for order in 0..3 {
        let response = env
            .http
            .post(format!("{}/v1/tasks", env.base_url))
            .bearer_auth(&token)
            .json(&json!({"namespace": "billing", "name": "charge",
                          "context": {"order_id": order}}))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/schemathesis.sh");
    let run = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(&env.base_url)
        .env("TASKER_TOKEN", &token)
        .env(
            "TASKER_SCHEMATHESIS_SECONDS",
            std::env::var("TASKER_SCHEMATHESIS_SECONDS").unwrap_or_else(|_| "90".into()),
        )
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(900), run)
        .await
        .expect("schemathesis finishes within 15 minutes")
        .expect("deploy/schemathesis.sh runs (it needs bash and python3)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis found problems ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // It really ran: a summary with generated test cases.
    assert!(
        stdout.contains("generated") && stdout.contains("Tested:"),
        "no Schemathesis summary:\n{stdout}\n{stderr}"
    );
    let log = env.coordinator.log();
    assert!(
        !log.contains("request failed"),
        "the coordinator answered a 500 during the run:\n{log}"
    );
    let (status, _) = env.get("/health/live").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    env.finish().await.unwrap();
}
