//! Authentication and authorisation (`docs/security.md`): a coordinator started with
//! `TASKER_AUTH=on` refuses missing and bad tokens (401), tokens without the route's scope
//! (403, naming it), and admits each scope to its routes, with API tokens made by the real
//! `tasker-coordinator token` command and JWTs (HS256, RS256) minted here.

use std::process::Stdio;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use reqwest::Method;
use reqwest::header::{HeaderMap, WWW_AUTHENTICATE};
use serde_json::{Value, json};
use tasker_tests::{EnvOptions, StatusCode, TestEnv};
use tokio::process::Command;

/// TEST ONLY key pair (tests/fixtures/README-auth-keys.md).
const RS256_PRIVATE: &[u8] = include_bytes!("../../fixtures/auth_test_rs256_private.pem");
const RS256_PUBLIC_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/auth_test_rs256_public.pem"
);
const HS256_SECRET: &str = "test-only-hs256-secret-0123456789abcdef";
const ISSUER: &str = "https://idp.test";
const AUDIENCE: &str = "tasker";

const TEMPLATE: &str = r#"
namespace: authz
name: flow
version: 1.0.0
steps:
  - {name: a, handler: tasker.noop}
  - {name: b, handler: tasker.noop, depends_on: [a]}
"#;

fn auth_env(extra: &[(&str, &str)]) -> EnvOptions {
    let mut coordinator_env: Vec<(String, String)> = [
        ("TASKER_AUTH", "on"),
        ("TASKER_JWT_HS256_SECRET", HS256_SECRET),
        ("TASKER_JWT_RS256_PUBLIC_KEY", RS256_PUBLIC_PATH),
        ("TASKER_JWT_ISSUER", ISSUER),
        ("TASKER_JWT_AUDIENCE", AUDIENCE),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    // An empty value leaves the variable out.
    for (key, value) in extra {
        coordinator_env.retain(|(k, _)| k != key);
        if !value.is_empty() {
            coordinator_env.push(((*key).to_owned(), (*value).to_owned()));
        }
    }
    EnvOptions {
        coordinator_env,
        ..EnvOptions::default()
    }
}

/// The same options with the coordinator as a process, for a test that reads its log.
fn logged(options: EnvOptions) -> EnvOptions {
    EnvOptions {
        binary_coordinator: true,
        ..options
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Claims a well-behaved identity provider would issue, with `extra` merged in.
fn claims(extra: Value) -> Value {
    let mut claims = json!({
        "sub": "someone", "iss": ISSUER, "aud": AUDIENCE,
        "iat": now(), "exp": now() + 600,
    });
    for (key, value) in extra.as_object().unwrap() {
        claims[key] = value.clone();
    }
    claims
}

fn hs256(claims: &Value) -> String {
    hs256_with(claims, HS256_SECRET)
}

fn hs256_with(claims: &Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn rs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::RS256),
        claims,
        &EncodingKey::from_rsa_pem(RS256_PRIVATE).unwrap(),
    )
    .unwrap()
}

/// What one call answered.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or_default()
    }

    fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or_default()
    }

    fn challenge(&self) -> &str {
        self.headers
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

async fn call(
    env: &TestEnv,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Answer {
    let mut request = env.http.request(method, format!("{}{path}", env.base_url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        headers,
        body,
    }
}

async fn get(env: &TestEnv, path: &str, token: Option<&str>) -> Answer {
    call(env, Method::GET, path, token, None).await
}

/// A 401 in the API's error shape, with the bearer challenge.
#[track_caller]
fn assert_unauthenticated(answer: &Answer, why: &str) {
    assert_eq!(
        answer.status,
        StatusCode::UNAUTHORIZED,
        "{why}: {}",
        answer.body
    );
    assert_eq!(answer.code(), "unauthenticated", "{why}: {}", answer.body);
    assert!(
        answer.challenge().starts_with("Bearer"),
        "{why}: WWW-Authenticate is {:?}",
        answer.challenge()
    );
}

/// A 403 naming the missing scope.
#[track_caller]
fn assert_forbidden(answer: &Answer, scope: &str) {
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.body);
    assert_eq!(answer.code(), "insufficient_scope", "{}", answer.body);
    assert!(answer.message().contains(scope), "{}", answer.body);
    assert_eq!(answer.body["error"]["details"][0]["required_scope"], scope);
    assert!(
        answer.challenge().contains("insufficient_scope"),
        "{}",
        answer.challenge()
    );
}

/// Run `tasker-coordinator token …` against the test's database.
pub(crate) async fn token_command(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(tasker_tests::binary("tasker-coordinator"))
            .arg("token")
            .args(args)
            .env("DATABASE_URL", &env.database_url)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("token command finishes in time")
    .expect("token command runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `token create`: answers the secret printed on stdout.
pub(crate) async fn create_token(env: &TestEnv, name: &str, scopes: &str) -> String {
    let (ok, stdout, stderr) =
        token_command(env, &["create", "--name", name, "--scopes", scopes]).await;
    assert!(ok, "token create failed:\n{stderr}");
    let secret = stdout.trim().to_owned();
    assert!(
        secret.starts_with("tsk_"),
        "stdout is only the secret: {stdout:?}"
    );
    assert!(stderr.contains(name), "{stderr}");
    secret
}

/// An event stream ends once the token that opened it has expired (it is checked again
/// every 30 s), as the token's next request would be refused.
#[tokio::test]
async fn an_event_stream_ends_when_its_token_expires() {
    let env = TestEnv::start_with(
        "auth-stream",
        auth_env(&[("TASKER_JWT_LEEWAY_SECONDS", "0")]),
    )
    .await
    .unwrap();
    let short = hs256(&claims(json!({"scope": "tasks:read", "exp": now() + 3})));
    let mut response = env
        .http
        .get(format!("{}/v1/events/stream", env.base_url))
        .bearer_auth(&short)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let opened = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(90), async {
        while let Some(_chunk) = response.chunk().await.unwrap_or(None) {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stream outlived its token by more than 90 s"
    );
    assert!(
        opened.elapsed() >= Duration::from_secs(3),
        "{:?}",
        opened.elapsed()
    );
    assert_unauthenticated(&get(&env, "/v1/whoami", Some(&short)).await, "expired");
    env.finish().await.unwrap();
}

/// A request without a valid token is refused before its body is read: a body that never
/// comes holds none of `TASKER_MAX_INFLIGHT_BODY_BYTES` against the clients that may send
/// one.
#[tokio::test]
async fn a_request_without_a_token_holds_no_body_budget() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = TestEnv::start_with(
        "auth-budget",
        auth_env(&[("TASKER_MAX_INFLIGHT_BODY_BYTES", "1000000")]),
    )
    .await
    .unwrap();
    let admin = hs256(&claims(json!({"scope": "admin"})));
    let created = env
        .http
        .post(format!("{}/v1/templates", env.base_url))
        .bearer_auth(&admin)
        .header("content-type", "application/yaml")
        .body("namespace: authz\nname: big\nsteps:\n  - {name: a, handler: tasker.noop}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);

    // 900 KB announced, a few bytes sent, no token.
    let address = env.base_url.trim_start_matches("http://").to_owned();
    let mut stalled = tokio::net::TcpStream::connect(&address).await.unwrap();
    stalled
        .write_all(b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 900000\r\n\r\n{\"namespace\"")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut buffer = [0_u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while !String::from_utf8_lossy(&head).contains("\r\n\r\n") {
            match stalled.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");

    // Meanwhile a client with a token sends a 200 KB body and is served.
    let big = json!({"namespace": "authz", "name": "big", "context": {"pad": "x".repeat(200_000)}});
    let answer = call(&env, Method::POST, "/v1/tasks", Some(&admin), Some(big)).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    drop(stalled);
    env.finish().await.unwrap();
}

#[tokio::test]
async fn auth_on_refuses_bad_tokens_and_admits_each_scope_to_its_routes() {
    let env = TestEnv::start_with("auth", logged(auth_env(&[])))
        .await
        .unwrap();
    assert!(
        env.coordinator
            .log()
            .contains("authentication is on: API calls need a bearer token"),
        "{}",
        env.coordinator.log()
    );

    // Probes, the API description and (by default) monitoring stay open.
    for path in [
        "/health/live",
        "/health/ready",
        "/openapi.json",
        "/health/status",
    ] {
        let answer = get(&env, path, None).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.body);
    }
    let metrics = get(&env, "/metrics", None).await;
    assert_eq!(metrics.status, StatusCode::OK);
    let doc = get(&env, "/openapi.json", None).await.body;
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert_eq!(
        doc["paths"]["/v1/tasks"]["post"]["security"],
        json!([{"bearer": ["tasks:write"]}])
    );

    // 401: no token, garbage, unknown API token, malformed / expired / badly signed /
    // foreign JWTs.
    let missing = get(&env, "/v1/tasks", None).await;
    assert_unauthenticated(&missing, "no token");
    assert_eq!(missing.challenge(), r#"Bearer realm="tasker""#);
    assert!(
        missing.message().contains("bearer token"),
        "{}",
        missing.body
    );
    let basic = env
        .http
        .get(format!("{}/v1/tasks", env.base_url))
        .basic_auth("user", Some("pass"))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), StatusCode::UNAUTHORIZED);
    let expired = hs256(&claims(json!({"scope": "admin", "exp": now() - 3600})));
    let mut tampered = rs256(&claims(json!({"scope": "tasks:read"})))
        .split('.')
        .map(str::to_owned)
        .collect::<Vec<_>>();
    tampered[1] = rs256(&claims(json!({"scope": "admin"})))
        .split('.')
        .nth(1)
        .unwrap()
        .to_owned();
    let tampered = tampered.join(".");
    for (token, why, reason) in [
        ("nonsense", "garbage", "neither"),
        (
            "tsk_0000000000000000000000000000000000000000000000000000000000000000",
            "unknown API token",
            "unknown API token",
        ),
        ("a.b.c", "malformed JWT", "malformed JWT"),
        (expired.as_str(), "expired JWT", "expired"),
        (
            &hs256_with(&claims(json!({"scope": "admin"})), "another secret"),
            "HS256 JWT signed with another secret",
            "signature",
        ),
        (
            tampered.as_str(),
            "RS256 JWT with a swapped payload",
            "signature",
        ),
        (
            &hs256(&claims(
                json!({"scope": "admin", "iss": "https://evil.test"}),
            )),
            "wrong issuer",
            "issuer",
        ),
        (
            &hs256(&claims(json!({"scope": "admin", "aud": "someone-else"}))),
            "wrong audience",
            "audience",
        ),
    ] {
        let answer = get(&env, "/v1/tasks", Some(token)).await;
        assert_unauthenticated(&answer, why);
        assert!(answer.message().contains(reason), "{why}: {}", answer.body);
        assert!(answer.challenge().contains("invalid_token"), "{why}");
    }

    // API tokens from the real command, one per scope.
    let author = create_token(&env, "author", "templates:write").await;
    let reader = create_token(&env, "reader", "tasks:read").await;
    let operator = create_token(&env, "operator", "tasks:operate").await;
    let root = create_token(&env, "root", "admin").await;
    let (ok, _, stderr) =
        token_command(&env, &["create", "--name", "x", "--scopes", "tasks:raed"]).await;
    assert!(
        !ok && stderr.contains("unknown scope `tasks:raed`"),
        "{stderr}"
    );
    let (ok, _, stderr) =
        token_command(&env, &["create", "--name", "reader", "--scopes", "admin"]).await;
    assert!(!ok && stderr.contains("already named `reader`"), "{stderr}");
    // JWTs: HS256 for writing tasks, RS256 for reading (scope string and scopes list).
    let writer = hs256(&claims(json!({"sub": "ci", "scope": "openid tasks:write"})));
    let rs_reader = rs256(&claims(
        json!({"sub": "dashboard", "scopes": ["tasks:read"]}),
    ));

    // templates:write registers templates, and nothing else.
    let created = env
        .http
        .post(format!("{}/v1/templates", env.base_url))
        .bearer_auth(&author)
        .header("content-type", "application/yaml")
        .body(TEMPLATE)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_forbidden(
        &get(&env, "/v1/templates", Some(&author)).await,
        "tasks:read",
    );
    let denied = call(
        &env,
        Method::POST,
        "/v1/tasks",
        Some(&author),
        Some(json!({"namespace": "authz", "name": "flow"})),
    )
    .await;
    assert_forbidden(&denied, "tasks:write");
    assert_eq!(
        denied.body["error"]["details"][0]["granted_scopes"],
        json!(["templates:write"])
    );

    // tasks:write (HS256 JWT) creates tasks; tasks:read may not.
    let task_body = json!({"namespace": "authz", "name": "flow", "context": {}});
    assert_forbidden(
        &call(
            &env,
            Method::POST,
            "/v1/tasks",
            Some(&reader),
            Some(task_body.clone()),
        )
        .await,
        "tasks:write",
    );
    let created = call(
        &env,
        Method::POST,
        "/v1/tasks",
        Some(&writer),
        Some(task_body.clone()),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let task_id = created.body["task_id"].as_str().unwrap().to_owned();
    assert_forbidden(
        &get(&env, &format!("/v1/tasks/{task_id}"), Some(&writer)).await,
        "tasks:read",
    );

    // tasks:read (an API token, and an RS256 JWT) reads tasks and templates.
    for token in [&reader, &rs_reader] {
        for path in [
            "/v1/tasks".to_owned(),
            format!("/v1/tasks/{task_id}"),
            format!("/v1/tasks/{task_id}/readiness"),
            format!("/v1/tasks/{task_id}/transitions"),
            "/v1/templates".to_owned(),
            "/v1/templates/authz/flow".to_owned(),
        ] {
            let answer = get(&env, &path, Some(token)).await;
            assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.body);
        }
    }
    let cancel = format!("/v1/tasks/{task_id}/cancel");
    assert_forbidden(
        &call(&env, Method::POST, &cancel, Some(&reader), Some(json!({}))).await,
        "tasks:operate",
    );

    // tasks:operate cancels (and retries, resolves: past the gate, the state decides).
    let cancelled = call(
        &env,
        Method::POST,
        &cancel,
        Some(&operator),
        Some(json!({})),
    )
    .await;
    assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.body);
    assert_eq!(cancelled.body["status"], "cancelled");
    let retry = format!("/v1/tasks/{task_id}/retry");
    let retried = call(&env, Method::POST, &retry, Some(&operator), Some(json!({}))).await;
    assert_eq!(retried.status, StatusCode::CONFLICT, "{}", retried.body);
    assert_forbidden(&get(&env, "/v1/tasks", Some(&operator)).await, "tasks:read");

    // admin does everything.
    for path in ["/v1/tasks".to_owned(), format!("/v1/tasks/{task_id}")] {
        assert_eq!(get(&env, &path, Some(&root)).await.status, StatusCode::OK);
    }
    let again = call(
        &env,
        Method::POST,
        "/v1/tasks",
        Some(&root),
        Some(task_body.clone()),
    )
    .await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
    let other = again.body["task_id"].as_str().unwrap();
    let cancelled = call(
        &env,
        Method::POST,
        &format!("/v1/tasks/{other}/cancel"),
        Some(&root),
        Some(json!({})),
    )
    .await;
    assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.body);
    let admin_jwt = rs256(&claims(json!({"scope": "admin"})));
    assert_eq!(
        get(&env, "/v1/templates", Some(&admin_jwt)).await.status,
        StatusCode::OK
    );

    // The tasker CLI sends TASKER_TOKEN as its bearer token.
    let cli = |token: Option<String>| {
        let mut command = Command::new(tasker_tests::binary("tasker"));
        command
            .args([
                "--url",
                &env.base_url,
                "--output",
                "json",
                "tasks",
                "get",
                &task_id,
            ])
            .env_remove("TASKER_TOKEN")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(token) = token {
            command.env("TASKER_TOKEN", token);
        }
        command
    };
    let output = cli(Some(reader.clone())).output().await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let shown: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shown["task_id"], task_id);
    let output = cli(None).output().await.unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unauthenticated (HTTP 401)"), "{stderr}");

    // Listing shows names and states, never secrets; the last use is noted.
    let (ok, listed, stderr) = token_command(&env, &["list"]).await;
    assert!(ok, "{stderr}");
    for name in ["author", "reader", "operator", "root"] {
        assert!(listed.contains(name), "{listed}");
    }
    assert!(!listed.contains("tsk_"), "{listed}");
    let used: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT last_used_at FROM api_tokens WHERE name = 'reader'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(used.is_some());
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT secret_hash FROM api_tokens WHERE name = 'reader'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(stored.len(), 32, "only the SHA-256 is stored");

    // Revoked (by name) and expired API tokens are refused at once.
    let (ok, _, stderr) = token_command(&env, &["revoke", "reader"]).await;
    assert!(
        ok && stderr.contains("revoked API token `reader`"),
        "{stderr}"
    );
    let revoked = get(&env, "/v1/tasks", Some(&reader)).await;
    assert_unauthenticated(&revoked, "revoked token");
    assert!(revoked.message().contains("revoked"), "{}", revoked.body);
    let (ok, _, stderr) = token_command(&env, &["revoke", "reader"]).await;
    assert!(!ok && stderr.contains("no active API token"), "{stderr}");
    let (ok, listed, _) = token_command(&env, &["list"]).await;
    assert!(
        ok && listed
            .lines()
            .any(|l| l.contains("reader") && l.contains("revoked")),
        "{listed}"
    );

    let (ok, short, stderr) = token_command(
        &env,
        &[
            "create",
            "--name",
            "short",
            "--scopes",
            "tasks:read",
            "--expires-in",
            "30d",
        ],
    )
    .await;
    assert!(ok, "{stderr}");
    let short = short.trim();
    let days: f64 = sqlx::query_scalar(
        "SELECT (extract(epoch FROM expires_at - now()) / 86400)::float8 FROM api_tokens WHERE name = 'short'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!((29.9..=30.0).contains(&days), "{days}");
    assert_eq!(
        get(&env, "/v1/tasks", Some(short)).await.status,
        StatusCode::OK
    );
    sqlx::query(
        "UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE name = 'short'",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let expired = get(&env, "/v1/tasks", Some(short)).await;
    assert_unauthenticated(&expired, "expired API token");
    assert!(expired.message().contains("expired"), "{}", expired.body);

    let prefix = env.prefix.clone();
    env.finish().await.unwrap();
    // The template was registered with a token, past the harness's bookkeeping.
    tasker_tests::delete_broker_objects(&prefix, &["authz".to_owned()])
        .await
        .unwrap();
}

#[tokio::test]
async fn metrics_auth_protects_monitoring_but_never_the_probes() {
    // The RS256 key given as PEM text this time, rather than a path; no issuer or
    // audience expected.
    let public_pem = std::fs::read_to_string(RS256_PUBLIC_PATH).unwrap();
    let env = TestEnv::start_with(
        "auth-metrics",
        auth_env(&[
            ("TASKER_METRICS_AUTH", "on"),
            ("TASKER_JWT_RS256_PUBLIC_KEY", &public_pem),
            ("TASKER_JWT_ISSUER", ""),
            ("TASKER_JWT_AUDIENCE", ""),
        ]),
    )
    .await
    .unwrap();
    for path in ["/health/live", "/health/ready", "/openapi.json"] {
        assert_eq!(get(&env, path, None).await.status, StatusCode::OK, "{path}");
    }
    let scraper = rs256(&json!({"sub": "prometheus", "exp": now() + 600, "scope": "metrics:read"}));
    let reader = hs256(&json!({"exp": now() + 600, "scope": "tasks:read"}));
    for path in ["/metrics", "/health/status"] {
        assert_unauthenticated(&get(&env, path, None).await, path);
        assert_forbidden(&get(&env, path, Some(&reader)).await, "metrics:read");
        let answer = get(&env, path, Some(&scraper)).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.body);
    }
    assert_forbidden(&get(&env, "/v1/tasks", Some(&scraper)).await, "tasks:read");
    env.finish().await.unwrap();
}

#[tokio::test]
async fn auth_is_off_by_default_and_says_so_loudly() {
    let mut env = TestEnv::start_with("auth-off", logged(EnvOptions::default()))
        .await
        .unwrap();
    let warning = env
        .coordinator
        .wait_for_log("authentication is OFF", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(warning.contains("WARN"), "{warning}");
    assert_eq!(get(&env, "/v1/tasks", None).await.status, StatusCode::OK);
    // A token is ignored, even a bad one.
    assert_eq!(
        get(&env, "/v1/tasks", Some("nonsense")).await.status,
        StatusCode::OK
    );
    env.finish().await.unwrap();
}
