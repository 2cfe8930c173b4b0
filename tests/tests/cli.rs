//! The `tasker` command-line client against a real coordinator and worker: templates
//! apply and diagram, tasks create --wait (complete and failing), get, list filters,
//! explain, diagram, retry, resolve (a step, a task), bulk cancel and retry, JSON output,
//! and the exit codes of API, usage and connection errors.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tasker_tests::{StatusCode, TestEnv};
use tokio::process::Command;

const FLOW: &str = r#"
namespace: cli
name: flow
version: 1.0.0
description: a diamond
context_schema:
  type: object
  required: [who]
  properties: {who: {type: string}}
steps:
  - {name: a, handler: tasker.echo}
  - {name: b, handler: tasker.sleep, config: {ms: 400}, depends_on: [a]}
  - {name: c, handler: tasker.echo, depends_on: [a]}
  - {name: d, handler: tasker.noop, depends_on: [b, c]}
"#;

const DOOMED: &str = r#"
namespace: cli
name: doomed
version: 1.0.0
steps:
  - {name: x, handler: tasker.fail, config: {kind: permanent}}
  - {name: y, handler: tasker.noop, depends_on: [x]}
"#;

const INVALID: &str = r#"
namespace: cli
name: invalid
steps:
  - {name: a, handler: tasker.noop, depends_on: [a]}
"#;

/// What one run of `tasker` did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Run `tasker --url <url> args…` without colours, token or inherited URL.
async fn tasker_at(url: &str, args: &[&str]) -> Run {
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        Command::new(tasker_tests::binary("tasker"))
            .arg("--url")
            .arg(url)
            .args(args)
            .env_remove("TASKER_URL")
            .env_remove("TASKER_TOKEN")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("tasker finishes in time")
    .expect("tasker runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn tasker(env: &TestEnv, args: &[&str]) -> Run {
    tasker_at(&env.base_url, args).await
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The task id in a task view (`Task      <id>`).
fn task_id(run: &Run) -> String {
    run.stdout
        .lines()
        .find_map(|line| line.strip_prefix("Task "))
        .map(|rest| rest.trim().to_owned())
        .unwrap_or_else(|| panic!("no task id in\n{run}"))
}

/// The line of a table that starts with `name` as its first column.
fn row<'a>(run: &'a Run, name: &str) -> &'a str {
    run.stdout
        .lines()
        .find(|line| line.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no line for {name} in\n{run}"))
}

#[tokio::test]
async fn the_cli_drives_templates_and_tasks_end_to_end() {
    let mut env = TestEnv::start("cli").await.unwrap();
    let dir = std::env::temp_dir().join(format!("tasker-cli-{}", uuid::Uuid::new_v4().simple()));
    let templates = dir.join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    write(&templates, "flow.yaml", FLOW);
    write(&templates, "doomed.yml", DOOMED);
    write(&templates, "README.txt", "not a template");
    let invalid = write(&dir, "invalid.yaml", INVALID);
    let context = write(&dir, "context.json", r#"{"who": "Ada"}"#);
    let templates = templates.to_str().unwrap();

    // templates apply: a folder, then again (unchanged), then an invalid file.
    let run = tasker(&env, &["templates", "apply", templates]).await;
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(run.stdout.matches("created").count(), 2, "{run}");
    assert!(run.stdout.contains("flow.yaml   cli/flow 1.0.0"), "{run}");
    assert!(run.stdout.contains("doomed.yml  cli/doomed 1.0.0"), "{run}");
    assert!(!run.stdout.contains("README"), "{run}");
    let run = tasker(&env, &["templates", "apply", templates]).await;
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(run.stdout.matches("unchanged").count(), 2, "{run}");
    let run = tasker(&env, &["templates", "apply", invalid.to_str().unwrap()]).await;
    assert_eq!(run.code, 1, "{run}");
    assert!(run.stderr.contains("invalid_template"), "{run}");
    assert!(run.stderr.contains("self_dependency"), "{run}");
    let run = tasker(&env, &["templates", "list"]).await;
    assert_eq!(run.code, 0, "{run}");
    assert!(row(&run, "NAMESPACE").contains("VERSION"), "{run}");
    assert!(run.stdout.contains("a diamond"), "{run}");
    // A page of one template, and the next, the last.
    let run = tasker(&env, &["templates", "list", "--limit", "1"]).await;
    assert_eq!(run.code, 0, "{run}");
    assert!(
        run.stdout.contains("doomed") && !run.stdout.contains("flow"),
        "{run}"
    );
    assert!(
        run.stderr
            .contains("more templates: add --cursor cli/doomed"),
        "{run}"
    );
    let run = tasker(
        &env,
        &[
            "templates",
            "list",
            "--limit",
            "1",
            "--cursor",
            "cli/doomed",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run}");
    assert!(
        run.stdout.contains("flow") && !run.stdout.contains("doomed"),
        "{run}"
    );
    assert!(!run.stderr.contains("more templates"), "{run}");

    // The same template through the harness: identical (the CLI registered it), and the
    // harness now knows the namespace, so its queue is deleted at the end.
    let (status, _) = env.register_template(FLOW).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    env.start_worker("w1", &["cli"]).await.unwrap();

    // tasks create --wait: progress on stderr (a line per change, not a terminal), the
    // final table on stdout, exit 0 for a complete task.
    let context_arg = format!("@{}", context.display());
    let run = tasker(
        &env,
        &[
            "tasks",
            "create",
            "cli/flow",
            "--context",
            &context_arg,
            "--priority",
            "7",
            "--wait",
            "--timeout",
            "60",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stdout.contains("Priority  7"), "{run}");
    assert!(run.stderr.contains("created task"), "{run}");
    assert!(run.stderr.contains("step b: "), "{run}");
    assert!(run.stderr.contains("→ complete"), "{run}");
    assert!(run.stdout.contains("Status    complete"), "{run}");
    let id = task_id(&run);
    for step in ["a", "b", "c", "d"] {
        assert!(row(&run, step).contains("complete"), "{run}");
    }

    // tasks get: the header and every step with its attempts.
    let run = tasker(&env, &["tasks", "get", &id]).await;
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stdout.contains("Template  cli/flow 1.0.0"), "{run}");
    assert!(run.stdout.contains(r#"Context   {"who":"Ada"}"#), "{run}");
    let header = row(&run, "STEP");
    for column in ["STATUS", "ATTEMPTS", "STARTED", "DURATION", "LAST ERROR"] {
        assert!(header.contains(column), "{run}");
    }
    for step in ["a", "b", "c", "d"] {
        let line = row(&run, step);
        assert!(line.contains("complete") && line.contains("1/3"), "{run}");
    }

    // tasks explain: a reason per step.
    let run = tasker(&env, &["tasks", "explain", &id]).await;
    assert_eq!(run.code, 0, "{run}");
    for step in ["a", "b", "c", "d"] {
        let columns: Vec<&str> = row(&run, step).split_whitespace().collect();
        assert_eq!(columns[1..3], ["complete", "complete"], "{run}");
    }

    // tasks diagram: a Mermaid flowchart with the dependency edges and status classes.
    let run = tasker(&env, &["tasks", "diagram", &id]).await;
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stdout.starts_with("flowchart TD\n"), "{run}");
    for edge in ["a --> b", "a --> c", "b --> d", "c --> d"] {
        assert!(run.stdout.contains(edge), "{edge}: {run}");
    }
    assert!(
        run.stdout.contains(r#"    d["d<br/>complete"]:::complete"#),
        "{run}"
    );
    assert!(run.stdout.contains("classDef complete "), "{run}");

    // --output json: the API's JSON as is.
    let run = tasker(&env, &["--output", "json", "tasks", "get", &id]).await;
    assert_eq!(run.code, 0, "{run}");
    let task: Value = serde_json::from_str(&run.stdout).expect("tasks get -o json is JSON");
    assert_eq!(task["task_id"], json!(id));
    assert_eq!(task["steps"].as_array().unwrap().len(), 4);
    let run = tasker(&env, &["-o", "json", "tasks", "list", "--namespace", "cli"]).await;
    assert_eq!(run.code, 0, "{run}");
    let list: Value = serde_json::from_str(&run.stdout).expect("tasks list -o json is JSON");
    assert_eq!(list["tasks"][0]["task_id"], json!(id));
    let run = tasker(&env, &["tasks", "list", "--status", "complete"]).await;
    assert_eq!(run.code, 0, "{run}");
    assert!(row(&run, &id).contains("cli/flow"), "{run}");

    // A task that fails: --wait exits non-zero (4) and shows the error.
    let run = tasker(
        &env,
        &["tasks", "create", "cli/doomed", "--wait", "--timeout", "60"],
    )
    .await;
    assert_eq!(run.code, 4, "{run}");
    assert!(run.stdout.contains("Status    error"), "{run}");
    assert!(row(&run, "x").contains("permanent"), "{run}");
    assert!(run.stderr.contains("ended error"), "{run}");
    let failed = task_id(&run);
    let run = tasker(&env, &["tasks", "explain", &failed]).await;
    assert_eq!(run.code, 0, "{run}");
    assert!(row(&run, "x").contains("failed_permanently"), "{run}");
    assert!(row(&run, "y").contains("blocked_by_failed_parent"), "{run}");
    let run = tasker(&env, &["tasks", "diagram", &failed]).await;
    assert!(run.stdout.contains("x --> y"), "{run}");
    assert!(run.stdout.contains("classDef error "), "{run}");

    // tasks retry answers with the task running again; it fails again.
    let run = tasker(&env, &["tasks", "retry", &failed, "--reason", "try again"]).await;
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stderr.contains("retried task"), "{run}");
    assert_eq!(task_id(&run), failed);
    env.wait_for_task(&failed, &["error"], Duration::from_secs(30))
        .await
        .unwrap();
    // steps resolve: the task completes.
    let run = tasker(
        &env,
        &[
            "steps",
            "resolve",
            &failed,
            "x",
            "--results",
            r#"{"ok": true}"#,
            "--reason",
            "done by hand",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stdout.contains("resolved_manually"), "{run}");
    env.wait_for_task(&failed, &["complete"], Duration::from_secs(30))
        .await
        .unwrap();
    // steps show: the step with its results, as a table or as the API's JSON.
    let run = tasker(&env, &["steps", "show", &failed, "x"]).await;
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stdout.contains(r#"Results   {"ok":true}"#), "{run}");
    let run = tasker(&env, &["-o", "json", "steps", "show", &failed, "x"]).await;
    assert_eq!(run.code, 0, "{run}");
    let step: Value = serde_json::from_str(&run.stdout).expect("the step as JSON");
    assert_eq!(step["results"], json!({"ok": true}));
    let run = tasker(&env, &["steps", "show", &failed, "nope"]).await;
    assert_eq!(run.code, 1, "{run}");
    assert!(run.stderr.contains("step_not_found"), "{run}");

    // API errors: exit 1, the error readable on stderr (and as JSON on stdout with -o json).
    let run = tasker(&env, &["tasks", "cancel", &failed]).await;
    assert_eq!(run.code, 1, "{run}");
    assert!(
        run.stderr.contains("error: invalid_state (HTTP 409)"),
        "{run}"
    );
    let missing = uuid::Uuid::new_v4().to_string();
    let run = tasker(&env, &["-o", "json", "tasks", "get", &missing]).await;
    assert_eq!(run.code, 1, "{run}");
    assert!(run.stderr.contains("task_not_found"), "{run}");
    let error: Value = serde_json::from_str(&run.stdout).expect("the error body as JSON");
    assert_eq!(error["error"]["code"], "task_not_found");
    let run = tasker(
        &env,
        &["tasks", "create", "cli/flow", "--context", r#"{"who": 7}"#],
    )
    .await;
    assert_eq!(run.code, 1, "{run}");
    assert!(run.stderr.contains("invalid_context"), "{run}");
    assert!(run.stderr.contains("  - /who: "), "{run}");

    // templates diagram: the API's Mermaid text, a node per step.
    let run = tasker(
        &env,
        &["templates", "diagram", "cli", "flow", "--version", "1.0.0"],
    )
    .await;
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stdout.starts_with("flowchart TD\n"), "{run}");
    for node in ["a", "b", "c", "d"] {
        assert!(
            run.stdout.contains(&format!("    {node}[\"{node}\"]\n")),
            "{run}"
        );
    }
    assert!(run.stdout.contains("b --> d"), "{run}");
    let run = tasker(&env, &["templates", "diagram", "cli", "nothing"]).await;
    assert_eq!(run.code, 1, "{run}");
    assert!(run.stderr.contains("template_not_found"), "{run}");

    // A name with `/` (tasker-engine's `module/name`): the CLI encodes it in the path.
    let (status, body) = env
        .register_template(
            "namespace: cli\nname: team/flow\nsteps:\n  - {name: only, handler: tasker.noop}\n",
        )
        .await
        .unwrap();
    assert!(status.is_success(), "{body}");
    let run = tasker(&env, &["templates", "diagram", "cli", "team/flow"]).await;
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stdout.contains("only[\"only\"]"), "{run}");
    let run = tasker(&env, &["tasks", "create", "cli/team/flow"]).await;
    assert_eq!(run.code, 0, "{run}");

    // tasks list filters: tag, time window, order.
    let run = tasker(
        &env,
        &[
            "-o",
            "json",
            "tasks",
            "list",
            "--name",
            "doomed",
            "--created-after",
            "1h",
            "--order",
            "created_at",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run}");
    let list: Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(list["tasks"][0]["task_id"], json!(failed), "{run}");
    let run = tasker(
        &env,
        &["-o", "json", "tasks", "list", "--tag", "no-such-tag"],
    )
    .await;
    assert_eq!(run.code, 0, "{run}");
    let list: Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(list["tasks"], json!([]), "{run}");

    // Bulk cancel and retry: a dry run lists, the real run acts, ids on stdout. No
    // worker serves `clibulk`, so its task stays unfinished until cancelled.
    env.register_template(
        "namespace: clibulk\nname: idle\nsteps:\n  - {name: a, handler: tasker.noop}\n",
    )
    .await
    .unwrap();
    let (_, running) = env
        .create_task(json!({"namespace": "clibulk", "name": "idle", "tags": ["bulk-cli"]}))
        .await
        .unwrap();
    let running = running["task_id"].as_str().unwrap().to_owned();
    let run = tasker(&env, &["tasks", "cancel", "--tag", "bulk-cli", "--dry-run"]).await;
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(run.stdout.trim(), running, "{run}");
    assert!(run.stderr.contains("dry run: 1 task(s) match"), "{run}");
    let run = tasker(
        &env,
        &[
            "tasks",
            "cancel",
            "--tag",
            "bulk-cli",
            "--created-before",
            "2999-01-01T00:00:00Z",
            "--reason",
            "bulk",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(run.stdout.trim(), running, "{run}");
    assert!(
        run.stderr.contains("cancelled 1 of 1 matching task(s)"),
        "{run}"
    );
    // One task in `error` (the first failed one was resolved above): the dry run of a
    // retry names it and changes nothing.
    let run = tasker(
        &env,
        &["tasks", "create", "cli/doomed", "--wait", "--timeout", "60"],
    )
    .await;
    assert_eq!(run.code, 4, "{run}");
    let doomed = task_id(&run);
    let run = tasker(
        &env,
        &[
            "-o",
            "json",
            "tasks",
            "retry",
            "--namespace",
            "cli",
            "--dry-run",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run}");
    let answer: Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(answer["matched"], 1, "{run}");
    assert_eq!(answer["changed"], 0, "{run}");
    assert_eq!(answer["task_ids"], json!([doomed]), "{run}");
    let (_, still) = env.get(&format!("/v1/tasks/{doomed}")).await.unwrap();
    assert_eq!(
        still["status"], "error",
        "a dry run changed the task: {still:#}"
    );
    // tasks resolve closes the failed task by hand.
    let run = tasker(&env, &["tasks", "resolve", &doomed, "--reason", "refunded"]).await;
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stderr.contains("resolved task"), "{run}");
    assert!(run.stdout.contains("resolved_manually"), "{run}");
    // No filter, or a filter with an id: usage errors.
    for args in [
        &["tasks", "cancel"][..],
        &["tasks", "retry", &id, "--namespace", "cli"],
        // A status the action never acts on.
        &["tasks", "cancel", "--status", "error"],
        &[
            "tasks",
            "retry",
            "--status",
            "pending",
            "--namespace",
            "cli",
        ],
    ] {
        let run = tasker(&env, args).await;
        assert_eq!(run.code, 2, "{args:?}: {run}");
    }

    // --timeout: exit 5 when the task is still running.
    let run = tasker(
        &env,
        &[
            "tasks",
            "create",
            "cli/flow",
            "--context",
            &context_arg,
            "--wait",
            "--timeout",
            "0.1",
        ],
    )
    .await;
    assert_eq!(run.code, 5, "{run}");

    // Usage errors: exit 2.
    for args in [
        &["tasks", "create", "no-slash"][..],
        &["tasks", "create", "cli/flow", "--context", "{not json"],
        &[
            "tasks",
            "create",
            "cli/flow",
            "--context",
            "@/no/such/file.json",
        ],
        &["tasks", "list", "--status", "sleeping"],
        &["tasks", "list", "--order", "sideways"],
        &["tasks", "list", "--created-after", "last tuesday"],
        // Past what the clock can hold: refused, not a panic.
        &["tasks", "list", "--created-after", "100000000d"],
        &["tasks", "create", "cli/flow", "--wait", "--timeout", "1e20"],
        &["tasks", "frobnicate"],
    ] {
        let run = tasker(&env, args).await;
        assert_eq!(run.code, 2, "{args:?}: {run}");
    }

    // No coordinator there: exit 3.
    let run = tasker_at("http://127.0.0.1:1", &["tasks", "list"]).await;
    assert_eq!(run.code, 3, "{run}");
    // A password in the URL is not shown.
    let run = tasker_at("http://ops:hunter2@127.0.0.1:1", &["tasks", "list"]).await;
    assert_eq!(run.code, 3, "{run}");
    assert!(
        !run.stderr.contains("hunter2") && run.stderr.contains("ops:***@"),
        "{run}"
    );
    assert!(run.stderr.contains("cannot reach the coordinator"), "{run}");

    let _ = std::fs::remove_dir_all(&dir);
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_held_step_explains_itself() {
    let env = TestEnv::start("cli-held").await.unwrap();
    let (status, _) = env
        .register_template("namespace: clihold\nname: partner\nsteps:\n  - name: call\n    handler: tasker.noop\n    rate_limit: {key: \"'partner-api'\", limit: 1, per: 1h}\n")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED);
    // The first takes the hour's one start; the second waits for the next hour.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, task) = env
            .create_task(json!({"namespace": "clihold", "name": "partner"}))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::CREATED);
        ids.push(task["task_id"].as_str().unwrap().to_owned());
    }
    let run = tasker(&env, &["tasks", "explain", &ids[1]]).await;
    assert_eq!(run.code, 0, "{run}");
    let line = row(&run, "call");
    assert!(line.contains("rate_limited"), "{run}");
    assert!(line.contains("for key partner-api; next slot at"), "{run}");
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_waiting_step_explains_itself_and_takes_its_signal() {
    let env = TestEnv::start("cli-signal").await.unwrap();
    let (status, _) = env
        .register_template("namespace: cliwait\nname: approval\nsteps:\n  - name: approve\n    handler: tasker.wait\n    config: {signal: approved}\n")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED);
    // No worker needed: the coordinator runs the wait.
    let (status, task) = env
        .create_task(json!({"namespace": "cliwait", "name": "approval"}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED);
    let id = task["task_id"].as_str().unwrap().to_owned();
    let run = tasker(&env, &["tasks", "explain", &id]).await;
    assert_eq!(run.code, 0, "{run}");
    assert!(
        row(&run, "approve").contains("waiting for the signal `approved`"),
        "{run}"
    );

    let run = tasker(
        &env,
        &[
            "tasks",
            "signal",
            &id,
            "approved",
            "--data",
            r#"{"by": "cli"}"#,
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run}");
    assert!(
        run.stdout
            .contains("signal `approved` received: approve completed"),
        "{run}"
    );
    let (_, done) = env.get(&format!("/v1/tasks/{id}")).await.unwrap();
    assert_eq!(done["status"], "complete", "{done:#}");
    assert_eq!(
        done["steps"][0]["results"],
        json!({"by": "cli"}),
        "{done:#}"
    );
    // Again: refused, and the CLI says why.
    let run = tasker(&env, &["tasks", "signal", &id, "approved"]).await;
    assert_ne!(run.code, 0, "{run}");
    assert!(run.stderr.contains("invalid_state"), "{run}");
    env.finish().await.unwrap();
}

#[tokio::test]
async fn the_cli_creates_pauses_shows_and_deletes_schedules() {
    let env = TestEnv::start("cli-schedules").await.unwrap();
    let (status, body) = env
        .register_template(
            "namespace: cli\nname: report\nsteps:\n  - {name: build, handler: tasker.noop}\n",
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let run = tasker(
        &env,
        &[
            "schedules",
            "create",
            "morning",
            "cli/report",
            "0 7 * * MON-FRI",
            "--timezone",
            "Europe/Paris",
            "--overlap",
            "skip",
            "--context",
            r#"{"format": "pdf"}"#,
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run}");
    assert!(
        run.stdout
            .contains("Cron      0 7 * * MON-FRI (Europe/Paris)"),
        "{run}"
    );
    assert!(run.stdout.contains("Next      "), "{run}");
    let run = tasker(&env, &["schedules", "list"]).await;
    assert!(row(&run, "morning").ends_with("active"), "{run}");
    let run = tasker(&env, &["schedules", "pause", "morning"]).await;
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stdout.contains("State     paused"), "{run}");
    let run = tasker(&env, &["schedules", "list"]).await;
    assert!(row(&run, "morning").ends_with("paused"), "{run}");
    // A bad cron: the API's answer names the field.
    let run = tasker(
        &env,
        &["schedules", "create", "bad", "cli/report", "0 7 * *"],
    )
    .await;
    assert_ne!(run.code, 0, "{run}");
    assert!(run.stderr.contains("cron"), "{run}");
    let run = tasker(&env, &["schedules", "delete", "morning"]).await;
    assert_eq!(run.code, 0, "{run}");
    let run = tasker(&env, &["schedules", "get", "morning"]).await;
    assert_ne!(run.code, 0, "{run}");
    assert!(run.stderr.contains("schedule_not_found"), "{run}");
    env.finish().await.unwrap();
}

#[tokio::test]
async fn wait_goes_on_while_the_coordinator_restarts() {
    use tasker_tests::http_stub::{Answer, HttpStub};
    let task = |status: &str| {
        json!({"task_id": "01a24e00-0000-7000-8000-000000000001", "namespace": "cli",
               "name": "flow", "version": "1.0.0", "status": status, "steps": []})
        .to_string()
    };
    let unavailable = json!({"error": {"code": "database_unavailable",
                                       "message": "PostgreSQL does not answer"}})
    .to_string();
    // Created; then the coordinator answers 503 twice (it restarts), then the task.
    let coordinator = HttpStub::start(vec![
        Answer::new(201, &task("pending")),
        Answer::new(503, &unavailable),
        Answer::new(503, &unavailable),
        Answer::new(200, &task("complete")),
    ])
    .await
    .unwrap();
    let run = tasker_at(
        &coordinator.url,
        &["tasks", "create", "cli/flow", "--wait", "--timeout", "30"],
    )
    .await;
    assert_eq!(run.code, 0, "{run}");
    assert!(
        run.stderr.contains("the coordinator does not answer"),
        "{run}"
    );
    assert_eq!(coordinator.arrivals().len(), 4, "{run}");
}

/// `--wait --timeout S` ends by S even when the coordinator stops answering in the middle
/// of the wait (a request of the poll is held, not refused).
#[tokio::test]
async fn wait_ends_at_its_timeout_when_the_coordinator_stops_answering() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Answers the creation, then holds every other request unanswered.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = vec![0u8; 65_536];
                let read = socket.read(&mut request).await.unwrap_or(0);
                if request[..read].starts_with(b"POST") {
                    let task = json!({"task_id": "01900000-0000-7000-8000-000000000000",
                        "namespace": "cli", "name": "flow", "status": "in_progress", "steps": []})
                    .to_string();
                    let answer = format!(
                        "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{task}",
                        task.len()
                    );
                    let _ = socket.write_all(answer.as_bytes()).await;
                } else {
                    tokio::time::sleep(Duration::from_secs(600)).await;
                }
            });
        }
    });
    let started = std::time::Instant::now();
    let run = tasker_at(
        &url,
        &["tasks", "create", "cli/flow", "--wait", "--timeout", "2"],
    )
    .await;
    assert_eq!(run.code, 5, "{run}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the wait ended {:?} after it began: {run}",
        started.elapsed()
    );
}
