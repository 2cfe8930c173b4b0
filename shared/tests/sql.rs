//! Checks every statement under `shared/sql/` against the schema, in a fresh database
//! with every migration applied:
//!
//! - each one prepares (parsed, its names resolved, its types checked; not run). A
//!   statement that names an unknown table, column or function, or mixes types, fails
//!   here with its file, line and PostgreSQL's message, before any test runs it
//!   (`deploy/test.sh` runs this check right after the lints);
//! - none is planned to compare every row of an input list with every row it reads of a
//!   table, nor to walk a status index beside the ids it is given (below,
//!   [`no_statement_reads_more_than_the_rows_it_is_given`]).
//!
//! A `{NAME}` in a file stands for the file `name.sql` of the same folder, a fragment
//! that the code substitutes the same way (`retention/candidates.sql`). A fragment is
//! checked within the statements that take it, not alone.
//!
//! Needs PostgreSQL: `TASKER_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sqlx::postgres::{PgDatabaseError, PgErrorPosition};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, SqlSafeStr};

#[tokio::test]
async fn every_sql_file_prepares_against_the_migrated_schema() {
    let statements = statements();
    let database = Database::create("sqlcheck").await;
    // Nothing may panic until the database is dropped again.
    let checked = check(&database.url, &statements).await;
    database.remove().await;

    let failures = checked.expect("migrating the check's database");
    assert!(
        failures.is_empty(),
        "{} of {} statements under shared/sql do not prepare against the schema:\n\n{}",
        failures.len(),
        statements.len(),
        failures.join("\n\n")
    );
}

/// Under the settings of a transaction that works by key (`BEGIN_PLANNED_BY_KEY`: one
/// generic plan per connection; sequential scans, hash and merge joins off), a statement
/// given a list of ids must find its rows with one index probe per id. Two other plans
/// the planner may choose fail this test:
///
/// - a nested loop that reads a table once (say by `step_id = ANY ($1)` beside the
///   join), keeps it in a Materialize node and compares every row of the list with all
///   of it: the square of the batch (300 results, 44,850 comparisons). The planner takes
///   an `unnest` for ten rows, so it looks cheap;
/// - a walk of a status index of `steps` (`steps_unfinished`, `steps_leased`,
///   `steps_ready`, `steps_claim_order`) for a status test beside the ids: statistics
///   taken while nothing was pending say it holds nothing, and at run time it holds the
///   whole backlog. The transitions module's "Plans" says how a statement avoids it.
///
/// Checked as a coordinator's first connection plans, in an empty database, and again
/// after an `ANALYZE` of a database whose steps are all finished.
#[tokio::test]
async fn no_statement_reads_more_than_the_rows_it_is_given() {
    let statements = statements();
    let database = Database::create("plancheck").await;
    let checked = plans(&database.url, &statements).await;
    database.remove().await;

    let findings = checked.expect("migrating the check's database");
    assert!(
        findings.is_empty(),
        "{} plans under shared/sql read more than the rows they are given:\n\n{}",
        findings.len(),
        findings.join("\n\n")
    );
}

/// The statements under `shared/sql/`, their fragments in place.
fn statements() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
    let mut files = Vec::new();
    sql_files(&root, &mut files);
    assert!(!files.is_empty(), "no .sql files under {}", root.display());
    expand(&files)
}

/// A database of its own for one check.
struct Database {
    admin: PgConnection,
    name: String,
    url: String,
}

impl Database {
    async fn create(check: &str) -> Database {
        let server = std::env::var("TASKER_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let name = format!("tasker_{check}_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&format!("{server}/postgres"))
            .await
            .expect("connecting to PostgreSQL's `postgres` database");
        admin
            .execute(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .await
            .expect("creating the check's database");
        let url = format!("{server}/{name}");
        Database { admin, name, url }
    }

    async fn remove(mut self) {
        self.admin
            .execute(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            )))
            .await
            .expect("dropping the check's database");
        let _ = self.admin.close().await;
    }
}

/// Apply every migration, then prepare each statement. Returns one message per statement
/// that did not prepare.
async fn check(url: &str, statements: &[(PathBuf, String)]) -> sqlx::Result<Vec<String>> {
    let mut conn = PgConnection::connect(url).await?;
    tasker_shared::db::MIGRATOR.run(&mut conn).await?;
    let mut failures = Vec::new();
    for (file, sql) in statements {
        if let Err(error) = (&mut conn)
            .prepare(AssertSqlSafe(sql.as_str()).into_sql_str())
            .await
        {
            failures.push(explain(file, sql, &error));
        }
    }
    let _ = conn.close().await;
    Ok(failures)
}

/// A task whose 2,000 steps, a chain, are all finished, then `ANALYZE`: statistics that
/// say no step is pending, enqueued or running.
const FINISHED_WORK: &str = "\
    INSERT INTO tasks (task_id, template_id, namespace, name, version, status, context) \
    VALUES ('00000000-0000-7000-8000-000000000001', 1, 'n', 't', '1', 'complete', '{}'); \
    INSERT INTO steps (step_id, task_id, name, position, handler, status, remaining_parents, \
                       retry_limit, retryable, timeout_ms) \
    SELECT gen_random_uuid(), '00000000-0000-7000-8000-000000000001', 's' || g, g, 'h', \
           'complete', 0, 3, true, 1000 \
    FROM generate_series(1, 2000) g; \
    INSERT INTO step_edges (task_id, from_step, to_step) \
    SELECT a.task_id, a.step_id, b.step_id \
    FROM steps a JOIN steps b ON b.task_id = a.task_id AND b.position = a.position + 1; \
    ANALYZE";

/// The status indexes of `steps`: what a statement given ids must not walk.
const STATUS_INDEXES: [&str; 4] = [
    "steps_unfinished",
    "steps_leased",
    "steps_ready",
    "steps_claim_order",
];

/// Apply every migration, then plan each statement that prepares as a transaction that
/// works by key would: in the empty database, then after [`FINISHED_WORK`]. Returns one
/// message per plan that fails [`no_statement_reads_more_than_the_rows_it_is_given`].
async fn plans(url: &str, statements: &[(PathBuf, String)]) -> sqlx::Result<Vec<String>> {
    let mut conn = PgConnection::connect(url).await?;
    tasker_shared::db::MIGRATOR.run(&mut conn).await?;
    let mut findings = Vec::new();
    for (state, seed) in [
        ("in an empty database", None),
        ("after an ANALYZE of finished work", Some(FINISHED_WORK)),
    ] {
        if let Some(seed) = seed {
            (&mut conn).execute(seed).await?;
        }
        for (file, sql) in statements {
            let Some(plan) = plan(&mut conn, sql).await? else {
                continue;
            };
            let mut problems = Vec::new();
            materialized_joins(&plan[0]["Plan"], &mut problems);
            if given_ids(sql) {
                status_walks(&plan[0]["Plan"], &mut problems);
            }
            for problem in problems {
                findings.push(format!("{} ({state}): {problem}", name(file)));
            }
        }
    }
    let _ = conn.close().await;
    Ok(findings)
}

/// `sql`'s generic plan as a transaction that works by key makes it (`EXPLAIN` as JSON,
/// every parameter NULL), or `None` when it does not prepare (the other test reports
/// that).
async fn plan(conn: &mut PgConnection, sql: &str) -> sqlx::Result<Option<serde_json::Value>> {
    let mut tx = conn
        .begin_with(tasker_shared::db::BEGIN_PLANNED_BY_KEY)
        .await?;
    let prepared = (&mut *tx)
        .execute(AssertSqlSafe(format!("PREPARE tasker_plan_check AS {sql}")))
        .await;
    let mut plan = None;
    if prepared.is_ok() {
        let parameters: i32 = sqlx::query_scalar(
            "SELECT cardinality(parameter_types) FROM pg_prepared_statements \
             WHERE name = 'tasker_plan_check'",
        )
        .fetch_one(&mut *tx)
        .await?;
        let arguments = vec!["NULL"; usize::try_from(parameters).unwrap_or(0)].join(", ");
        let explain = if arguments.is_empty() {
            "EXPLAIN (FORMAT JSON) EXECUTE tasker_plan_check".to_owned()
        } else {
            format!("EXPLAIN (FORMAT JSON) EXECUTE tasker_plan_check({arguments})")
        };
        plan = Some(
            sqlx::query_scalar(AssertSqlSafe(explain))
                .fetch_one(&mut *tx)
                .await?,
        );
    }
    tx.rollback().await?;
    // PREPARE outlives the transaction.
    let _ = conn.execute("DEALLOCATE tasker_plan_check").await;
    Ok(plan)
}

/// Whether `sql` is given a list of ids: `= ANY ($n)` or `unnest($n…)`. A list of names
/// (`= ANY ($n::text[])`, the workers heard from) filters the rows a statement finds
/// otherwise.
fn given_ids(sql: &str) -> bool {
    sql.contains("unnest($")
        || sql.match_indices("= ANY ($").any(|(at, found)| {
            !sql[at + found.len()..]
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .starts_with("::text[]")
        })
}

/// Each scan under `node` that walks a status index of `steps`.
fn status_walks(node: &serde_json::Value, into: &mut Vec<String>) {
    if let Some(index) = node["Index Name"].as_str()
        && STATUS_INDEXES.contains(&index)
    {
        into.push(format!(
            "walks {index} ({}) beside the ids it is given",
            node["Index Cond"].as_str().unwrap_or("no condition")
        ));
    }
    for child in node["Plans"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        status_walks(child, into);
    }
}

/// Each nested loop under `node` whose inner side is a Materialize node over a table,
/// as "`join filter` against `tables`".
fn materialized_joins(node: &serde_json::Value, into: &mut Vec<String>) {
    let children = node["Plans"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if let [_, inner] = children
        && node["Node Type"] == "Nested Loop"
        && inner["Node Type"] == "Materialize"
    {
        let mut tables = Vec::new();
        relations(inner, &mut tables);
        if !tables.is_empty() {
            into.push(format!(
                "{} against {} read whole and kept in a Materialize node",
                node["Join Filter"]
                    .as_str()
                    .unwrap_or("a join without a filter"),
                tables.join(", ")
            ));
        }
    }
    for child in children {
        materialized_joins(child, into);
    }
}

/// The tables `node` and the nodes under it read.
fn relations(node: &serde_json::Value, into: &mut Vec<String>) {
    if let Some(table) = node["Relation Name"].as_str() {
        into.push(table.to_owned());
    }
    for child in node["Plans"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        relations(child, into);
    }
}

/// `file`, from the workspace's root.
fn name(file: &Path) -> String {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new(""));
    file.strip_prefix(workspace)
        .unwrap_or(file)
        .display()
        .to_string()
}

/// `file:line:column: message`, with the line of the statement PostgreSQL points at (in
/// the statement as prepared, its fragments in place).
fn explain(file: &Path, sql: &str, error: &sqlx::Error) -> String {
    let name = name(file);
    let Some(pg) = error
        .as_database_error()
        .and_then(|e| e.try_downcast_ref::<PgDatabaseError>())
    else {
        return format!("{name}: {error}");
    };
    let mut text = match pg.position() {
        Some(PgErrorPosition::Original(at)) => {
            // A position in characters, counted from 1.
            let before: String = sql.chars().take(at.saturating_sub(1)).collect();
            let line = before.matches('\n').count() + 1;
            let column = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
            let source = sql.lines().nth(line - 1).unwrap_or_default();
            format!("{name}:{line}:{column}: {}\n    {source}", pg.message())
        }
        _ => format!("{name}: {}", pg.message()),
    };
    for (label, extra) in [("detail", pg.detail()), ("hint", pg.hint())] {
        if let Some(extra) = extra {
            text.push_str(&format!("\n    {label}: {extra}"));
        }
    }
    text
}

/// Every `*.sql` file under `dir`, in a stable order.
fn sql_files(dir: &Path, into: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            sql_files(&path, into);
        } else if path.extension().is_some_and(|ext| ext == "sql") {
            into.push(path);
        }
    }
}

/// Each file with its placeholders substituted, minus the fragments (the files some
/// other file takes in place of a placeholder).
fn expand(files: &[PathBuf]) -> Vec<(PathBuf, String)> {
    let mut fragments = BTreeSet::new();
    let mut expanded = Vec::new();
    for file in files {
        let mut sql = read(file);
        // Fragments may hold placeholders too; a cycle would never end.
        for _ in 0..8 {
            let names = placeholders(&sql);
            if names.is_empty() {
                break;
            }
            for name in names {
                let fragment = file.with_file_name(format!("{}.sql", name.to_lowercase()));
                assert!(
                    fragment.is_file(),
                    "{}: {{{name}}} stands for {}, which does not exist",
                    file.display(),
                    fragment.display()
                );
                sql = sql.replace(&format!("{{{name}}}"), &read(&fragment));
                fragments.insert(fragment);
            }
        }
        assert!(
            placeholders(&sql).is_empty(),
            "{}: placeholders nested too deep (a cycle?)",
            file.display()
        );
        expanded.push((file.clone(), sql));
    }
    expanded.retain(|(file, _)| !fragments.contains(file));
    expanded
}

/// The `NAME`s of the `{NAME}` placeholders in `sql` (upper case, digits and `_`, so
/// that JSON such as `'{}'` or `'{"a": 1}'` is not taken for one).
fn placeholders(sql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = sql;
    while let Some(start) = rest.find('{') {
        rest = &rest[start + 1..];
        let Some(end) = rest.find('}') else { break };
        let name = &rest[..end];
        if name.starts_with(|c: char| c.is_ascii_uppercase())
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            names.insert(name.to_owned());
        }
    }
    names
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}
