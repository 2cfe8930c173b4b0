//! Checks every statement under `shared/sql/` against the schema: each one is prepared
//! (parsed, its names resolved, its types checked; not run) in a fresh database with
//! every migration applied. A statement that names an unknown table, column or
//! function, or mixes types, fails here with its file, line and PostgreSQL's message,
//! before any test runs it (`deploy/test.sh` runs this check right after the lints).
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
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
    let mut files = Vec::new();
    sql_files(&root, &mut files);
    assert!(!files.is_empty(), "no .sql files under {}", root.display());
    let statements = expand(&files);

    let server = std::env::var("TASKER_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let database = format!("tasker_sqlcheck_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&format!("{server}/postgres"))
        .await
        .expect("connecting to PostgreSQL's `postgres` database");
    admin
        .execute(AssertSqlSafe(format!("CREATE DATABASE \"{database}\"")))
        .await
        .expect("creating the check's database");

    // Nothing may panic until the database is dropped again.
    let checked = check(&format!("{server}/{database}"), &statements).await;

    admin
        .execute(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        )))
        .await
        .expect("dropping the check's database");
    let _ = admin.close().await;

    let failures = checked.expect("migrating the check's database");
    assert!(
        failures.is_empty(),
        "{} of {} statements under {} do not prepare against the schema:\n\n{}",
        failures.len(),
        statements.len(),
        root.display(),
        failures.join("\n\n")
    );
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

/// `file:line:column: message`, with the line of the statement PostgreSQL points at (in
/// the statement as prepared, its fragments in place).
fn explain(file: &Path, sql: &str, error: &sqlx::Error) -> String {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new(""));
    let name = file.strip_prefix(workspace).unwrap_or(file).display();
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
