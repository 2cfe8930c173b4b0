//! Retention (docs/operating.md, "Retention"): finished tasks past `TASKER_RETENTION` go
//! with their steps, edges and history; unfinished and recent ones stay, and so does
//! history the events relay has not published; `tasker-coordinator prune` does it once.

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use tasker_tests::{EnvOptions, StatusCode, TaskStatus, TestEnv, binary, metric, wait_for_metric};
use uuid::Uuid;

const DIAMOND: &str = "namespace: kept\nname: diamond\nsteps:\n  - {name: a, handler: tasker.noop}\n  - {name: b, handler: tasker.noop, depends_on: [a]}\n  - {name: c, handler: tasker.noop, depends_on: [a]}\n  - {name: d, handler: tasker.noop, depends_on: [b, c]}\n";
const FAILING: &str = "namespace: kept\nname: failing\nsteps:\n  - {name: only, handler: tasker.fail, config: {times: 9, kind: permanent}}\n";
/// A namespace no worker serves: its tasks never finish.
const STUCK: &str =
    "namespace: unserved\nname: stuck\nsteps:\n  - {name: only, handler: tasker.noop}\n";

async fn env_with(test: &str, coordinator_env: &[(&str, &str)]) -> TestEnv {
    let mut env = TestEnv::start_with(
        test,
        EnvOptions {
            coordinator_env: coordinator_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..EnvOptions::default()
        },
    )
    .await
    .unwrap();
    for template in [DIAMOND, FAILING, STUCK] {
        let (status, body) = env.register_template(template).await.unwrap();
        assert!(status.is_success(), "{body}");
    }
    env.start_worker("w1", &["kept"]).await.unwrap();
    env
}

async fn run(env: &TestEnv, name: &str, status: TaskStatus) -> Uuid {
    let task = env
        .api
        .run_task(
            &json!({"namespace": "kept", "name": name, "context": {}}),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(task.status, status, "{task:#?}");
    task.task_id
}

/// Make a finished task look as if it finished two minutes ago.
async fn age(pool: &PgPool, task: Uuid) {
    sqlx::query("UPDATE tasks SET completed_at = now() - interval '2 minutes' WHERE task_id = $1")
        .bind(task)
        .execute(pool)
        .await
        .unwrap();
}

/// Rows of each table that belong to `task`: tasks, steps, edges, step and task history.
async fn rows(pool: &PgPool, task: Uuid) -> [i64; 5] {
    let mut counts = [0; 5];
    for (i, sql) in [
        "SELECT count(*) FROM tasks WHERE task_id = $1",
        "SELECT count(*) FROM steps WHERE task_id = $1",
        "SELECT count(*) FROM step_edges WHERE task_id = $1",
        "SELECT count(*) FROM step_transitions WHERE task_id = $1",
        "SELECT count(*) FROM task_transitions WHERE task_id = $1",
    ]
    .into_iter()
    .enumerate()
    {
        counts[i] = sqlx::query_scalar(sql)
            .bind(task)
            .fetch_one(pool)
            .await
            .unwrap();
    }
    counts
}

#[tokio::test]
async fn finished_tasks_past_the_retention_go_with_everything_that_belongs_to_them() {
    let env = env_with(
        "retention",
        &[
            ("TASKER_RETENTION", "1m"),
            ("TASKER_RETENTION_INTERVAL_MS", "300"),
        ],
    )
    .await;
    let old = [
        run(&env, "diamond", TaskStatus::Complete).await,
        run(&env, "diamond", TaskStatus::Complete).await,
        run(&env, "failing", TaskStatus::Error).await,
    ];
    let recent = run(&env, "diamond", TaskStatus::Complete).await;
    let stuck = env
        .api
        .create_task(&json!({"namespace": "unserved", "name": "stuck", "context": {}}))
        .await
        .unwrap()
        .task_id;
    let kept_before = [rows(&env.pool, recent).await, rows(&env.pool, stuck).await];
    assert_eq!(kept_before[0][..3], [1, 4, 4]);
    for task in old {
        let [tasks, steps, _, step_history, task_history] = rows(&env.pool, task).await;
        assert!(tasks == 1 && steps > 0 && step_history > 0 && task_history > 0);
        age(&env.pool, task).await;
    }
    // Unfinished, however old: never pruned, whatever its times say (only its status
    // keeps it).
    sqlx::query(
        "UPDATE tasks SET created_at = now() - interval '1 day',
                          completed_at = now() - interval '1 day' WHERE task_id = $1",
    )
    .bind(stuck)
    .execute(&env.pool)
    .await
    .unwrap();

    let metrics = env.metrics_url();
    let pruned = "tasker_pruned_tasks_total";
    assert_eq!(wait_for_metric(&metrics, pruned, 3.0).await, 3.0);
    for task in old {
        assert_eq!(rows(&env.pool, task).await, [0; 5], "rows of {task} remain");
        let (status, _) = env.get(&format!("/v1/tasks/{task}")).await.unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    // Later rounds prune what ages meanwhile, and nothing else: one more task aged, and
    // once a round has removed it, the recent and the unfinished task are still whole.
    let later = run(&env, "diamond", TaskStatus::Complete).await;
    age(&env.pool, later).await;
    wait_for_metric(&metrics, pruned, 4.0).await;
    assert_eq!(rows(&env.pool, later).await, [0; 5]);
    assert_eq!(metric(&metrics, pruned).await, 4.0);
    assert_eq!(
        [rows(&env.pool, recent).await, rows(&env.pool, stuck).await],
        kept_before
    );
    env.finish().await.unwrap();
}

/// A tree of child tasks goes whole: while one of its tasks is unfinished (a parent still
/// running, a child still running), none of them is removed, however old the others.
#[tokio::test]
async fn a_tree_of_child_tasks_is_pruned_whole() {
    let env = env_with(
        "prune-tree",
        &[("TASKER_RETENTION", "off"), ("TASKER_EVENTS", "false")],
    )
    .await;
    env.register_template(
        "namespace: kept\nname: tree\nsteps:\n  - {name: sub, handler: tasker.task, config: {namespace: kept, name: diamond}}\n",
    )
    .await
    .unwrap();
    let parent = run(&env, "tree", TaskStatus::Complete).await;
    let child: Uuid = sqlx::query_scalar("SELECT task_id FROM tasks WHERE parent_task_id = $1")
        .bind(parent)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let set = |task: Uuid, status: &'static str| {
        let pool = env.pool.clone();
        async move {
            sqlx::query(
                "UPDATE tasks SET status = $2, completed_at = CASE WHEN $2 = 'in_progress' \
                 THEN NULL ELSE now() - interval '2 minutes' END WHERE task_id = $1",
            )
            .bind(task)
            .bind(status)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    let present = |task: Uuid| {
        let pool = env.pool.clone();
        async move { rows(&pool, task).await[0] == 1 }
    };
    // As if the parent still ran: the old child stays, for the parent's retry.
    set(parent, "in_progress").await;
    set(child, "error").await;
    let removed = prune(&env, &["--older-than", "1m"], "false").await;
    assert!(removed.starts_with("removed 0 finished tasks"), "{removed}");
    assert!(present(child).await);
    // As if the child still ran: the old parent stays.
    set(parent, "cancelled").await;
    set(child, "in_progress").await;
    let removed = prune(&env, &["--older-than", "1m"], "false").await;
    assert!(removed.starts_with("removed 0 finished tasks"), "{removed}");
    assert!(present(parent).await);
    // Both finished long ago: both go.
    set(child, "cancelled").await;
    let removed = prune(&env, &["--older-than", "1m"], "false").await;
    assert!(removed.starts_with("removed 2 finished tasks"), "{removed}");
    assert!(!present(parent).await && !present(child).await);
    env.finish().await.unwrap();
}

async fn prune(env: &TestEnv, args: &[&str], events: &str) -> String {
    let output = tokio::process::Command::new(binary("tasker-coordinator"))
        .arg("prune")
        .args(args)
        .env("DATABASE_URL", &env.database_url)
        .env("TASKER_EVENTS", events)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn prune_once_counts_first_and_keeps_history_not_yet_published() {
    // Events off: the relay's cursor never moves, so no history counts as published.
    let env = env_with(
        "prune",
        &[("TASKER_RETENTION", "off"), ("TASKER_EVENTS", "false")],
    )
    .await;
    let old = run(&env, "diamond", TaskStatus::Complete).await;
    let recent = run(&env, "diamond", TaskStatus::Complete).await;
    age(&env.pool, old).await;

    let counted = prune(&env, &["--older-than", "1m", "--dry-run"], "false").await;
    assert!(counted.starts_with("1 finished tasks"), "{counted}");
    // With events on, the unpublished history must wait for the relay.
    let counted = prune(&env, &["--older-than", "1m", "--dry-run"], "true").await;
    assert!(counted.starts_with("0 finished tasks"), "{counted}");
    let kept = prune(&env, &["--older-than", "1m"], "true").await;
    assert!(kept.starts_with("removed 0 finished tasks"), "{kept}");
    assert_eq!(rows(&env.pool, old).await[0], 1);

    let removed = prune(&env, &["--older-than", "1m", "--batch-size", "1"], "false").await;
    assert!(
        removed.starts_with("removed 1 finished tasks") && removed.contains("(4 steps, 4 edges"),
        "{removed}"
    );
    assert_eq!(rows(&env.pool, old).await, [0; 5]);
    assert_eq!(rows(&env.pool, recent).await[..3], [1, 4, 4]);

    let refused = tokio::process::Command::new(binary("tasker-coordinator"))
        .args(["prune", "--older-than", "30"])
        .env("DATABASE_URL", &env.database_url)
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("`30` has no unit"), "{stderr}");

    // A dry run changes nothing, not even by making a database that was not there.
    let (server, _) = env.database_url.rsplit_once('/').unwrap();
    let missing = format!("tasker_prune_nowhere_{}", uuid::Uuid::new_v4().simple());
    let dry = tokio::process::Command::new(binary("tasker-coordinator"))
        .args(["prune", "--older-than", "1m", "--dry-run"])
        .env("DATABASE_URL", format!("{server}/{missing}"))
        .output()
        .await
        .unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&missing)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    if exists {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE \"{missing}\" WITH (FORCE)"
        )))
        .execute(&env.pool)
        .await
        .unwrap();
    }
    assert!(!exists, "the dry run made a database");
    assert!(
        !dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stdout)
    );
    env.finish().await.unwrap();
}
