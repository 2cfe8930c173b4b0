//! Every transition writer of `tasker_shared::store::transitions`, against a real
//! database of its own per test, with every migration applied. Each test ends by reading
//! the whole history and checking every row against the allowed transitions
//! (`StepStatus::can_transition_to`, `TaskStatus::can_transition_to`) and its reason
//! against the statuses it records.
//!
//! Needs PostgreSQL: `TASKER_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432`).

use std::sync::Arc;

use chrono::Utc;
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, PgPool};
use uuid::Uuid;

use tasker_shared::config::DatabaseSettings;
use tasker_shared::decision::Backoff;
use tasker_shared::messages::{
    Outcome, RunningStep, SCHEMA_VERSION, StepError, StepResult, StepStarted,
};
use tasker_shared::states::{StepStatus, TaskStatus, TransitionReason};
use tasker_shared::store::tasks::{self, Created, Creation, NewTask};
use tasker_shared::store::templates::{self, Registered, TemplateRecord};
use tasker_shared::store::transitions::{self, Dispatch, LeasePolicy, OperatorError, Started};
use tasker_shared::template::parse_template;

const LEASE_MS: i64 = 60_000;
const LEASE: LeasePolicy = LeasePolicy {
    grace_ms: 5_000,
    heartbeat_lease_ms: 30_000,
};

/// A database of the test's own, dropped when the test ends (unless it panicked: then
/// it stays for a look).
struct TestDb {
    pool: PgPool,
    name: String,
    server: String,
}

impl TestDb {
    async fn new(test: &str) -> Self {
        let server = std::env::var("TASKER_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let name = format!("tasker_transitions_{test}_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&format!("{server}/postgres"))
            .await
            .expect("connecting to PostgreSQL");
        admin
            .execute(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .await
            .unwrap();
        let pool = PgPool::connect(&format!("{server}/{name}")).await.unwrap();
        tasker_shared::db::MIGRATOR.run(&pool).await.unwrap();
        TestDb { pool, name, server }
    }

    /// The settings a coordinator would reach this database with, with its two
    /// timeouts.
    fn settings(&self, idle_in_transaction_ms: u64, answer_ms: u64) -> DatabaseSettings {
        DatabaseSettings {
            database_url: format!("{}/{}", self.server, self.name).parse().unwrap(),
            db_pool_size: 2,
            db_idle_in_transaction_timeout_ms: idle_in_transaction_ms,
            db_answer_timeout_ms: answer_ms,
        }
    }

    /// Tasker's pool of `pool_size` connections on this database, whose work waits at
    /// most 1 s for an answer.
    fn impatient(&self, pool_size: u32) -> tasker_shared::db::Database {
        let settings = DatabaseSettings {
            db_pool_size: pool_size,
            ..self.settings(60_000, 1_000)
        };
        tasker_shared::db::Database::new(
            tasker_shared::db::connect_lazy(&settings).unwrap(),
            std::time::Duration::from_secs(1),
        )
    }

    /// A table `held` of one row (`id` 1, `n` 0), and a transaction of the test's that
    /// holds the row's lock: an update of it waits, unanswered, until the transaction ends.
    async fn hold_a_row(&self) -> sqlx::Transaction<'static, sqlx::Postgres> {
        self.pool
            .execute("CREATE TABLE held (id INT PRIMARY KEY, n INT NOT NULL); INSERT INTO held VALUES (1, 0)")
            .await
            .unwrap();
        let mut holder = self.pool.begin().await.unwrap();
        sqlx::query("SELECT n FROM held WHERE id = 1 FOR UPDATE")
            .execute(&mut *holder)
            .await
            .unwrap();
        holder
    }

    /// Check the history, then drop the database.
    async fn finish(self) {
        check_history(&self.pool).await;
        self.finish_without_history().await;
    }

    /// Drop the database (a test that wrote no history).
    async fn finish_without_history(self) {
        self.pool.close().await;
        let mut admin = PgConnection::connect(&format!("{}/postgres", self.server))
            .await
            .unwrap();
        admin
            .execute(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            )))
            .await
            .unwrap();
    }

    async fn template(&self, yaml: &str) -> Arc<TemplateRecord> {
        let definition = parse_template(yaml, "test").unwrap();
        match templates::register(&self.pool, &definition).await.unwrap() {
            Registered::Created { template, .. } | Registered::Identical(template) => {
                Arc::new(template)
            }
            Registered::Conflict(_) => panic!("template conflict"),
        }
    }

    /// Create a task of `template`, claiming its first steps, and answer its id and
    /// the claimed steps' dispatches.
    async fn create(&self, template: &Arc<TemplateRecord>) -> (Uuid, Vec<Dispatch>) {
        create_with(self, template, json!({"order": 1})).await
    }

    async fn step(&self, task_id: Uuid, name: &str) -> StepRow {
        sqlx::query_as(
            "SELECT status, attempts, deferrals, dispatch_token, remaining_parents, results, \
                    last_error, next_attempt_at \
             FROM steps WHERE task_id = $1 AND name = $2",
        )
        .bind(task_id)
        .bind(name)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    async fn task_status(&self, task_id: Uuid) -> TaskStatus {
        sqlx::query_scalar("SELECT status FROM tasks WHERE task_id = $1")
            .bind(task_id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn reasons(&self, task_id: Uuid, step: &str) -> Vec<TransitionReason> {
        sqlx::query_scalar(
            "SELECT h.reason FROM step_transitions h JOIN steps s USING (step_id) \
             WHERE s.task_id = $1 AND s.name = $2 ORDER BY h.transition_id",
        )
        .bind(task_id)
        .bind(step)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    async fn task_reasons(&self, task_id: Uuid) -> Vec<TransitionReason> {
        sqlx::query_scalar(
            "SELECT reason FROM task_transitions WHERE task_id = $1 ORDER BY transition_id",
        )
        .bind(task_id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Apply `results` in a transaction of their own (as the result processor does,
    /// after locking), finishing the tasks that may have finished.
    /// Wait (at most 30 s) until a transaction of this database waits for a lock: `what`.
    async fn until_a_transaction_waits_for_a_lock(&self, what: &str) {
        let waiting = "SELECT count(*) FROM pg_stat_activity \
                       WHERE datname = current_database() AND wait_event_type = 'Lock'";
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while sqlx::query_scalar::<_, i64>(waiting)
            .fetch_one(&self.pool)
            .await
            .unwrap()
            == 0
        {
            assert!(std::time::Instant::now() < deadline, "{what} never waited");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn apply(&self, results: &[StepResult]) -> (transitions::AppliedResults, usize) {
        let mut tx = self.pool.begin().await.unwrap();
        let ids: Vec<Uuid> = results.iter().map(|r| r.step_id).collect();
        let held = transitions::lock_batch(&mut tx, &ids, &ids).await.unwrap();
        assert!(held.is_empty(), "nothing else holds the rows");
        let applied = transitions::apply_results(&mut tx, results, LEASE_MS)
            .await
            .unwrap();
        let finished = transitions::finish_tasks(&mut tx, &applied.may_finish(), Some(30_000))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        (applied, finished.tasks.len())
    }
}

#[derive(Debug, sqlx::FromRow)]
struct StepRow {
    status: StepStatus,
    attempts: i32,
    deferrals: i32,
    dispatch_token: Option<Uuid>,
    remaining_parents: i32,
    results: Option<Value>,
    last_error: Option<Value>,
    next_attempt_at: Option<chrono::DateTime<Utc>>,
}

fn result(dispatch: &Dispatch, outcome: Outcome, error: Option<StepError>) -> StepResult {
    let message = &dispatch.message;
    StepResult {
        schema_version: SCHEMA_VERSION,
        task_id: message.task_id,
        step_id: message.step_id,
        dispatch_token: message.dispatch_token,
        outcome,
        results: (outcome == Outcome::Success).then(|| json!({"from": message.step_name})),
        error,
        started_at: Utc::now(),
        finished_at: Utc::now(),
        worker_id: "w1".into(),
    }
}

fn failure(message: &str, retry_after_seconds: Option<f64>) -> Option<StepError> {
    Some(StepError {
        message: message.into(),
        code: None,
        retry_after_seconds,
    })
}

fn names(dispatches: &[Dispatch]) -> Vec<&str> {
    let mut names: Vec<&str> = dispatches
        .iter()
        .map(|d| d.message.step_name.as_str())
        .collect();
    names.sort_unstable();
    names
}

const DIAMOND: &str = "namespace: shapes\nname: diamond\nsteps:\n  - name: a\n    handler: h\n  - name: b\n    handler: h\n    depends_on: [a]\n  - name: c\n    handler: h\n    depends_on: [a]\n  - name: d\n    handler: h\n    depends_on: [b, c]\n";

#[tokio::test]
async fn a_transaction_begun_planned_by_key_sets_its_plans_for_itself_alone() {
    let db = TestDb::new("planned").await;
    let mut conn = db.pool.acquire().await.unwrap();
    let setting = "SELECT current_setting($1)";
    let mut tx = conn
        .begin_with(tasker_shared::db::BEGIN_PLANNED_BY_KEY)
        .await
        .unwrap();
    for (name, value) in [
        ("plan_cache_mode", "force_generic_plan"),
        ("enable_seqscan", "off"),
        ("enable_hashjoin", "off"),
        ("enable_mergejoin", "off"),
    ] {
        let shown: String = sqlx::query_scalar(setting)
            .bind(name)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(shown, value, "{name} in the transaction");
    }
    tx.commit().await.unwrap();
    // The connection's next statements plan as the connection does.
    for (name, value) in [("plan_cache_mode", "auto"), ("enable_seqscan", "on")] {
        let shown: String = sqlx::query_scalar(setting)
            .bind(name)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(shown, value, "{name} after it");
    }
    drop(conn);
    db.finish_without_history().await;
}

#[tokio::test]
async fn a_diamond_is_claimed_through_one_path_and_completes() {
    let db = TestDb::new("diamond").await;
    let template = db.template(DIAMOND).await;
    let (task, first) = db.create(&template).await;
    // Creation claimed the root, started the task and built its message.
    assert_eq!(names(&first), ["a"]);
    assert_eq!(first[0].message.attempt, 1);
    assert_eq!(first[0].message.context, json!({"order": 1}));
    assert_eq!(
        first[0].message.template,
        format!("diamond@{}", template.definition.version)
    );
    assert_eq!(db.task_status(task).await, TaskStatus::InProgress);
    assert_eq!(db.step(task, "a").await.status, StepStatus::Enqueued);
    // Nothing else is ready: the dispatcher claims nothing.
    let mut conn = db.pool.acquire().await.unwrap();
    assert!(
        transitions::claim_ready(&mut conn, 10, LEASE_MS, false)
            .await
            .unwrap()
            .dispatches
            .is_empty()
    );
    drop(conn);

    // Started, heartbeat, result: b and c are claimed by the result's transaction, with
    // a's results as their parents.
    let started = Started {
        worker_id: "w1".into(),
        step: StepStarted {
            step_id: first[0].message.step_id,
            dispatch_token: first[0].message.dispatch_token,
            started_at: Utc::now(),
            redelivered: false,
        },
    };
    let mut tx = db.pool.begin().await.unwrap();
    let marked = transitions::mark_started(&mut tx, &[started], LEASE)
        .await
        .unwrap();
    assert_eq!(marked.latencies.len(), 1);
    assert_eq!(marked.latencies[0].namespace, "shapes");
    assert!(marked.withdrawn.is_empty());
    let beat = RunningStep {
        step_id: first[0].message.step_id,
        dispatch_token: first[0].message.dispatch_token,
    };
    // A heartbeat under a token the step no longer has names a run to withdraw.
    let stale = RunningStep {
        step_id: first[0].message.step_id,
        dispatch_token: Uuid::new_v4(),
    };
    let beats = transitions::heartbeat(&mut tx, &[beat, stale.clone()], LEASE)
        .await
        .unwrap();
    assert_eq!(beats.extended, 1);
    assert_eq!(beats.withdrawn, [stale]);
    tx.commit().await.unwrap();

    let (applied, finished) = db.apply(&[result(&first[0], Outcome::Success, None)]).await;
    assert_eq!((applied.applied, applied.stale, finished), (1, 0, 0));
    assert_eq!(names(&applied.claimed), ["b", "c"]);
    for dispatch in &applied.claimed {
        assert_eq!(
            dispatch.message.parents.get("a"),
            Some(&json!({"from": "a"}))
        );
    }
    // d waits for both parents: one completion leaves one.
    let (b, c) = (&applied.claimed[0], &applied.claimed[1]);
    let (applied, _) = db.apply(&[result(b, Outcome::Success, None)]).await;
    assert!(applied.claimed.is_empty());
    assert_eq!(db.step(task, "d").await.remaining_parents, 1);
    let (applied, _) = db.apply(&[result(c, Outcome::Success, None)]).await;
    assert_eq!(names(&applied.claimed), ["d"]);
    assert_eq!(applied.claimed[0].message.parents.len(), 2);
    let (_, finished) = db
        .apply(&[result(&applied.claimed[0], Outcome::Success, None)])
        .await;
    assert_eq!(finished, 1);
    assert_eq!(db.task_status(task).await, TaskStatus::Complete);
    assert_eq!(
        db.reasons(task, "a").await,
        [
            TransitionReason::Dispatched,
            TransitionReason::Started,
            TransitionReason::Succeeded
        ]
    );
    // d's result overtook its started notice: the start is recorded before the outcome.
    assert_eq!(
        db.reasons(task, "d").await,
        [
            TransitionReason::Dispatched,
            TransitionReason::Started,
            TransitionReason::Succeeded
        ]
    );
    assert_eq!(
        db.task_reasons(task).await,
        [
            TransitionReason::Created,
            TransitionReason::FirstStepDispatched,
            TransitionReason::AllStepsDone
        ]
    );
    db.finish().await;
}

const ONE: &str = "namespace: failing\nname: one\nsteps:\n  - name: only\n    handler: h\n    retry_limit: 2\n    max_deferrals: 1\n    backoff: {base_seconds: 0.001}\n";

/// A step skipped by the coordinator counts for its child while another batch counts the
/// child's other parent: neither count is lost, and the last one claims the child.
#[tokio::test]
async fn a_skipped_parent_and_a_concurrent_result_both_count_for_their_child() {
    let db = TestDb::new("skip_race").await;
    let template = db
        .template("namespace: shapes\nname: join\nsteps:\n  - {name: a, handler: h}\n  - {name: b, handler: h, depends_on: [a], when: \"false\"}\n  - {name: y, handler: h}\n  - {name: c, handler: h, depends_on: [b, y]}\n")
        .await;
    let (task, first) = db.create(&template).await;
    let by_name = |name: &str| first.iter().find(|d| d.message.step_name == name).unwrap();
    let (a, y) = (
        result(by_name("a"), Outcome::Success, None),
        result(by_name("y"), Outcome::Success, None),
    );

    // y's batch counts y for c, and holds c's row.
    let mut other = db.pool.begin().await.unwrap();
    assert!(
        transitions::lock_batch(&mut other, &[y.step_id], &[y.step_id])
            .await
            .unwrap()
            .is_empty()
    );
    transitions::apply_results(&mut other, &[y], LEASE_MS)
        .await
        .unwrap();
    // a's batch skips b, and counts it for c: it waits for y's batch.
    let pool = db.pool.clone();
    let skipping = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        assert!(
            transitions::lock_batch(&mut tx, &[a.step_id], &[a.step_id])
                .await
                .unwrap()
                .is_empty()
        );
        let applied = transitions::apply_results(&mut tx, &[a], LEASE_MS)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        applied
    });
    db.until_a_transaction_waits_for_a_lock("a's batch, for c")
        .await;
    other.commit().await.unwrap();
    let applied = skipping.await.unwrap();

    assert_eq!(db.step(task, "b").await.status, StepStatus::Skipped);
    let c = db.step(task, "c").await;
    assert_eq!(
        (c.remaining_parents, c.status),
        (0, StepStatus::Enqueued),
        "{c:?}"
    );
    assert_eq!(names(&applied.claimed), ["c"]);
    db.finish().await;
}

/// A task's deadline passes while a batch fans its step out: the instances the batch
/// created and claimed are cancelled with the rest, and named for workers to drop.
#[tokio::test]
async fn a_deadline_cancels_the_instances_a_concurrent_batch_created() {
    let db = TestDb::new("deadline_fan").await;
    let template = db
        .template("namespace: shapes\nname: fan\nsteps:\n  - {name: a, handler: h}\n  - {name: load, handler: h, depends_on: [a], for_each: \"context.items\"}\n")
        .await;
    let (task, first) = create_with(&db, &template, json!({"items": [1, 2, 3]})).await;
    sqlx::query("UPDATE tasks SET deadline_at = now() - INTERVAL '1 second' WHERE task_id = $1")
        .bind(task)
        .execute(&db.pool)
        .await
        .unwrap();
    // a's batch fans `load` out, and holds its rows.
    let a = result(&first[0], Outcome::Success, None);
    let mut batch = db.pool.begin().await.unwrap();
    assert!(
        transitions::lock_batch(&mut batch, &[a.step_id], &[a.step_id])
            .await
            .unwrap()
            .is_empty()
    );
    let applied = transitions::apply_results(&mut batch, &[a], LEASE_MS)
        .await
        .unwrap();
    assert_eq!(applied.claimed.len(), 3);
    // The sweeper ends the task: it waits for the batch.
    let pool = db.pool.clone();
    let sweep = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        let expired = transitions::expire_deadlines(&mut tx, 10).await.unwrap();
        tx.commit().await.unwrap();
        expired
    });
    db.until_a_transaction_waits_for_a_lock("the sweep, for the batch")
        .await;
    batch.commit().await.unwrap();
    let expired = sweep.await.unwrap();

    assert_eq!(expired.len(), 1);
    assert_eq!(db.task_status(task).await, TaskStatus::Error);
    let unfinished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM steps WHERE task_id = $1 \
         AND status IN ('pending', 'enqueued', 'in_progress', 'waiting_for_retry')",
    )
    .bind(task)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(unfinished, 0);
    let mut named: Vec<Uuid> = expired[0].running.iter().map(|(step, _)| *step).collect();
    named.sort_unstable();
    let mut instances: Vec<Uuid> = applied.claimed.iter().map(|d| d.message.step_id).collect();
    instances.sort_unstable();
    assert_eq!(named, instances);
    db.finish().await;
}

/// A clean-up step (`trigger: all_done`) that ran after its parent failed, and was
/// cancelled by the task's deadline, waits again for that parent when an operator
/// retries the task: it runs once the retried parent is done, not beside it.
#[tokio::test]
async fn a_retry_after_a_deadline_makes_a_clean_up_wait_for_its_parent_again() {
    let db = TestDb::new("retry_cleanup").await;
    let template = db
        .template("namespace: shapes\nname: ship\nsteps:\n  - {name: ship, handler: h, retry_limit: 1}\n  - {name: release, handler: h, depends_on: [ship], trigger: all_done}\n")
        .await;
    let (task, first) = db.create(&template).await;
    let (applied, _) = db
        .apply(&[result(
            &first[0],
            Outcome::PermanentError,
            failure("no truck", None),
        )])
        .await;
    assert_eq!(names(&applied.claimed), ["release"]);
    sqlx::query("UPDATE tasks SET deadline_at = now() - INTERVAL '1 second' WHERE task_id = $1")
        .bind(task)
        .execute(&db.pool)
        .await
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(
        transitions::expire_deadlines(&mut tx, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    tx.commit().await.unwrap();
    assert_eq!(db.step(task, "release").await.status, StepStatus::Cancelled);

    let mut tx = db.pool.begin().await.unwrap();
    transitions::retry_task(&mut tx, task, Some("trucks are back"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let release = db.step(task, "release").await;
    assert_eq!(
        (release.status, release.remaining_parents),
        (StepStatus::Pending, 1)
    );
    let mut conn = db.pool.acquire().await.unwrap();
    let again = transitions::claim_ready(&mut conn, 10, LEASE_MS, false)
        .await
        .unwrap()
        .dispatches;
    drop(conn);
    assert_eq!(names(&again), ["ship"]);
    let (applied, _) = db.apply(&[result(&again[0], Outcome::Success, None)]).await;
    assert_eq!(names(&applied.claimed), ["release"]);
    db.finish().await;
}

/// Resolving the failed parent of a compensation that fans out (`trigger: one_failed`,
/// `for_each`) leaves its instances as they were: they had counted nothing, and run on.
#[tokio::test]
async fn resolving_the_parent_of_a_fanned_out_compensation_leaves_its_instances_ready() {
    let db = TestDb::new("resolve_fan").await;
    let template = db
        .template("namespace: shapes\nname: refunds\nsteps:\n  - {name: charge, handler: h, retry_limit: 1}\n  - {name: refund, handler: h, depends_on: [charge], trigger: one_failed, for_each: \"context.payments\", max_parallel: 1}\n")
        .await;
    let (task, first) = create_with(&db, &template, json!({"payments": [1, 2, 3]})).await;
    let (applied, _) = db
        .apply(&[result(
            &first[0],
            Outcome::PermanentError,
            failure("declined", None),
        )])
        .await;
    assert_eq!(names(&applied.claimed), ["refund[0]"]);
    let mut tx = db.pool.begin().await.unwrap();
    transitions::resolve_step(&mut tx, task, "charge", None, Some("refunded by hand"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    for instance in ["refund[0]", "refund[1]", "refund[2]"] {
        assert_eq!(
            db.step(task, instance).await.remaining_parents,
            0,
            "{instance}"
        );
    }
    let (applied, _) = db
        .apply(&[result(&applied.claimed[0], Outcome::Success, None)])
        .await;
    assert_eq!(names(&applied.claimed), ["refund[1]"]);
    db.finish().await;
}

/// A fan-out failed by an instance counted as failed for its clean-up step, which ran and
/// failed too. Resolving that instance revives the fan-out: the clean-up waits for it
/// again, and a retry of the task then runs the clean-up once it is done.
#[tokio::test]
async fn resolving_a_failed_instance_makes_the_clean_up_wait_for_its_fan_out_again() {
    let db = TestDb::new("resolve_instance").await;
    let template = db
        .template("namespace: shapes\nname: loads\nsteps:\n  - {name: a, handler: h}\n  - {name: load, handler: h, depends_on: [a], retry_limit: 1, for_each: \"context.items\"}\n  - {name: cleanup, handler: h, depends_on: [load], retry_limit: 1, trigger: all_done}\n")
        .await;
    let (task, first) = create_with(&db, &template, json!({"items": [1, 2]})).await;
    let (applied, _) = db.apply(&[result(&first[0], Outcome::Success, None)]).await;
    assert_eq!(names(&applied.claimed), ["load[0]", "load[1]"]);
    let instance = |name: &str| {
        applied
            .claimed
            .iter()
            .find(|d| d.message.step_name == name)
            .unwrap()
            .clone()
    };
    let (failed, _) = db
        .apply(&[result(
            &instance("load[1]"),
            Outcome::PermanentError,
            failure("bad row", None),
        )])
        .await;
    assert_eq!(names(&failed.claimed), ["cleanup"]);
    db.apply(&[result(&instance("load[0]"), Outcome::Success, None)])
        .await;
    let (_, finished) = db
        .apply(&[result(
            &failed.claimed[0],
            Outcome::PermanentError,
            failure("disk full", None),
        )])
        .await;
    assert_eq!(finished, 1);
    assert_eq!(db.task_status(task).await, TaskStatus::Error);

    let mut tx = db.pool.begin().await.unwrap();
    transitions::resolve_step(&mut tx, task, "load[1]", Some(&json!({})), None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    transitions::claim_ready(&mut conn, 10, LEASE_MS, false)
        .await
        .unwrap();
    drop(conn);
    assert_eq!(db.step(task, "load").await.status, StepStatus::Complete);
    let cleanup = db.step(task, "cleanup").await;
    assert_eq!(
        (cleanup.status, cleanup.remaining_parents),
        (StepStatus::Error, 0)
    );

    let mut tx = db.pool.begin().await.unwrap();
    transitions::retry_task(&mut tx, task, None).await.unwrap();
    tx.commit().await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let again = transitions::claim_ready(&mut conn, 10, LEASE_MS, false)
        .await
        .unwrap()
        .dispatches;
    drop(conn);
    assert_eq!(names(&again), ["cleanup"]);
    db.finish().await;
}

#[tokio::test]
async fn results_retry_defer_fail_and_stale_as_decided() {
    let db = TestDb::new("results").await;
    let template = db.template(ONE).await;
    let (task, first) = db.create(&template).await;

    // A duplicate in one batch, and a result with a wrong token: stale.
    let good = result(
        &first[0],
        Outcome::RetryableError,
        failure("flaky", Some(0.0)),
    );
    let forged = StepResult {
        dispatch_token: Uuid::new_v4(),
        ..good.clone()
    };
    let (applied, _) = db.apply(&[good.clone(), good.clone(), forged]).await;
    assert_eq!(
        (applied.applied, applied.stale, applied.retries_scheduled),
        (1, 2, 1)
    );
    let step = db.step(task, "only").await;
    assert_eq!(step.status, StepStatus::WaitingForRetry);
    assert_eq!(step.last_error.unwrap()["kind"], "retryable");
    assert!(step.next_attempt_at.is_some());
    // The same result again, once applied: stale.
    let (applied, _) = db.apply(&[good]).await;
    assert_eq!((applied.applied, applied.stale), (0, 1));

    // Retry-After 0: due at once; the dispatcher claims attempt 2.
    let mut conn = db.pool.acquire().await.unwrap();
    let due = transitions::next_due(&mut conn).await.unwrap();
    assert!(due.is_some_and(|due| due <= Utc::now()));
    let second = transitions::claim_ready(&mut conn, 10, LEASE_MS, false)
        .await
        .unwrap()
        .dispatches;
    drop(conn);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].message.attempt, 2);

    // A deferral gives the attempt back; the second passes max_deferrals: error.
    let (applied, _) = db
        .apply(&[result(
            &second[0],
            Outcome::Deferred,
            failure("later", Some(0.0)),
        )])
        .await;
    assert_eq!(applied.changes[0].to_status, StepStatus::WaitingForRetry);
    let step = db.step(task, "only").await;
    assert_eq!((step.attempts, step.deferrals), (1, 1));
    let mut conn = db.pool.acquire().await.unwrap();
    let third = transitions::claim_ready(&mut conn, 10, LEASE_MS, false)
        .await
        .unwrap()
        .dispatches;
    drop(conn);
    assert_eq!(third[0].message.attempt, 2);
    let (_, finished) = db
        .apply(&[result(
            &third[0],
            Outcome::Deferred,
            failure("later again", None),
        )])
        .await;
    assert_eq!(finished, 1);
    let step = db.step(task, "only").await;
    assert_eq!(step.status, StepStatus::Error);
    assert_eq!(step.last_error.unwrap()["code"], "deferral_limit");
    assert_eq!(db.task_status(task).await, TaskStatus::Error);

    // Retried by an operator: a fresh budget, the dispatcher claims it, and a permanent
    // failure ends it at once.
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(
        transitions::retry_task(&mut tx, task, Some("fixed"))
            .await
            .unwrap(),
        1
    );
    tx.commit().await.unwrap();
    let step = db.step(task, "only").await;
    assert_eq!(
        (step.status, step.attempts, step.deferrals),
        (StepStatus::Pending, 0, 0)
    );
    let mut conn = db.pool.acquire().await.unwrap();
    let again = transitions::claim_ready(&mut conn, 10, LEASE_MS, false)
        .await
        .unwrap()
        .dispatches;
    drop(conn);
    let (_, finished) = db
        .apply(&[result(
            &again[0],
            Outcome::PermanentError,
            failure("bad input", None),
        )])
        .await;
    assert_eq!(finished, 1);
    assert_eq!(
        db.step(task, "only").await.last_error.unwrap()["kind"],
        "permanent"
    );
    assert_eq!(
        db.reasons(task, "only").await,
        [
            TransitionReason::Dispatched,
            TransitionReason::Started,
            TransitionReason::RetryScheduled,
            TransitionReason::Dispatched,
            TransitionReason::Started,
            TransitionReason::Deferred,
            TransitionReason::Dispatched,
            TransitionReason::Started,
            TransitionReason::DeferralLimit,
            TransitionReason::RetryRequested,
            TransitionReason::Dispatched,
            TransitionReason::Started,
            TransitionReason::Failed,
        ]
    );

    // Resolving the task closes it; resolving it twice is refused.
    let mut tx = db.pool.begin().await.unwrap();
    transitions::resolve_task(&mut tx, task, Some("refunded by hand"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(db.task_status(task).await, TaskStatus::ResolvedManually);
    let mut tx = db.pool.begin().await.unwrap();
    assert!(matches!(
        transitions::resolve_task(&mut tx, task, None).await,
        Err(OperatorError::Conflict(_))
    ));
    drop(tx);
    assert_eq!(
        db.task_reasons(task).await,
        [
            TransitionReason::Created,
            TransitionReason::FirstStepDispatched,
            TransitionReason::BlockedByFailures,
            TransitionReason::RetryRequested,
            TransitionReason::BlockedByFailures,
            TransitionReason::ResolvedByOperator,
        ]
    );
    db.finish().await;
}

#[tokio::test]
async fn leases_expire_operators_resolve_and_cancel() {
    let db = TestDb::new("operators").await;
    let template = db.template(DIAMOND).await;

    // A claim whose lease ran out goes back to wait (lease_lost while only enqueued),
    // and is claimed again with a new token; the old token's result is stale.
    let (task, first) = db.create(&template).await;
    sqlx::query(
        "UPDATE steps SET lease_expires_at = now() - interval '1 second' WHERE task_id = $1",
    )
    .bind(task)
    .execute(&db.pool)
    .await
    .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let expired = transitions::expire_leases(&mut tx, 10, false, (&[], 0))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        expired.requeued.len(),
        1,
        "never started: requeued without an attempt"
    );
    assert_eq!(db.step(task, "a").await.status, StepStatus::WaitingForRetry);
    let mut conn = db.pool.acquire().await.unwrap();
    let again = transitions::claim_ready(&mut conn, 10, LEASE_MS, false)
        .await
        .unwrap()
        .dispatches;
    drop(conn);
    assert_eq!(again.len(), 1);
    assert_ne!(
        again[0].message.dispatch_token,
        first[0].message.dispatch_token
    );
    let (applied, _) = db.apply(&[result(&first[0], Outcome::Success, None)]).await;
    assert_eq!(applied.stale, 1);

    // a fails for good; resolving it by hand runs its children with the given results.
    let (_, finished) = db
        .apply(&[result(
            &again[0],
            Outcome::PermanentError,
            failure("down", None),
        )])
        .await;
    assert_eq!(finished, 1);
    assert_eq!(db.task_status(task).await, TaskStatus::Error);
    let mut tx = db.pool.begin().await.unwrap();
    transitions::resolve_step(&mut tx, task, "a", Some(&json!({"by": "hand"})), Some("ok"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(db.task_status(task).await, TaskStatus::InProgress);
    let step = db.step(task, "a").await;
    assert_eq!(
        (step.status, step.results),
        (StepStatus::ResolvedManually, Some(json!({"by": "hand"})))
    );
    let mut conn = db.pool.acquire().await.unwrap();
    let children = transitions::claim_ready(&mut conn, 10, LEASE_MS, false)
        .await
        .unwrap()
        .dispatches;
    drop(conn);
    assert_eq!(names(&children), ["b", "c"]);
    assert_eq!(children[0].message.parents["a"], json!({"by": "hand"}));
    // Resolving a running step is refused.
    let mut tx = db.pool.begin().await.unwrap();
    assert!(matches!(
        transitions::resolve_step(&mut tx, task, "b", None, None).await,
        Err(OperatorError::Conflict(_))
    ));
    drop(tx);

    // Cancelling stops everything unfinished; the results in flight are stale.
    let mut tx = db.pool.begin().await.unwrap();
    let cancelled = transitions::cancel_task(&mut tx, task, Some("customer left"), LEASE_MS)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(cancelled.steps, 3, "b, c running and d pending");
    assert_eq!(db.task_status(task).await, TaskStatus::Cancelled);
    let (applied, _) = db
        .apply(&[result(&children[0], Outcome::Success, None)])
        .await;
    assert_eq!(applied.stale, 1);
    assert_eq!(db.step(task, "d").await.status, StepStatus::Cancelled);
    // A worker that did not hear of the cancel reports the runs: withdrawn, and their
    // steps left as they are.
    let runs: Vec<RunningStep> = children
        .iter()
        .map(|dispatch| RunningStep {
            step_id: dispatch.message.step_id,
            dispatch_token: dispatch.message.dispatch_token,
        })
        .collect();
    let mut tx = db.pool.begin().await.unwrap();
    let notice = Started {
        worker_id: "w1".into(),
        step: StepStarted {
            step_id: runs[1].step_id,
            dispatch_token: runs[1].dispatch_token,
            started_at: Utc::now(),
            redelivered: false,
        },
    };
    let marked = transitions::mark_started(&mut tx, &[notice], LEASE)
        .await
        .unwrap();
    assert!(marked.latencies.is_empty());
    assert_eq!(marked.withdrawn, runs[1..]);
    let mut beats = transitions::heartbeat(&mut tx, &runs, LEASE).await.unwrap();
    beats.withdrawn.sort_by_key(|run| run.step_id);
    let mut all = runs.clone();
    all.sort_by_key(|run| run.step_id);
    assert_eq!((beats.extended, beats.withdrawn), (0, all));
    tx.commit().await.unwrap();
    assert_eq!(db.step(task, "c").await.status, StepStatus::Cancelled);
    let mut tx = db.pool.begin().await.unwrap();
    assert!(matches!(
        transitions::cancel_task(&mut tx, task, None, LEASE_MS).await,
        Err(OperatorError::Conflict(_))
    ));
    drop(tx);
    assert!(db.step(task, "d").await.dispatch_token.is_none());
    db.finish().await;
}

/// Every history row is an allowed transition with a reason that fits it.
async fn check_history(pool: &PgPool) {
    let steps: Vec<(Option<StepStatus>, StepStatus, TransitionReason)> =
        sqlx::query_as("SELECT from_status, to_status, reason FROM step_transitions")
            .fetch_all(pool)
            .await
            .unwrap();
    assert!(!steps.is_empty());
    for (from, to, reason) in &steps {
        let from = from.expect("a step's history row names where it came from");
        let redelivered = from == StepStatus::InProgress && *to == StepStatus::InProgress;
        // A step the coordinator judges records what it did without leaving `pending`.
        let judged = from == StepStatus::Pending && *to == StepStatus::Pending;
        assert!(
            from.can_transition_to(*to) || redelivered || judged,
            "step {from} → {to} ({reason}) is not an allowed transition"
        );
        assert!(
            reason_fits_step(*reason, *to),
            "step → {to} recorded with reason {reason}"
        );
    }
    let tasks: Vec<(Option<TaskStatus>, TaskStatus, TransitionReason)> =
        sqlx::query_as("SELECT from_status, to_status, reason FROM task_transitions")
            .fetch_all(pool)
            .await
            .unwrap();
    for (from, to, reason) in &tasks {
        match from {
            None => assert_eq!(
                (*to, *reason),
                (TaskStatus::Pending, TransitionReason::Created)
            ),
            Some(from) => assert!(
                from.can_transition_to(*to),
                "task {from} → {to} ({reason}) is not an allowed transition"
            ),
        }
    }
}

fn reason_fits_step(reason: TransitionReason, to: StepStatus) -> bool {
    use StepStatus as S;
    use TransitionReason as R;
    match reason {
        R::Dispatched => to == S::Enqueued,
        R::Started | R::RestartedAfterRedelivery => to == S::InProgress,
        R::Succeeded => to == S::Complete,
        R::RetryScheduled | R::Deferred | R::LeaseLost => to == S::WaitingForRetry,
        R::LeaseExpired => matches!(to, S::WaitingForRetry | S::Error),
        R::DeferralLimit | R::NotRetryable | R::AttemptsExhausted | R::Failed => to == S::Error,
        R::TaskCancelled => to == S::Cancelled,
        R::RetryRequested => to == S::Pending,
        // A fan-out failed by the instance resolved waits for its instances again.
        R::ResolvedByOperator => matches!(to, S::ResolvedManually | S::Pending),
        R::InstancesDone => to == S::Complete,
        R::ConditionFalse => to == S::Skipped,
        R::FannedOut => to == S::Pending,
        R::InstanceFailed => to == S::Error,
        R::DeadlineExceeded => to == S::Cancelled,
        _ => false,
    }
}

/// A lease that expires waits `tasker_backoff_ms` in SQL; a result waits
/// `Backoff::delay_ms`. The two must agree.
#[tokio::test]
async fn the_sql_backoff_and_the_decision_s_backoff_agree() {
    let db = TestDb::new("backoff").await;
    let policies = [
        Backoff {
            base_ms: 1_000,
            max_ms: 30_000,
            jitter: false,
            schedule_ms: None,
        },
        Backoff {
            base_ms: 50,
            max_ms: 1_000,
            jitter: false,
            schedule_ms: Some(vec![100, 2_000, 500]),
        },
    ];
    for backoff in &policies {
        for attempt in [0, 1, 2, 3, 5, 8, 40] {
            for retry_after in [None, Some(0.5), Some(-3.0), Some(1e6)] {
                let sql: f64 =
                    sqlx::query_scalar("SELECT tasker_backoff_ms($1, $2, $3, $4, $5, $6)")
                        .bind(attempt)
                        .bind(retry_after)
                        .bind(backoff.base_ms)
                        .bind(backoff.max_ms)
                        .bind(backoff.jitter)
                        .bind(backoff.schedule_ms.clone())
                        .fetch_one(&db.pool)
                        .await
                        .unwrap();
                let rust = backoff.delay_ms(attempt, retry_after, 0.0);
                assert_eq!(
                    sql, rust,
                    "{backoff:?}, attempt {attempt}, retry_after {retry_after:?}"
                );
            }
        }
    }
    // With jitter, SQL draws its own number: it stays within the Rust bounds.
    let jittered = Backoff {
        jitter: true,
        ..policies[0].clone()
    };
    let sql: f64 = sqlx::query_scalar("SELECT tasker_backoff_ms(3, NULL, 1000, 30000, true, NULL)")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!((jittered.delay_ms(3, None, 0.0)..=jittered.delay_ms(3, None, 1.0)).contains(&sql));
    db.finish_without_history().await;
}

#[tokio::test]
async fn the_dispatcher_claims_the_higher_priority_first() {
    let db = TestDb::new("priority").await;
    let low = db
        .template(
            "namespace: shapes\nname: low\npriority: 2\nsteps:\n  - name: a\n    handler: h\n",
        )
        .await;
    let plain = db.template(ONE).await;
    // Created unclaimed (as while the broker is away), low first, oldest first.
    let create = |template: &Arc<TemplateRecord>, priority: Option<i16>| {
        let new = Arc::new(NewTask {
            context: json!({}),
            tags: json!([]),
            priority,
            ..NewTask::default()
        });
        Creation::new(template.clone(), new, None, None).unwrap()
    };
    let mut ids = Vec::new();
    for creation in [
        create(&low, None),
        create(&plain, None),
        create(&low, Some(9)),
        create(&plain, Some(0)),
    ] {
        match tasks::create(&db.pool, &creation).await.unwrap() {
            Created::New(task, _, dispatches) => {
                assert!(dispatches.is_empty());
                ids.push((task.task_id, task.priority));
            }
            other => panic!("not created: {other:?}"),
        }
    }
    // The template's priority, or the one asked for; stored on the task.
    assert_eq!(
        ids.iter().map(|(_, p)| *p).collect::<Vec<_>>(),
        [2, 5, 9, 0]
    );
    let stored = tasks::get(&db.pool, ids[2].0).await.unwrap().unwrap();
    assert_eq!(stored.priority, 9);
    // One claim at a time: the highest priority first, then the older of equals.
    let mut order = Vec::new();
    let mut conn = db.pool.acquire().await.unwrap();
    for _ in 0..4 {
        let claimed = transitions::claim_ready(&mut conn, 1, LEASE_MS, false)
            .await
            .unwrap()
            .dispatches;
        assert_eq!(claimed.len(), 1);
        order.push(claimed[0].message.task_id);
    }
    drop(conn);
    assert_eq!(order, [ids[2].0, ids[1].0, ids[0].0, ids[3].0]);
    db.finish().await;
}

/// Create a task of `template` with `context`, claiming its first steps: its id and the
/// claimed steps' dispatches.
async fn create_with(
    db: &TestDb,
    template: &Arc<TemplateRecord>,
    context: Value,
) -> (Uuid, Vec<Dispatch>) {
    let (_, task_id, dispatches) = create_outcome(db, template, context).await;
    (task_id, dispatches)
}

async fn held(db: &TestDb, task_id: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT held FROM steps WHERE task_id = $1")
        .bind(task_id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

const LIMITED: &str = "namespace: flow\nname: limited\nsteps:\n  - name: call\n    handler: h\n    retry_limit: 3\n    backoff: {base_seconds: 0.001, jitter: false}\n    concurrency: {key: context.customer, limit: 2}\n";

#[tokio::test]
async fn a_concurrency_limit_holds_steps_and_a_result_releases_them() {
    let db = TestDb::new("concurrency").await;
    let template = db.template(LIMITED).await;
    let mut a = Vec::new();
    for _ in 0..4 {
        a.push(create_with(&db, &template, json!({"customer": "a"})).await);
    }
    let (b, b_claimed) = create_with(&db, &template, json!({"customer": "b"})).await;
    // Two of customer a run, the others are held; customer b is not held by a.
    let claimed: Vec<usize> = a.iter().map(|(_, d)| d.len()).collect();
    assert_eq!(claimed, [1, 1, 0, 0]);
    assert_eq!(b_claimed.len(), 1);
    assert_eq!(
        held(&db, a[2].0).await.as_deref(),
        Some("concurrency_limited")
    );
    assert_eq!(held(&db, b).await, None);
    let readiness = tasker_shared::store::inspect::readiness(&db.pool, a[2].0)
        .await
        .unwrap();
    assert_eq!(readiness[0].reason, "concurrency_limited");
    assert!(!readiness[0].ready);
    assert_eq!(readiness[0].key.as_deref(), Some("a"));
    assert_eq!(readiness[0].limit, Some(2));
    assert!(
        readiness[0].message.contains("2 queued or running"),
        "{}",
        readiness[0].message
    );
    // The dispatcher's scan passes over held steps.
    let mut conn = db.pool.acquire().await.unwrap();
    assert!(
        transitions::claim_ready(&mut conn, 10, LEASE_MS, false)
            .await
            .unwrap()
            .dispatches
            .is_empty()
    );
    drop(conn);

    // A completion frees a slot: the oldest held step of the key is claimed with it.
    let (applied, _) = db
        .apply(&[result(&a[0].1[0], Outcome::Success, None)])
        .await;
    let released: Vec<Uuid> = applied.claimed.iter().map(|d| d.message.task_id).collect();
    assert_eq!(released, [a[2].0]);
    assert_eq!(held(&db, a[2].0).await, None);
    // So does a failure that will be retried; the retry then waits for a slot itself.
    let (applied, _) = db
        .apply(&[result(
            &a[1].1[0],
            Outcome::RetryableError,
            failure("busy", None),
        )])
        .await;
    let released: Vec<Uuid> = applied.claimed.iter().map(|d| d.message.task_id).collect();
    assert_eq!(released, [a[3].0]);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let mut conn = db.pool.acquire().await.unwrap();
    assert!(
        transitions::claim_ready(&mut conn, 10, LEASE_MS, false)
            .await
            .unwrap()
            .dispatches
            .is_empty()
    );
    drop(conn);
    assert_eq!(
        held(&db, a[1].0).await.as_deref(),
        Some("concurrency_limited")
    );
    assert_eq!(
        db.step(a[1].0, "call").await.status,
        StepStatus::WaitingForRetry
    );
    db.finish().await;
}

const RATED: &str = "namespace: flow\nname: rated\nsteps:\n  - name: call\n    handler: h\n    rate_limit: {key: \"'partner'\", limit: 3, per: 1s}\n";

#[tokio::test]
async fn a_rate_limit_holds_steps_until_their_slot() {
    let db = TestDb::new("rate").await;
    let template = db.template(RATED).await;
    let before = Utc::now();
    let mut created = Vec::new();
    for n in 0..5 {
        created.push(create_with(&db, &template, json!({"n": n})).await);
    }
    let claimed: Vec<usize> = created.iter().map(|(_, d)| d.len()).collect();
    assert_eq!(claimed, [1, 1, 1, 0, 0]);
    // Each held step has the time its slot may open: the claimed ones have not started,
    // so a window from now.
    for (task, _) in &created[3..] {
        assert_eq!(held(&db, *task).await.as_deref(), Some("rate_limited"));
        let slot = db.step(*task, "call").await.next_attempt_at.unwrap();
        let wait = (slot - before).num_milliseconds();
        assert!(
            (1_000..2_000).contains(&wait),
            "slot {wait} ms after the first claim"
        );
        let readiness = tasker_shared::store::inspect::readiness(&db.pool, *task)
            .await
            .unwrap();
        assert_eq!(readiness[0].reason, "rate_limited");
        assert_eq!(readiness[0].key.as_deref(), Some("partner"));
        assert_eq!(readiness[0].next_attempt_at, Some(slot));
    }
    // The three ran, starting (on the worker's clock) before the first claim.
    let ran: Vec<StepResult> = created[..3]
        .iter()
        .map(|(_, dispatches)| StepResult {
            started_at: before,
            ..result(&dispatches[0], Outcome::Success, None)
        })
        .collect();
    db.apply(&ran).await;
    // Not before the slot...
    let mut conn = db.pool.acquire().await.unwrap();
    assert!(
        transitions::claim_ready(&mut conn, 10, LEASE_MS, true)
            .await
            .unwrap()
            .dispatches
            .is_empty()
    );
    // ...and at it, both.
    let slot = db.step(created[4].0, "call").await.next_attempt_at.unwrap();
    let wait = (slot - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + std::time::Duration::from_millis(20)).await;
    let released = transitions::claim_ready(&mut conn, 10, LEASE_MS, true)
        .await
        .unwrap()
        .dispatches;
    drop(conn);
    assert_eq!(
        released.len(),
        2,
        "both held steps start once their slot came"
    );
    for (task, _) in &created[3..] {
        assert_eq!(held(&db, *task).await, None);
        assert_eq!(db.step(*task, "call").await.status, StepStatus::Enqueued);
    }
    db.finish().await;
}

fn per_customer(on_limit: &str) -> String {
    format!(
        "namespace: flow\nname: {on_limit}\nconcurrency:\n  - {{key: context.customer, limit: 1, on_limit: {on_limit}}}\nsteps:\n  - name: a\n    handler: h\n  - name: b\n    handler: h\n    depends_on: [a]\n"
    )
}

/// The same, with the task's status as created.
async fn create_outcome(
    db: &TestDb,
    template: &Arc<TemplateRecord>,
    context: Value,
) -> (TaskStatus, Uuid, Vec<Dispatch>) {
    let new = Arc::new(NewTask {
        context,
        tags: json!([]),
        ..NewTask::default()
    });
    let creation = Creation::new(template.clone(), new, Some(LEASE_MS), None).unwrap();
    match tasks::create(&db.pool, &creation).await.unwrap() {
        Created::New(task, _, dispatches) => (task.status, task.task_id, dispatches),
        other => panic!("not created: {other:?}"),
    }
}

#[tokio::test]
async fn a_template_concurrency_queues_tasks_until_one_of_the_key_finishes() {
    let db = TestDb::new("task_queue").await;
    let template = db.template(&per_customer("queue")).await;
    let (first, one, a1) = create_outcome(&db, &template, json!({"customer": "x"})).await;
    let (second, two, a2) = create_outcome(&db, &template, json!({"customer": "x"})).await;
    let (other, _, a3) = create_outcome(&db, &template, json!({"customer": "y"})).await;
    assert_eq!(
        (first, second, other),
        (
            TaskStatus::InProgress,
            TaskStatus::Pending,
            TaskStatus::InProgress
        )
    );
    assert_eq!((a1.len(), a2.len(), a3.len()), (1, 0, 1));
    let readiness = tasker_shared::store::inspect::readiness(&db.pool, two)
        .await
        .unwrap();
    assert_eq!(readiness[0].reason, "concurrency_limited");
    assert_eq!(readiness[0].key.as_deref(), Some("x"));
    assert_eq!(readiness[0].limit, Some(1));
    assert!(
        readiness[0].message.contains("tasks at once"),
        "{}",
        readiness[0].message
    );
    // Nothing is offered while the first runs, even after its first step completes.
    let (applied, _) = db.apply(&[result(&a1[0], Outcome::Success, None)]).await;
    let mut conn = db.pool.acquire().await.unwrap();
    assert!(
        transitions::claim_ready(&mut conn, 10, LEASE_MS, true)
            .await
            .unwrap()
            .dispatches
            .is_empty()
    );
    drop(conn);
    // Once it finishes, the waiting task starts.
    let (_, finished) = db
        .apply(&[result(&applied.claimed[0], Outcome::Success, None)])
        .await;
    assert_eq!(finished, 1);
    assert_eq!(db.task_status(one).await, TaskStatus::Complete);
    let mut conn = db.pool.acquire().await.unwrap();
    let started = transitions::claim_ready(&mut conn, 10, LEASE_MS, false)
        .await
        .unwrap()
        .dispatches;
    drop(conn);
    assert_eq!(started.len(), 1);
    assert_eq!(started[0].message.task_id, two);
    assert_eq!(db.task_status(two).await, TaskStatus::InProgress);
    db.finish().await;
}

#[tokio::test]
async fn a_template_concurrency_cancels_the_newest_or_the_oldest() {
    let db = TestDb::new("task_cancel").await;
    let newest = db.template(&per_customer("cancel_newest")).await;
    let (first, _, _) = create_outcome(&db, &newest, json!({"customer": "x"})).await;
    let (second, two, claimed) = create_outcome(&db, &newest, json!({"customer": "x"})).await;
    assert_eq!(
        (first, second),
        (TaskStatus::InProgress, TaskStatus::Cancelled)
    );
    assert!(claimed.is_empty());
    assert_eq!(db.task_status(two).await, TaskStatus::Cancelled);
    assert_eq!(
        db.task_reasons(two).await,
        [
            TransitionReason::Created,
            TransitionReason::CancelledByConcurrencyLimit
        ]
    );
    assert_eq!(db.step(two, "a").await.status, StepStatus::Cancelled);

    let oldest = db.template(&per_customer("cancel_oldest")).await;
    let (_, one, running) = create_outcome(&db, &oldest, json!({"customer": "x"})).await;
    let (status, _, claimed) = create_outcome(&db, &oldest, json!({"customer": "x"})).await;
    assert_eq!(status, TaskStatus::InProgress);
    assert_eq!(claimed.len(), 1);
    assert_eq!(db.task_status(one).await, TaskStatus::Cancelled);
    assert_eq!(
        db.task_reasons(one).await,
        [
            TransitionReason::Created,
            TransitionReason::FirstStepDispatched,
            TransitionReason::CancelledByConcurrencyLimit
        ]
    );
    // The cancelled task's running step answers too late: its result is stale.
    let (applied, _) = db
        .apply(&[result(&running[0], Outcome::Success, None)])
        .await;
    assert_eq!(applied.stale, 1);
    db.finish().await;
}

/// Templates of a namespace no template has yet, registered at once (coordinators
/// starting together with the same templates directory, say): each is created.
#[tokio::test]
async fn templates_registered_at_once_into_a_new_namespace_are_all_created() {
    let db = TestDb::new("register_race").await;
    for round in 0..20 {
        let mut registrations = tokio::task::JoinSet::new();
        for n in 0..8 {
            let pool = db.pool.clone();
            let definition = parse_template(
                &format!("namespace: ns{round}\nname: t{n}\nsteps:\n  - {{name: a, handler: h}}\n"),
                "test",
            )
            .unwrap();
            registrations.spawn(async move { templates::register(&pool, &definition).await });
        }
        for registered in registrations.join_all().await {
            assert!(
                matches!(registered, Ok(Registered::Created { .. })),
                "round {round}: {registered:?}"
            );
        }
    }
    db.finish_without_history().await;
}

/// A connection of Tasker's left idle inside a transaction (its coordinator paused
/// mid-batch) is ended by PostgreSQL after `TASKER_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS`:
/// the rows it locked are released to the others, and its transaction is lost to it.
#[tokio::test]
async fn a_transaction_left_idle_releases_its_rows() {
    let db = TestDb::new("idle_transaction").await;
    db.pool
        .execute("CREATE TABLE held (id INT PRIMARY KEY, n INT NOT NULL); INSERT INTO held VALUES (1, 0)")
        .await
        .unwrap();
    let tasker = tasker_shared::db::connect_lazy(&db.settings(1_000, 30_000)).unwrap();
    let mut paused = tasker.begin().await.unwrap();
    sqlx::query("SELECT n FROM held WHERE id = 1 FOR UPDATE")
        .execute(&mut *paused)
        .await
        .unwrap();

    // Another transaction waits for the row: at most until PostgreSQL ends the paused
    // one's session, not for as long as it stays paused.
    let mut other = PgConnection::connect(&format!("{}/{}", db.server, db.name))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    sqlx::query("SET statement_timeout = '30s'")
        .execute(&mut other)
        .await
        .unwrap();
    sqlx::query("UPDATE held SET n = n + 1 WHERE id = 1")
        .execute(&mut other)
        .await
        .expect("the row is released while its holder stays paused");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    let error = paused.commit().await.unwrap_err();
    assert!(
        error.to_string().contains("idle-in-transaction timeout")
            || matches!(error, sqlx::Error::Io(_)),
        "{error}"
    );
    let n: i32 = sqlx::query_scalar("SELECT n FROM held WHERE id = 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
    tasker.close().await;
    db.finish_without_history().await;
}

/// `error` says the work waited 1 s for an answer, in vain.
fn given_up_after_1s(error: &sqlx::Error) {
    assert!(
        matches!(error, sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut),
        "{error}"
    );
    assert!(
        error.to_string().contains("did not answer within 1s"),
        "{error}"
    );
}

/// Work [`tasker_shared::db::Database::run`] gives up on ends on the server too: a
/// statement left waiting for a lock is ended soon after its connection is closed
/// (`client_connection_check_interval`), rather than waiting, holding a server connection,
/// for as long as the lock is held.
#[tokio::test]
async fn work_given_up_on_ends_on_the_server_too() {
    let db = TestDb::new("given_up").await;
    let database = db.impatient(2);
    let holder = db.hold_a_row().await;

    let error = database
        .run(async |conn| {
            sqlx::query("UPDATE held SET n = n + 1 WHERE id = 1")
                .execute(conn)
                .await
        })
        .await
        .unwrap_err();
    given_up_after_1s(&error);
    // The lock is still held: only the server's own check can end the waiting statement.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if waiting == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the statement given up on still waits for the lock after 15 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    holder.rollback().await.unwrap();
    let n: i32 = sqlx::query_scalar("SELECT n FROM held WHERE id = 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "the update given up on did not run");
    database.pool().close().await;
    db.finish_without_history().await;
}

/// Work given up on while its statement waits for an answer (an API request past the
/// patience, or whose client left) gives its connection back to the pool still owed that
/// answer. The pool waits for it at most the patience, then closes the connection: it
/// serves again while the answer still does not come, rather than waiting for it as long
/// as TCP lets it (on a host that vanished, about 15 minutes).
#[tokio::test]
async fn a_connection_given_back_unanswered_is_closed_after_the_patience() {
    let db = TestDb::new("given_back").await;
    let database = db.impatient(1);
    let holder = db.hold_a_row().await;

    let error = database
        .bounded(|pool| sqlx::query("UPDATE held SET n = n + 1 WHERE id = 1").execute(pool))
        .await
        .unwrap_err();
    given_up_after_1s(&error);
    // The lock is still held, so the update's answer does not come: the pool's one
    // connection serves again only if it was closed and made anew.
    let started = std::time::Instant::now();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(database.pool())
        .await
        .expect("the pool serves while the answer owed to its connection does not come");
    assert_eq!(one, 1);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "the pool served after {:?}",
        started.elapsed()
    );
    holder.rollback().await.unwrap();
    database.pool().close().await;
    db.finish_without_history().await;
}
