//! Workflows of every shape complete, each step after all its parents, once.

use std::time::Duration;

use serde_json::json;
use tasker_tests::{StatusCode, Step, StepStatus, TaskStatus, TestEnv};

use crate::{step_history, task_history};

/// A template of `tasker.echo` steps with the given `(name, parents)` edges.
fn template(name: &str, steps: &[(&str, &[&str])]) -> String {
    let mut yaml = format!("namespace: shapes\nname: {name}\nversion: 1.0.0\nsteps:\n");
    for (step, parents) in steps {
        yaml.push_str(&format!(
            "  - name: {step}\n    handler: tasker.echo\n    depends_on: [{}]\n    config: {{step: {step}}}\n",
            parents.join(", ")
        ));
    }
    yaml
}

const LINEAR: &[(&str, &[&str])] = &[("a", &[]), ("b", &["a"]), ("c", &["b"]), ("d", &["c"])];
const DIAMOND: &[(&str, &[&str])] = &[("a", &[]), ("b", &["a"]), ("c", &["a"]), ("d", &["b", "c"])];
const TREE: &[(&str, &[&str])] = &[
    ("root", &[]),
    ("left", &["root"]),
    ("right", &["root"]),
    ("left_a", &["left"]),
    ("left_b", &["left"]),
    ("right_a", &["right"]),
    ("right_b", &["right"]),
];
const MIXED: &[(&str, &[&str])] = &[
    ("extract_a", &[]),
    ("extract_b", &[]),
    ("extract_c", &[]),
    ("clean_a", &["extract_a"]),
    ("clean_b", &["extract_b"]),
    ("join", &["clean_a", "clean_b", "extract_c"]),
    ("score", &["join"]),
    ("report", &["join"]),
    ("archive", &["clean_a"]),
    ("notify", &["score", "report", "archive"]),
];

#[tokio::test]
async fn every_shape_completes_with_each_step_after_its_parents_once() {
    let mut env = TestEnv::start("shapes").await.unwrap();
    env.start_worker("w1", &["shapes"]).await.unwrap();
    env.start_worker("w2", &["shapes"]).await.unwrap();

    for (name, steps) in [
        ("linear", LINEAR),
        ("diamond", DIAMOND),
        ("tree", TREE),
        ("mixed", MIXED),
    ] {
        let (status, body) = env.register_template(&template(name, steps)).await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let task = env
            .api
            .run_task(
                &json!({"namespace": "shapes", "name": name, "context": {"shape": name}}),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(task.status, TaskStatus::Complete, "{name}: {task:#?}");
        assert!(task.completed_at.is_some());
        assert_eq!(task.steps.len(), steps.len());
        let history = step_history(&env.pool, task.task_id).await;

        for (step, parents) in steps {
            let this = task.step(step);
            assert_eq!(this.status, StepStatus::Complete, "{name}.{step}");
            assert_eq!(this.attempts, 1, "{name}.{step} ran more than once");
            let completions = history
                .iter()
                .filter(|h| h.0 == *step && h.2 == "complete")
                .count();
            assert_eq!(
                completions, 1,
                "{name}.{step} completed {completions} times"
            );
            let mut expected_parents: Vec<&str> = parents.to_vec();
            expected_parents.sort_unstable();
            let mut depends_on: Vec<&str> = this.depends_on.iter().map(String::as_str).collect();
            depends_on.sort_unstable();
            assert_eq!(depends_on, expected_parents, "{name}.{step} depends_on");

            // Started only after every parent completed; and it saw every parent's results.
            let results = this.results.as_ref().expect("results");
            for parent in *parents {
                let parent: &Step = task.step(parent);
                assert!(
                    this.started_at.unwrap() >= parent.completed_at.unwrap(),
                    "{name}.{step} started before {} completed",
                    parent.name
                );
                assert_eq!(
                    Some(&results["parents"][&parent.name]),
                    parent.results.as_ref(),
                    "{name}.{step} sees {}'s results",
                    parent.name
                );
            }
            assert_eq!(results["parents"].as_object().unwrap().len(), parents.len());
            assert_eq!(results["config"], json!({"step": step}));
            assert_eq!(results["context"], json!({"shape": name}));
        }
    }

    // The task's own history: created, started, completed.
    let (_, page) = env.get("/v1/tasks?namespace=shapes").await.unwrap();
    let tasks = page["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 4);
    assert!(
        tasks
            .iter()
            .all(|t| t["status"] == "complete" && t.get("steps").is_none())
    );
    let reasons = task_history(&env.pool, tasks[0]["task_id"].as_str().unwrap()).await;
    assert_eq!(
        reasons,
        ["created", "first_step_dispatched", "all_steps_done"]
    );
    env.finish().await.unwrap();
}

#[tokio::test]
async fn listing_pages_with_a_cursor_and_filters() {
    let mut env = TestEnv::start("listing").await.unwrap();
    env.start_worker("w1", &["shapes"]).await.unwrap();
    env.register_template(&template("linear", LINEAR))
        .await
        .unwrap();
    env.register_template(&template("diamond", DIAMOND))
        .await
        .unwrap();
    let mut created = Vec::new();
    for i in 0..5 {
        let name = if i % 2 == 0 { "linear" } else { "diamond" };
        let task = env
            .run_task(
                json!({"namespace": "shapes", "name": name, "context": {"i": i}}),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        created.push(task["task_id"].as_str().unwrap().to_owned());
    }
    created.reverse(); // newest first

    let (status, first) = env.get("/v1/tasks?limit=2").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let ids = crate::listed_ids;
    assert_eq!(ids(&first), created[..2]);
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, second) = env
        .get(&format!("/v1/tasks?limit=2&cursor={cursor}"))
        .await
        .unwrap();
    assert_eq!(ids(&second), created[2..4]);
    let cursor = second["next_cursor"].as_str().unwrap();
    let (_, third) = env
        .get(&format!("/v1/tasks?limit=2&cursor={cursor}"))
        .await
        .unwrap();
    assert_eq!(ids(&third), created[4..]);
    assert!(third["next_cursor"].is_null());

    let (_, diamonds) = env
        .get("/v1/tasks?name=diamond&status=complete")
        .await
        .unwrap();
    assert_eq!(diamonds["tasks"].as_array().unwrap().len(), 2);
    let (_, none) = env.get("/v1/tasks?status=error").await.unwrap();
    assert!(none["tasks"].as_array().unwrap().is_empty());

    let (status, bad) = env
        .get("/v1/tasks?status=finished&limit=0&color=red")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let paths = crate::detail_paths(&bad);
    for expected in ["status", "limit", "color"] {
        assert!(
            paths.iter().any(|p| p == expected),
            "{expected} not named in {bad}"
        );
    }
    env.finish().await.unwrap();
}

/// A task's first steps are claimed by the request that creates it, and every step's
/// history reads in the order things happened: a child is dispatched only after each of
/// its parents succeeded, each step once.
#[tokio::test]
async fn creating_a_task_dispatches_its_first_steps_and_the_history_keeps_order() {
    let mut env = TestEnv::start("roots").await.unwrap();
    env.register_template(&template("mixed", MIXED))
        .await
        .unwrap();

    // No worker yet: what the create answers is what it committed.
    let (status, created) = env
        .create_task(json!({"namespace": "shapes", "name": "mixed"}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["status"], "in_progress");
    let roots = ["extract_a", "extract_b", "extract_c"];
    for step in created["steps"].as_array().unwrap() {
        let root = roots.contains(&step["name"].as_str().unwrap());
        let (status, attempts) = if root {
            ("enqueued", 1)
        } else {
            ("pending", 0)
        };
        assert_eq!(step["status"], status, "{step}");
        assert_eq!(step["attempts"], attempts, "{step}");
    }
    let id = created["task_id"].as_str().unwrap().to_owned();
    let (_, stored) = env.get(&format!("/v1/tasks/{id}")).await.unwrap();
    assert_eq!(
        stored["steps"], created["steps"],
        "the answer is what was stored"
    );

    env.start_worker("w1", &["shapes"]).await.unwrap();
    let done = env
        .api
        .wait_for_task(
            id.parse().unwrap(),
            &[TaskStatus::Complete, TaskStatus::Error],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");

    let history = step_history(&env.pool, &id).await;
    let position = |step: &str, reason: &str| {
        let found: Vec<usize> = history
            .iter()
            .enumerate()
            .filter(|(_, h)| h.0 == step && h.3 == reason)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(found.len(), 1, "{step} {reason} once in {history:#?}");
        found[0]
    };
    for (step, parents) in MIXED {
        let dispatched = position(step, "dispatched");
        assert!(
            dispatched < position(step, "started"),
            "{step}: {history:#?}"
        );
        assert!(position(step, "started") < position(step, "succeeded"));
        for parent in *parents {
            assert!(
                position(parent, "succeeded") < dispatched,
                "{step} dispatched before {parent} succeeded: {history:#?}"
            );
        }
        let rows: Vec<_> = history.iter().filter(|h| h.0 == *step).collect();
        assert_eq!(rows.len(), 3, "{step}: {rows:#?}");
        assert_eq!(rows[0].4["attempt"], 1, "{step}: {rows:#?}");
    }
    let reasons = task_history(&env.pool, &id).await;
    assert_eq!(
        reasons,
        ["created", "first_step_dispatched", "all_steps_done"]
    );
    env.finish().await.unwrap();
}

/// A task's priority is its template's or the one its creation asked for, shown on the
/// task; one out of range is refused, naming the field, in a template and in a create.
#[tokio::test]
async fn a_task_s_priority_is_its_template_s_or_the_one_asked_for() {
    let env = TestEnv::start("priority").await.unwrap();
    let urgent = format!("priority: 8\n{}", template("urgent", &[("a", &[])]));
    let (status, body) = env.register_template(&urgent).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["priority"], 8, "{body}");
    let (status, body) = env
        .register_template(&format!("priority: 10\n{}", template("bad", &[("a", &[])])))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["details"][0]["path"], "priority", "{body}");

    let (_, created) = env
        .create_task(json!({"namespace": "shapes", "name": "urgent"}))
        .await
        .unwrap();
    assert_eq!(created["priority"], 8, "{created}");
    let (status, asked) = env
        .create_task(json!({"namespace": "shapes", "name": "urgent", "priority": 1}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{asked}");
    assert_eq!(asked["priority"], 1);
    // As in JSON Schema, a number without a fraction is an integer.
    let (status, whole) = env
        .create_task(json!({"namespace": "shapes", "name": "urgent", "priority": 3.0}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{whole}");
    assert_eq!(whole["priority"], 3);
    let id = asked["task_id"].as_str().unwrap();
    let (_, stored) = env.get(&format!("/v1/tasks/{id}")).await.unwrap();
    assert_eq!(stored["priority"], 1);
    let (_, page) = env.get("/v1/tasks?namespace=shapes").await.unwrap();
    let mut listed: Vec<i64> = page["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|task| task["priority"].as_i64().unwrap())
        .collect();
    listed.sort_unstable();
    assert_eq!(listed, [1, 3, 8]);

    for (priority, found) in [
        (json!(10), "10"),
        (json!(-1), "-1"),
        (json!("high"), "a string"),
    ] {
        let (status, body) = env
            .create_task(json!({"namespace": "shapes", "name": "urgent", "priority": priority}))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let problem = &body["error"]["details"][0];
        assert_eq!(problem["path"], "priority", "{body}");
        assert!(
            problem["message"].as_str().unwrap().contains(found),
            "{body}"
        );
    }
}
