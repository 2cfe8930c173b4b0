//! The web console (`/ui/`, docs/console.md) in a real browser: Debian's headless Chromium
//! driven through chromedriver (WebDriver), against a coordinator with authentication on,
//! real workers, PostgreSQL and RabbitMQ.
//!
//! Without `chromium` and `chromedriver` these tests fail saying what to install
//! (deploy/test.sh installs them), unless `TASKER_SKIP_BROWSER=1`. With
//! `TASKER_CONSOLE_SCREENSHOTS=<dir>` they save a screenshot of each page they check (the
//! ones in docs/console/ come from there).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};
use tasker_tests::http_stub::{Answer, HttpStub};
use tasker_tests::{EnvOptions, TestEnv};
use tokio::process::{Child, Command};

const SECRET: &str = "test-only-console-hs256-secret-0123456789";

/// How long a page may take to show what a test waits for: generous, for a slow machine.
const PATIENCE: Duration = Duration::from_secs(45);

fn token(subject: &str, scope: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    encode(
        &Header::default(),
        &json!({"sub": subject, "scope": scope, "iat": now, "exp": now + 3600}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn auth_options() -> EnvOptions {
    EnvOptions {
        coordinator_env: vec![
            ("TASKER_AUTH".into(), "on".into()),
            ("TASKER_JWT_HS256_SECRET".into(), SECRET.into()),
            // The workers page reads the queues: read them often.
            ("TASKER_GAUGE_INTERVAL_MS".into(), "500".into()),
        ],
        ..EnvOptions::default()
    }
}

/// Whether the browser tests should run; panics naming what is missing.
fn browser_available() -> bool {
    if std::env::var("TASKER_SKIP_BROWSER").is_ok_and(|v| v == "1") {
        eprintln!("TASKER_SKIP_BROWSER=1: the console's browser test is skipped");
        return false;
    }
    for program in ["chromium", "chromedriver"] {
        let found = std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| dir.join(program).is_file())
        });
        assert!(
            found,
            "`{program}` is not installed: `apt-get install chromium chromium-driver` \
             (deploy/test.sh does it), or set TASKER_SKIP_BROWSER=1"
        );
    }
    true
}

/// A headless Chromium session through its own chromedriver.
struct Browser {
    client: Client,
    driver: Child,
}

impl Drop for Browser {
    /// A test that panicked never closed its session: end chromedriver and the Chromium
    /// it started (its own process group), so a failure leaves no browser behind.
    fn drop(&mut self) {
        if let Some(group) = self.driver.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{group}")])
                .status();
        }
    }
}

impl Browser {
    async fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            // Its own process group, with the browser it starts: see `Drop`.
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while reqwest::get(format!("{url}/status")).await.is_err() {
            assert!(started.elapsed() < PATIENCE, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000"],
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&url)
            .await
            .expect("a Chromium session");
        Browser { client, driver }
    }

    /// Open the console at `route` (e.g. `#/tasks/<id>`) and sign in with `token`.
    async fn sign_in(&self, base_url: &str, route: &str, token: &str) {
        self.client
            .goto(&format!("{base_url}/ui/{route}"))
            .await
            .unwrap();
        self.wait_for("#token-input").await;
        let input = self
            .client
            .find(Locator::Css("#token-input"))
            .await
            .unwrap();
        input.send_keys(token).await.unwrap();
        self.client
            .find(Locator::Css("#token-save"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    /// Wait until `script` (the body of a function) returns something truthy; returns it.
    async fn wait_until(&self, what: &str, script: &str) -> Value {
        let started = Instant::now();
        loop {
            let value = self.client.execute(script, vec![]).await.unwrap();
            let truthy = match &value {
                Value::Null | Value::Bool(false) => false,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return value;
            }
            if started.elapsed() > PATIENCE {
                let page = self
                    .client
                    .execute("return document.body.innerText", vec![])
                    .await
                    .unwrap_or_default();
                panic!("waited {PATIENCE:?} for {what}; the page shows:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// From now on the page's requests whose URL `matches` (a JavaScript expression of
    /// `url`) wait until [`Browser::release`] is called with `name`. The console is one
    /// page, so this holds across its routes.
    async fn hold_requests(&self, matches: &str, name: &str) {
        let key = format!("releaseHeld_{name}");
        let script = format!(
            "const fetchNow = window.fetch;
             let release;
             const held = new Promise((resolve) => (release = resolve));
             window[{key:?}] = release;
             window.fetch = (url, init) => (({matches})(String(url)))
               ? held.then(() => fetchNow(url, init))
               : fetchNow(url, init);"
        );
        self.client.execute(&script, vec![]).await.unwrap();
    }

    /// Let the requests [`Browser::hold_requests`] held as `name` go.
    async fn release(&self, name: &str) {
        let script = format!("window[{:?}]()", format!("releaseHeld_{name}"));
        self.client.execute(&script, vec![]).await.unwrap();
    }

    /// Go to a route of the console (`#/tasks/…`) in this document.
    async fn go(&self, route: &str) {
        let script = format!("location.hash = {route:?}");
        self.client.execute(&script, vec![]).await.unwrap();
    }

    async fn wait_for(&self, selector: &str) {
        self.wait_until(
            &format!("`{selector}`"),
            &format!("return !!document.querySelector({selector:?})"),
        )
        .await;
    }

    async fn exists(&self, selector: &str) -> bool {
        self.client
            .execute(
                &format!("return !!document.querySelector({selector:?})"),
                vec![],
            )
            .await
            .unwrap()
            .as_bool()
            .unwrap()
    }

    /// Click what `selector` finds. Live updates redraw the page: an element found just
    /// before a redraw is gone when clicked, so a stale one is looked up again.
    async fn click(&self, selector: &str) {
        let started = Instant::now();
        loop {
            self.wait_for(selector).await;
            let clicked = match self.client.find(Locator::Css(selector)).await {
                Ok(element) => element.click().await,
                Err(error) => Err(error),
            };
            match clicked {
                Ok(()) => return,
                Err(error) if started.elapsed() < PATIENCE => {
                    eprintln!("clicking {selector} again: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("cannot click {selector}: {error}"),
            }
        }
    }

    /// Type `text` into the field `selector` finds, so that it holds exactly that. A live
    /// update that redraws the page while keys are sent leaves the field with part of
    /// them (or the keys reach a field no longer on the page): it is filled again.
    async fn fill(&self, selector: &str, text: &str) {
        let started = Instant::now();
        loop {
            self.wait_for(selector).await;
            let typed = match self.client.find(Locator::Css(selector)).await {
                Ok(element) => match element.clear().await {
                    Ok(()) => element.send_keys(text).await,
                    Err(error) => Err(error),
                },
                Err(error) => Err(error),
            };
            let holds = self
                .client
                .execute(
                    &format!("return document.querySelector({selector:?})?.value"),
                    vec![],
                )
                .await
                .unwrap();
            match typed {
                Ok(()) if holds == json!(text) => return,
                outcome if started.elapsed() < PATIENCE => {
                    eprintln!("filling {selector} again: {outcome:?}, it holds {holds}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                outcome => panic!("cannot fill {selector}: {outcome:?}, it holds {holds}"),
            }
        }
    }

    /// Save a screenshot as `<TASKER_CONSOLE_SCREENSHOTS>/<name>.png`, when asked for.
    async fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os("TASKER_CONSOLE_SCREENSHOTS") else {
            return;
        };
        // Let charts and fonts settle.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let png = self.client.screenshot().await.unwrap();
        let path = PathBuf::from(dir).join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("saved {}", path.display());
    }

    async fn close(self) {
        self.client.clone().close().await.unwrap();
    }
}

/// POST or GET with a bearer token.
async fn call(
    env: &TestEnv,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = env
        .http
        .request(method, format!("{}{path}", env.base_url))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Create a task from `namespace`/`name` with `context`; its id.
async fn create(env: &TestEnv, admin: &str, namespace: &str, name: &str, context: Value) -> String {
    let (status, created) = call(
        env,
        reqwest::Method::POST,
        "/v1/tasks",
        admin,
        Some(json!({"namespace": namespace, "name": name, "context": context})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    created["task_id"].as_str().unwrap().to_owned()
}

/// Register `yaml`, a template of `namespace`/`name` whose first steps wait for signals,
/// and create a task of it; its id, once it runs.
async fn waiting_task(
    env: &TestEnv,
    admin: &str,
    (namespace, name): (&str, &str),
    yaml: &str,
) -> String {
    register(env, admin, yaml).await;
    let task = create(env, admin, namespace, name, json!({})).await;
    wait_for_status(env, admin, &task, "in_progress").await;
    task
}

/// Send `signal` to the task.
async fn signal(env: &TestEnv, admin: &str, task: &str, signal: &str) {
    let (status, answer) = call(
        env,
        reqwest::Method::POST,
        &format!("/v1/tasks/{task}/signals/{signal}"),
        admin,
        Some(json!({})),
    )
    .await;
    assert!(status < 300, "the signal answered {status}: {answer}");
}

async fn register(env: &TestEnv, admin: &str, yaml: &str) {
    let response = env
        .http
        .post(format!("{}/v1/templates", env.base_url))
        .bearer_auth(admin)
        .header("content-type", "application/yaml")
        .body(yaml.to_owned())
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{:?}",
        response.text().await
    );
}

/// A test's coordinator with authentication on, `template` registered and a worker for
/// `namespace`; the admin token.
async fn console_env(test: &str, template: &str, namespace: &str) -> (TestEnv, String) {
    let mut env = TestEnv::start_with(test, auth_options()).await.unwrap();
    let admin = token("setup", "admin");
    register(&env, &admin, template).await;
    env.start_worker(&format!("{namespace}-worker"), &[namespace])
        .await
        .unwrap();
    (env, admin)
}

async fn wait_for_status(env: &TestEnv, admin: &str, task_id: &str, status: &str) -> Value {
    let started = Instant::now();
    loop {
        let (_, task) = call(
            env,
            reqwest::Method::GET,
            &format!("/v1/tasks/{task_id}"),
            admin,
            None,
        )
        .await;
        if task["status"] == status {
            return task;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "task {task_id} never reached {status}: {task}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The on-call path: a failing task's page marks the failed step; a read-only token is
/// offered no action and the API refuses it one; an operator retries in one click and the
/// graph turns complete live, without the page reloading.
#[tokio::test]
async fn a_failed_task_is_retried_from_its_page_and_turns_complete_live() {
    if !browser_available() {
        return;
    }
    let mut env = TestEnv::start_with("console_retry", auth_options())
        .await
        .unwrap();
    let admin = token("setup", "admin");
    let reader = token("viewer", "tasks:read");
    let operator = token("oncall", "tasks:read tasks:operate");
    // The partner refuses the first charge (a permanent error: the task fails), then
    // accepts: the operator's retry succeeds.
    let partner = HttpStub::start(vec![
        Answer::new(409, r#"{"error": "card on hold"}"#),
        Answer::new(200, r#"{"charged": true}"#),
    ])
    .await
    .unwrap();
    register(
        &env,
        &admin,
        &format!(
            "namespace: console\nname: checkout\nversion: 1.0.0\nsteps:\n  - {{name: reserve, handler: tasker.noop}}\n  - {{name: charge, handler: tasker.http, depends_on: [reserve], config: {{url: \"{}\", method: POST}}}}\n  - {{name: confirm, handler: tasker.noop, depends_on: [charge]}}\n  - {{name: email, handler: tasker.noop, depends_on: [charge]}}\n",
            partner.url
        ),
    )
    .await;
    env.start_worker_calling_stubs("console-worker", &["console"])
        .await
        .unwrap();
    let task_id = create(&env, &admin, "console", "checkout", json!({"order": 7})).await;
    wait_for_status(&env, &admin, &task_id, "error").await;

    let browser = Browser::start().await;
    // Read-only: the failed step is marked, no action is offered, and the API refuses the
    // retry the page did not offer.
    browser
        .sign_in(&env.base_url, &format!("#/tasks/{task_id}"), &reader)
        .await;
    browser
        .wait_for("#task-graph g.node.status-error[data-step='charge']")
        .await;
    browser.wait_for("#read-only").await;
    assert!(
        !browser.exists("#action-retry").await,
        "a reader is offered a retry"
    );
    assert!(browser.exists("#task-status .status-error").await);
    let error = browser
        .wait_until(
            "the failed step's error",
            "return document.querySelector('#step-error')?.innerText",
        )
        .await;
    assert!(
        error.as_str().unwrap().contains("409"),
        "the step's error is shown: {error}"
    );
    let refused = browser
        .client
        .execute_async(
            &format!(
                "const done = arguments[arguments.length - 1];
                 fetch('/v1/tasks/{task_id}/retry', {{method: 'POST',
                     headers: {{Authorization: 'Bearer ' + sessionStorage.getItem('tasker.token'),
                               'Content-Type': 'application/json'}}, body: '{{}}'}})
                   .then(async r => done([r.status, (await r.json()).error.code]));"
            ),
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(refused, json!([403, "insufficient_scope"]));
    assert_eq!(
        call(
            &env,
            reqwest::Method::GET,
            &format!("/v1/tasks/{task_id}"),
            &admin,
            None
        )
        .await
        .1["status"],
        "error",
        "the refused retry changed nothing"
    );

    // The operator: forget the reader's token, sign in again, retry in one click.
    browser.click("#sign-out").await;
    browser
        .sign_in(&env.base_url, &format!("#/tasks/{task_id}"), &operator)
        .await;
    browser
        .wait_for("#task-graph g.node.status-error[data-step='charge']")
        .await;
    browser.wait_for("#live.on").await;
    browser.screenshot("task-failed").await;
    // A marker the page keeps only as long as it is not reloaded.
    browser
        .client
        .execute("window.__notReloaded = true; return true", vec![])
        .await
        .unwrap();
    browser.click("#action-retry").await;
    browser.wait_for("#task-status .status-complete").await;
    for step in ["reserve", "charge", "confirm", "email"] {
        assert!(
            browser
                .exists(&format!(
                    "#task-graph g.node.status-complete[data-step='{step}']"
                ))
                .await,
            "{step} is drawn complete"
        );
    }
    assert_eq!(
        browser
            .client
            .execute("return window.__notReloaded === true", vec![])
            .await
            .unwrap(),
        json!(true),
        "the page turned complete without reloading"
    );
    let history = browser
        .wait_until(
            "the retry in the history",
            "return document.querySelector('#history-table')?.innerText",
        )
        .await;
    assert!(
        history
            .as_str()
            .unwrap()
            .contains("retried from the console"),
        "{history}"
    );
    browser.screenshot("task-complete").await;

    // The task list shows it complete, and a new task appears there live.
    browser
        .client
        .goto(&format!("{}/ui/#/tasks", env.base_url))
        .await
        .unwrap();
    browser
        .wait_for(&format!(
            "#tasks-table tr[data-task-id='{task_id}'] .status-complete"
        ))
        .await;
    browser.wait_for("#live.on").await;
    let second = create(&env, &admin, "console", "checkout", json!({"order": 8})).await;
    browser
        .wait_for(&format!("#tasks-table tr[data-task-id='{second}']"))
        .await;
    browser.screenshot("tasks").await;
    browser.close().await;
    env.finish().await.unwrap();
}

/// With `TASKER_EVENTS` naming only some events, the badge says which: the pages change
/// live on those alone.
#[tokio::test]
async fn the_badge_names_the_events_published_when_only_some_are() {
    if !browser_available() {
        return;
    }
    let mut options = auth_options();
    options
        .coordinator_env
        .push(("TASKER_EVENTS".into(), "task.*".into()));
    let env = TestEnv::start_with("console_some_events", options)
        .await
        .unwrap();
    let browser = Browser::start().await;
    browser
        .sign_in(&env.base_url, "#/tasks", &token("viewer", "tasks:read"))
        .await;
    browser.wait_for("#live.on").await;
    let badge = browser
        .wait_until(
            "the live badge",
            "return document.querySelector('#live')?.innerText",
        )
        .await;
    assert_eq!(badge, json!("live: task.* only"));
    browser.close().await;
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_page_shows_what_changed_before_its_live_stream_began() {
    // A page reads what it shows, then opens its event stream: what changes in between
    // reaches no stream. Here the browser holds the task page's stream back while the
    // task completes; once the stream is ready the page must show the task complete.
    if !browser_available() {
        return;
    }
    let env = TestEnv::start_with("console_late_stream", auth_options())
        .await
        .unwrap();
    let admin = token("setup", "admin");
    let task = waiting_task(
        &env,
        &admin,
        ("late", "gate"),
        "namespace: late\nname: gate\nversion: 1.0.0\nsteps:\n  - {name: hold, handler: tasker.wait, config: {signal: go}}\n",
    )
    .await;

    let browser = Browser::start().await;
    browser.sign_in(&env.base_url, "#/tasks", &admin).await;
    browser.wait_for("#live.on").await;
    // From now on the page's event streams wait; the task page below opens in this
    // document, with this fetch.
    browser
        .hold_requests("(url) => url.includes('/v1/events/stream')", "stream")
        .await;
    browser.go(&format!("#/tasks/{task}")).await;
    browser.wait_for("#task-status .status-in_progress").await;
    signal(&env, &admin, &task, "go").await;
    wait_for_status(&env, &admin, &task, "complete").await;
    // Its events published, and a second for the coordinator to hand them to the
    // streams open then (none of this page's): a stream opened after has not seen them.
    let newest = env.newest_transition_id().await.unwrap();
    env.wait_for_relay(newest, Duration::from_secs(30))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        browser.exists("#task-status .status-in_progress").await,
        "nothing told the page yet"
    );
    browser.release("stream").await;
    browser.wait_for("#task-status .status-complete").await;
    browser.close().await;
    env.finish().await.unwrap();
}

#[tokio::test]
async fn cancel_stays_armed_across_a_live_reload_and_the_second_click_cancels() {
    if !browser_available() {
        return;
    }
    let env = TestEnv::start_with("console_cancel", auth_options())
        .await
        .unwrap();
    let admin = token("setup", "admin");
    let task = waiting_task(
        &env,
        &admin,
        ("arm", "gates"),
        "namespace: arm\nname: gates\nversion: 1.0.0\nsteps:\n  - {name: hold, handler: tasker.wait, config: {signal: go}}\n  - {name: tick, handler: tasker.wait, config: {signal: tick}}\n",
    )
    .await;

    let browser = Browser::start().await;
    browser
        .sign_in(&env.base_url, &format!("#/tasks/{task}"), &admin)
        .await;
    browser.wait_for("#live.on").await;
    browser.click("#action-cancel").await;
    // A step moves between the two clicks: the page reloads and draws its actions anew.
    signal(&env, &admin, &task, "tick").await;
    browser
        .wait_for("#task-graph g.node.status-complete[data-step='tick']")
        .await;
    let label = browser
        .wait_until(
            "the cancel button",
            "return document.querySelector('#action-cancel')?.innerText",
        )
        .await;
    assert_eq!(
        label, "Click again to cancel",
        "the first click was forgotten"
    );
    browser.click("#action-cancel").await;
    wait_for_status(&env, &admin, &task, "cancelled").await;
    browser.close().await;
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_token_revoked_while_the_workers_page_polls_brings_the_sign_in_form_back() {
    if !browser_available() {
        return;
    }
    let mut options = auth_options();
    options
        .coordinator_env
        .push(("TASKER_METRICS_AUTH".into(), "on".into()));
    let env = TestEnv::start_with("console_revoked", options)
        .await
        .unwrap();
    let oncall = crate::auth::create_token(&env, "oncall", "tasks:read,metrics:read").await;

    let browser = Browser::start().await;
    browser.sign_in(&env.base_url, "#/workers", &oncall).await;
    browser.wait_for("#queues-table").await;
    let (revoked, _, stderr) = crate::auth::token_command(&env, &["revoke", "oncall"]).await;
    assert!(revoked, "{stderr}");
    // The page's next read of /health/status (every 5 s) is refused: the sign-in form
    // comes back, and stays.
    browser.wait_for("#token-form").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        browser.exists("#token-form").await,
        "the sign-in form was drawn over"
    );
    browser.close().await;
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_page_left_while_it_loads_leaves_the_next_pages_live_updates_alone() {
    // The user opens a task and goes back to the list before the task page has read
    // everything. When the task page's last read arrives, it must not open its stream:
    // that would close the list's, and the list would stop showing new tasks.
    if !browser_available() {
        return;
    }
    let env = TestEnv::start_with("console_left_page", auth_options())
        .await
        .unwrap();
    let admin = token("setup", "admin");
    register(
        &env,
        &admin,
        "namespace: left\nname: one\nversion: 1.0.0\nsteps:\n  - {name: only, handler: tasker.noop}\n",
    )
    .await;
    // No worker serves `left`: its tasks stay as created.
    let first = create(&env, &admin, "left", "one", json!({})).await;

    let browser = Browser::start().await;
    browser.sign_in(&env.base_url, "#/tasks", &admin).await;
    browser
        .wait_for(&format!("tr[data-task-id='{first}']"))
        .await;
    // From now on the task page's history read waits.
    browser
        .hold_requests("(url) => url.endsWith('/transitions')", "history")
        .await;
    browser.go(&format!("#/tasks/{first}")).await;
    // The task page is drawn (its frame comes before its reads) and reading.
    browser.wait_for("#task-graph").await;
    browser.go("#/tasks").await;
    browser.wait_for("#tasks-table").await;
    browser.wait_for("#live.on").await;
    browser.release("history").await;
    // Time for the left page to finish its load (and, before the fix, open its stream).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = create(&env, &admin, "left", "one", json!({})).await;
    browser
        .wait_for(&format!("tr[data-task-id='{second}']"))
        .await;
    assert!(
        browser.exists("#tasks-table").await,
        "the list is still the page shown"
    );
    browser.close().await;
    env.finish().await.unwrap();
}

/// Analytics: the step a test made slow is the slowest step and lies on the bottleneck
/// path drawn on the template's graph; the other pages render what the API holds.
#[tokio::test]
async fn the_analytics_page_shows_the_step_made_slow() {
    if !browser_available() {
        return;
    }
    let (env, admin) = console_env(
        "console_analytics",
        "namespace: insight\nname: report\nversion: 1.0.0\nsteps:\n  - {name: gather, handler: tasker.noop}\n  - {name: render, handler: tasker.sleep, depends_on: [gather], config: {ms: 400}}\n  - {name: index, handler: tasker.noop, depends_on: [gather]}\n  - {name: publish, handler: tasker.noop, depends_on: [render, index]}\n",
        "insight",
    )
    .await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(create(&env, &admin, "insight", "report", json!({"n": n})).await);
    }
    for id in &ids {
        wait_for_status(&env, &admin, id, "complete").await;
    }
    let browser = Browser::start().await;
    browser
        .sign_in(
            &env.base_url,
            "#/analytics?namespace=insight&name=report",
            &admin,
        )
        .await;
    let slowest = browser
        .wait_until(
            "the slowest step",
            "return document.querySelector('#slowest-step')?.innerText",
        )
        .await;
    assert_eq!(slowest, json!("render"));
    assert!(
        browser
            .exists("#bottleneck-graph g.node.critical[data-step='render']")
            .await
    );
    assert!(
        !browser
            .exists("#bottleneck-graph g.node.critical[data-step='index']")
            .await
    );
    let path = browser
        .wait_until(
            "the bottleneck path",
            "return document.querySelector('#bottleneck-path')?.innerText",
        )
        .await;
    assert!(path.as_str().unwrap().starts_with("gather"), "{path}");
    assert!(
        browser
            .exists("#step-run-bars .critical[data-step='render']")
            .await
    );
    // The error rate over time is drawn (0 in the bucket that holds the three tasks).
    assert!(browser.exists("polyline.series-errors").await);
    browser.screenshot("analytics").await;

    // The template's graph, the workers and their queues.
    browser
        .client
        .goto(&format!("{}/ui/#/templates/insight/report", env.base_url))
        .await
        .unwrap();
    browser
        .wait_for("#template-graph g.node[data-step='publish']")
        .await;
    browser.screenshot("template").await;
    browser
        .client
        .goto(&format!("{}/ui/#/workers", env.base_url))
        .await
        .unwrap();
    browser.wait_for("#workers-table td").await;
    let dead = browser
        .wait_until(
            "the dead-letter count",
            "return document.querySelector('#dead-letter-count')?.innerText",
        )
        .await;
    assert_eq!(dead, json!("0"));
    browser.screenshot("workers").await;

    // A task waiting for a signal: the page fills in the signal's name, sends it, and the
    // task completes; another waiting task is cancelled (two clicks).
    register(
        &env,
        &admin,
        "namespace: insight\nname: approval\nversion: 1.0.0\nsteps:\n  - {name: ask, handler: tasker.noop}\n  - {name: approved, handler: tasker.wait, depends_on: [ask], config: {signal: manager_ok}}\n  - {name: ship, handler: tasker.noop, depends_on: [approved]}\n",
    )
    .await;
    let mut waiting = Vec::new();
    for n in 0..2 {
        waiting.push(create(&env, &admin, "insight", "approval", json!({"n": n})).await);
    }
    browser
        .client
        .goto(&format!("{}/ui/#/tasks/{}", env.base_url, waiting[0]))
        .await
        .unwrap();
    // Once the step waits, the task changes no more until the signal, so no live update
    // redraws the form while it is being filled in.
    browser
        .wait_until(
            "the history to show the step waiting for its signal",
            "return [...document.querySelectorAll('td')].some((td) => td.textContent === 'waiting_for_signal')",
        )
        .await;
    browser
        .click("#task-graph g.node[data-step='approved']")
        .await;
    let signal = browser
        .wait_until(
            "the signal's name",
            "return document.querySelector('#signal-name')?.value",
        )
        .await;
    assert_eq!(signal, json!("manager_ok"));
    browser.fill("#signal-payload", r#"{"by": "dana"}"#).await;
    browser.click("#action-signal").await;
    browser.wait_for("#task-status .status-complete").await;
    let (_, task) = call(
        &env,
        reqwest::Method::GET,
        &format!("/v1/tasks/{}", waiting[0]),
        &admin,
        None,
    )
    .await;
    assert_eq!(
        crate::steps_by_name(&task)["approved"]["results"],
        json!({"by": "dana"})
    );

    browser
        .client
        .goto(&format!("{}/ui/#/tasks/{}", env.base_url, waiting[1]))
        .await
        .unwrap();
    browser.click("#action-cancel").await;
    assert!(
        browser.exists("#task-status .status-in_progress").await
            || browser.exists("#task-status .status-pending").await,
        "one click does not cancel"
    );
    browser.click("#action-cancel").await;
    browser.wait_for("#task-status .status-cancelled").await;
    browser.close().await;
    env.finish().await.unwrap();
}

/// The coordinator loses the broker while a stream is open: the events published until
/// its consumer is bound again reach no stream, so the stream says `lagged` (the page
/// reloads), then carries events again.
#[tokio::test]
async fn a_stream_says_lagged_when_its_coordinator_lost_the_broker() {
    let mut env = TestEnv::start("console_stream_gap").await.unwrap();
    env.register_template(
        "namespace: gap\nname: one\nsteps:\n  - {name: only, handler: tasker.noop}\n",
    )
    .await
    .unwrap();
    env.start_worker("gap-worker", &["gap"]).await.unwrap();
    let mut stream = env
        .http
        .get(format!("{}/v1/events/stream?namespace=gap", env.base_url))
        .send()
        .await
        .unwrap();
    let ready = read_events(&mut stream, |events| !events.is_empty()).await;
    assert_eq!(ready[0], ("ready".to_owned(), json!({"events": true})));

    let name = format!("tasker-coordinator {}", env.prefix);
    let closed = tasker_tests::close_broker_connections(&name).await.unwrap();
    assert_eq!(closed, 1, "the coordinator's connection is named {name:?}");
    let events = read_events(&mut stream, |events| {
        events.iter().any(|(name, _)| name == "lagged")
    })
    .await;
    assert_eq!(
        events,
        [("lagged".to_owned(), json!({"missed": null}))],
        "{events:#?}"
    );
    let task = env
        .run_task(json!({"namespace": "gap", "name": "one"}), PATIENCE)
        .await
        .unwrap();
    let id = task["task_id"].as_str().unwrap();
    read_events(&mut stream, |events| {
        events
            .iter()
            .any(|(_, e)| e["event"] == "task.completed" && e["task_id"] == id)
    })
    .await;
    drop(stream);
    env.finish().await.unwrap();
}

/// Read server-sent events from `response` until `done` says so: (event name, data).
pub(crate) async fn read_events(
    response: &mut reqwest::Response,
    mut done: impl FnMut(&[(String, Value)]) -> bool,
) -> Vec<(String, Value)> {
    let started = Instant::now();
    let mut buffer = String::new();
    let mut events = Vec::new();
    while !done(&events) {
        let left = PATIENCE.saturating_sub(started.elapsed());
        let chunk = tokio::time::timeout(left, response.chunk())
            .await
            .unwrap_or_else(|_| panic!("no more events in {PATIENCE:?}; got {events:#?}"))
            .unwrap()
            .expect("the stream stays open");
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(cut) = buffer.find("\n\n") {
            let block: String = buffer.drain(..cut + 2).collect();
            let mut name = "message".to_owned();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    name = value.trim().to_owned();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.trim_start());
                }
            }
            if !data.is_empty() {
                events.push((name, serde_json::from_str(&data).unwrap()));
            }
        }
    }
    events
}

/// `GET /v1/events/stream` without a browser: it names every bad parameter, opens with
/// `ready`, and carries the lifecycle events its filter asks for and no others, with
/// message signing on (lifecycle events are not signed).
#[tokio::test]
async fn the_event_stream_carries_the_filtered_events_live() {
    const KEY: &str = "console-stream-test-key-0123456789abcdef";
    let options = EnvOptions {
        coordinator_env: vec![("TASKER_MESSAGE_KEY".into(), KEY.into())],
        ..EnvOptions::default()
    };
    let mut env = TestEnv::start_with("console_stream", options)
        .await
        .unwrap();
    for namespace in ["watched", "other"] {
        env.register_template(&format!(
            "namespace: {namespace}\nname: flow\nsteps:\n  - {{name: a, handler: tasker.noop}}\n  - {{name: b, handler: tasker.noop, depends_on: [a]}}\n"
        ))
        .await
        .unwrap();
    }
    env.start_worker_with(
        tasker_tests::binary("tasker-worker"),
        "stream-worker",
        &["watched", "other"],
        8,
        &[("TASKER_MESSAGE_KEY", KEY)],
    )
    .await
    .unwrap();
    // The console's files: open, under the content security policy, revalidated by tag.
    let page = env
        .http
        .get(format!("{}/ui/", env.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    let etag = page.headers()["etag"].clone();
    let again = env
        .http
        .get(format!("{}/ui/", env.base_url))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    let missing = env
        .http
        .get(format!("{}/ui/nope.js", env.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let (status, me) = env.get("/v1/whoami").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(me["authentication"], false);
    assert_eq!(me["events"], true);

    let bad = env
        .http
        .get(format!(
            "{}/v1/events/stream?task_id=nope&kind=job&namespace=&colour=red",
            env.base_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    let paths = crate::detail_paths(&body);
    assert_eq!(paths, ["task_id", "kind", "namespace", "colour"], "{body}");

    let mut stream = env
        .http
        .get(format!(
            "{}/v1/events/stream?namespace=watched&kind=task",
            env.base_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(
        stream.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let ready = read_events(&mut stream, |events| !events.is_empty()).await;
    assert_eq!(ready[0], ("ready".to_owned(), json!({"events": true})));

    let other = env
        .run_task(
            json!({"namespace": "other", "name": "flow", "context": {}}),
            PATIENCE,
        )
        .await
        .unwrap();
    let watched = env
        .run_task(
            json!({"namespace": "watched", "name": "flow", "context": {}}),
            PATIENCE,
        )
        .await
        .unwrap();
    let watched_id = watched["task_id"].as_str().unwrap();
    let events = read_events(&mut stream, |events| {
        events
            .iter()
            .any(|(_, e)| e["event"] == "task.completed" && e["task_id"] == watched_id)
    })
    .await;
    let names: Vec<&str> = events
        .iter()
        .map(|(_, e)| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["task.created", "task.started", "task.completed"],
        "{events:#?}"
    );
    assert!(
        events.iter().all(|(name, e)| name == "message"
            && e["task_id"] == watched_id
            && e["namespace"] == "watched"),
        "only the watched namespace's task events, not {}: {events:#?}",
        other["task_id"]
    );
    drop(stream);
    env.finish().await.unwrap();
}

/// Event streams hold their connections for as long as they are open: they may take at
/// most half of the API's connections, so that probes and other requests are still
/// accepted however many pages watch.
#[tokio::test]
async fn event_streams_leave_half_the_connections_to_other_requests() {
    let options = EnvOptions {
        coordinator_env: vec![("TASKER_HTTP_MAX_CONNECTIONS".into(), "8".into())],
        ..EnvOptions::default()
    };
    let env = TestEnv::start_with("console_stream_cap", options)
        .await
        .unwrap();
    // Each stream on a connection of its own, as each browser tab's would be.
    let mut streams = Vec::new();
    for _ in 0..4 {
        let client = reqwest::Client::new();
        let stream = client
            .get(format!("{}/v1/events/stream", env.base_url))
            .send()
            .await
            .unwrap();
        assert_eq!(stream.status(), 200);
        streams.push((client, stream));
    }
    let refused = reqwest::Client::new()
        .get(format!("{}/v1/events/stream", env.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("TASKER_HTTP_MAX_CONNECTIONS"),
        "{body}"
    );
    // Liveness and the API still answer, each on a new connection.
    for path in ["/health/live", "/v1/whoami"] {
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            reqwest::Client::new()
                .get(format!("{}{path}", env.base_url))
                .send(),
        )
        .await
        .unwrap_or_else(|_| panic!("{path} was not answered"))
        .unwrap();
        assert_eq!(answer.status(), 200, "{path}");
    }
    drop(streams);
    env.finish().await.unwrap();
}

/// A hidden tab gives its event stream's connection back (a browser shares six per host
/// among all its tabs), and a shown one opens a new stream and reads again what changed
/// meanwhile.
#[tokio::test]
async fn a_hidden_tab_closes_its_stream_and_catches_up_when_shown() {
    if !browser_available() {
        return;
    }
    let (env, admin) = console_env(
        "console_hidden",
        "namespace: hidden\nname: gate\nversion: 1.0.0\nsteps:\n  - {name: hold, handler: tasker.wait, config: {signal: go}}\n",
        "hidden",
    )
    .await;
    let task = create(&env, &admin, "hidden", "gate", json!({})).await;

    let browser = Browser::start().await;
    browser.sign_in(&env.base_url, "#/tasks", &admin).await;
    // Every stream the page opens from now on, by its abort signal.
    browser
        .client
        .execute(
            "const fetchNow = window.fetch;
             window.streamSignals = [];
             window.fetch = (url, init) => {
               if (String(url).includes('/v1/events/stream')) window.streamSignals.push(init.signal);
               return fetchNow(url, init);
             };",
            vec![],
        )
        .await
        .unwrap();
    browser.go(&format!("#/tasks/{task}")).await;
    browser.wait_for("#task-status .status-in_progress").await;
    browser.wait_for("#live.on").await;
    let set_hidden = |hidden: bool| {
        format!(
            "Object.defineProperty(document, 'hidden', {{configurable: true, get: () => {hidden}}});
             document.dispatchEvent(new Event('visibilitychange'));"
        )
    };
    browser
        .client
        .execute(&set_hidden(true), vec![])
        .await
        .unwrap();
    // Every stream the page opened (one, or more if it had to connect again) is closed.
    let closed = browser
        .wait_until(
            "the stream closed",
            "return window.streamSignals.length > 0 && window.streamSignals.every((s) => s.aborted) ? window.streamSignals.length : null",
        )
        .await
        .as_u64()
        .unwrap();
    assert_eq!(
        browser
            .client
            .execute("return document.querySelector('#live').innerText", vec![])
            .await
            .unwrap(),
        json!("paused while hidden")
    );

    // What happens while hidden is read once shown.
    signal(&env, &admin, &task, "go").await;
    wait_for_status(&env, &admin, &task, "complete").await;
    browser
        .client
        .execute(&set_hidden(false), vec![])
        .await
        .unwrap();
    browser.wait_for("#task-status .status-complete").await;
    browser.wait_for("#live.on").await;
    let streams = browser
        .client
        .execute("return window.streamSignals.map((s) => s.aborted)", vec![])
        .await
        .unwrap();
    let streams: Vec<bool> = serde_json::from_value(streams).unwrap();
    assert!(
        streams.len() as u64 > closed && streams.last() == Some(&false),
        "a new stream, open: {streams:?}"
    );
    assert!(
        streams[..closed as usize].iter().all(|aborted| *aborted),
        "{streams:?}"
    );
    browser.close().await;
    env.finish().await.unwrap();
}

/// A wide fan-out is drawn as one node for its instances, and the steps table lists
/// their counts and only those not complete: the page's cost does not grow with them.
/// The history it reads is the newest 200 transitions.
#[tokio::test]
async fn a_wide_fan_out_is_drawn_folded() {
    if !browser_available() {
        return;
    }
    let (env, admin) = console_env(
        "console_wide",
        "namespace: wide\nname: fan\nversion: 1.0.0\nsteps:\n  - {name: each, handler: tasker.noop, for_each: context.items}\n  - {name: after, handler: tasker.noop, depends_on: [each]}\n",
        "wide",
    )
    .await;
    let items: Vec<u32> = (0..30).collect();
    let task = create(&env, &admin, "wide", "fan", json!({"items": items})).await;
    wait_for_status(&env, &admin, &task, "complete").await;

    // The API's history, newest first cut.
    let transitions = |query: &'static str| {
        let (env, admin, task) = (&env, &admin, &task);
        async move {
            let answer = env
                .http
                .get(format!(
                    "{}/v1/tasks/{task}/transitions{query}",
                    env.base_url
                ))
                .bearer_auth(admin)
                .send()
                .await
                .unwrap();
            (
                answer.status().as_u16(),
                answer.json::<Value>().await.unwrap(),
            )
        }
    };
    let (status, all) = transitions("").await;
    assert_eq!(status, 200, "{all}");
    let (status, newest) = transitions("?limit=5").await;
    assert_eq!(status, 200, "{newest}");
    let all_steps = all["steps"].as_array().unwrap();
    assert!(all_steps.len() > 50, "{all}");
    assert_eq!(newest["steps"], json!(all_steps[all_steps.len() - 5..]));
    assert_eq!(newest["task"], all["task"], "the task's own, all of them");
    for query in ["?limit=0", "?colour=red"] {
        let (status, body) = transitions(query).await;
        assert_eq!(status, 400, "{query}: {body}");
    }

    let browser = Browser::start().await;
    browser
        .sign_in(&env.base_url, &format!("#/tasks/{task}"), &admin)
        .await;
    browser
        .wait_for("#task-graph g.node[data-step='each[0…29]']")
        .await;
    let nodes = browser
        .client
        .execute(
            "return document.querySelectorAll('#task-graph g.node').length",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(nodes, json!(3), "each's instances, each, after");
    assert!(browser.exists("tr.instances[data-instances='each']").await);
    assert!(
        !browser.exists("tr[data-step='each[3]']").await,
        "complete instances are not listed"
    );
    browser.close().await;
    env.finish().await.unwrap();
}

/// A step whose results the task's page left out (its steps' results pass 16 MiB
/// together) shows so, and loads them on demand.
#[tokio::test]
async fn results_left_out_of_the_task_page_load_on_demand() {
    if !browser_available() {
        return;
    }
    let (env, admin) = console_env(
        "console_omitted",
        "namespace: large\nname: fan\nversion: 1.0.0\nsteps:\n  - {name: each, handler: tasker.echo, for_each: context.items}\n  - {name: more, handler: tasker.echo, for_each: context.items}\n",
        "large",
    )
    .await;
    // Twenty-four instances echoing about 900 KB each, and two gathered lists of twelve:
    // about 43 MB, of which the page carries the first 16 MiB.
    let pad = "x".repeat(900_000);
    let items: Vec<u32> = (0..12).collect();
    let task = create(
        &env,
        &admin,
        "large",
        "fan",
        json!({"pad": pad, "items": items}),
    )
    .await;
    wait_for_status(&env, &admin, &task, "complete").await;

    let browser = Browser::start().await;
    browser
        .sign_in(&env.base_url, &format!("#/tasks/{task}"), &admin)
        .await;
    browser
        .click("#task-graph g.node[data-step='each[11]']")
        .await;
    browser.wait_for("#step-results #load-results").await;
    browser.click("#load-results").await;
    let shown = browser
        .wait_until(
            "the step's results, loaded",
            "return document.querySelector('#step-results pre.json')?.textContent",
        )
        .await;
    let shown: Value = serde_json::from_str(shown.as_str().unwrap()).unwrap();
    assert_eq!(shown["index"], 11);
    assert_eq!(
        shown["context"]["pad"].as_str().map(str::len),
        Some(900_000)
    );
    browser.close().await;
    env.finish().await.unwrap();
}

/// The schedules page shows each schedule's next fire times and last runs (each run's
/// task linked, with its status), a hundred at a time, and the rest on "More schedules…".
#[tokio::test]
async fn the_schedules_page_shows_next_and_last_runs_and_pages_on() {
    if !browser_available() {
        return;
    }
    let (env, admin) = console_env(
        "console_schedules",
        "namespace: clock\nname: tick\nversion: 1.0.0\nsteps:\n  - {name: run, handler: tasker.noop}\n",
        "clock",
    )
    .await;
    let schedule = |name: String, cron: &str| json!({"name": name, "namespace": "clock", "template": "tick", "cron": cron});
    let (status, body) = call(
        &env,
        reqwest::Method::POST,
        "/v1/schedules",
        &admin,
        Some(schedule("a-every-second".into(), "* * * * * *")),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    for n in 0..104 {
        let (status, body) = call(
            &env,
            reqwest::Method::POST,
            "/v1/schedules",
            &admin,
            Some(schedule(format!("b-morning-{n:03}"), "0 7 * * *")),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }

    let browser = Browser::start().await;
    browser.sign_in(&env.base_url, "#/schedules", &admin).await;
    // Each last run links its task, with the task's status.
    browser
        .wait_until(
            "a last run of the every-second schedule, its task linked with its status",
            "return document.querySelector(\"tr[data-schedule='a-every-second'] td.last-runs a[href^='#/tasks/'] .badge\")",
        )
        .await;
    let next_runs = browser
        .wait_until(
            "the next fire times",
            "return document.querySelectorAll(\"tr[data-schedule='b-morning-000'] td.next-runs div\").length",
        )
        .await;
    assert_eq!(next_runs, 3);
    let rows = "return document.querySelectorAll('#schedules-table tbody tr').length";
    assert_eq!(browser.wait_until("the first page", rows).await, 100);
    browser.click("#schedules-more").await;
    browser
        .wait_until(
            "every schedule, after More schedules…",
            "return document.querySelectorAll('#schedules-table tbody tr').length === 105",
        )
        .await;
    assert!(browser.exists("tr[data-schedule='b-morning-103']").await);
    assert!(!browser.exists("#schedules-more:not([hidden])").await);
    browser.close().await;
    env.finish().await.unwrap();
}

/// The templates page lists a hundred templates, each with its versions, and the next
/// ones on **More templates…**; a template's page offers every version of it.
#[tokio::test]
async fn the_templates_page_pages_on_and_a_template_offers_its_versions() {
    if !browser_available() {
        return;
    }
    let template = |name: &str, version: &str| {
        format!(
            "namespace: shelf\nname: {name}\nversion: {version}\nsteps:\n  - {{name: only, handler: tasker.noop}}\n"
        )
    };
    let (env, admin) =
        console_env("console_templates", &template("a-first", "1.0.0"), "shelf").await;
    register(&env, &admin, &template("a-first", "1.10.0")).await;
    register(&env, &admin, &template("a-first", "1.2.0")).await;
    for n in 0..102 {
        register(&env, &admin, &template(&format!("b-more-{n:03}"), "1.0.0")).await;
    }

    let browser = Browser::start().await;
    browser.sign_in(&env.base_url, "#/templates", &admin).await;
    let rows = "return document.querySelectorAll('#templates-table tbody tr').length";
    assert_eq!(browser.wait_until("the first page", rows).await, 100);
    let versions = browser
        .wait_until(
            "the versions of a-first",
            "return document.querySelector(\"tr[data-template='shelf/a-first'] td:nth-child(2)\")?.innerText",
        )
        .await;
    assert_eq!(versions, "1.0.0, 1.2.0, 1.10.0");
    browser.click("#templates-more").await;
    browser
        .wait_until(
            "every template, after More templates…",
            "return document.querySelectorAll('#templates-table tbody tr').length === 103",
        )
        .await;
    assert!(browser.exists("tr[data-template='shelf/b-more-101']").await);
    assert!(!browser.exists("#templates-more:not([hidden])").await);

    browser
        .client
        .goto(&format!("{}/ui/#/templates/shelf/a-first", env.base_url))
        .await
        .unwrap();
    let offered = browser
        .wait_until(
            "the version choice",
            "const o = [...document.querySelectorAll('#template-version option')].map((o) => o.value); return o.length ? o.join(' ') : null",
        )
        .await;
    assert_eq!(offered, "1.0.0 1.2.0 1.10.0");
    browser.close().await;
    env.finish().await.unwrap();
}
