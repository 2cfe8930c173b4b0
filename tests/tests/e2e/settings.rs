//! Settings out of their range stop a process at start, naming the variable: a batch size
//! of 0 would claim nothing for ever in a loop that never sleeps, an interval of 0 would
//! query without pause, a concurrency of 0 would run nothing.

use tasker_tests::{binary, coordinator_refusing_to_start, worker_refusing_to_start};

/// What a refusal names: the variable the bad value came from, and the range it broke.
fn names(stderr: &str, variable: &str, range: &str) {
    assert!(
        stderr.contains(&format!("environment variable {variable}")) && stderr.contains(range),
        "{variable}: {stderr}"
    );
}

#[tokio::test]
async fn settings_out_of_range_stop_the_process_naming_the_variable() {
    // Nothing listens here: a coordinator that got past its settings would fail later,
    // on the database, with another message.
    let nowhere = "postgres://nobody@127.0.0.1:1/none";
    for (variable, value, range) in [
        ("TASKER_BATCH_SIZE", "0", "1..=4096"),
        ("TASKER_BATCH_SIZE", "-5", "1..=4096"),
        ("TASKER_SWEEP_INTERVAL_MS", "0", "10.."),
        ("TASKER_POLL_INTERVAL_MS", "5", "10.."),
        ("TASKER_DISPATCH_LEASE_MS", "0", "1000.."),
        ("TASKER_DB_POOL_SIZE", "1", "2.."),
        (
            "TASKER_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS",
            "0",
            "1000..=86400000",
        ),
        ("TASKER_DB_ANSWER_TIMEOUT_MS", "999", "1000..=3600000"),
    ] {
        let stderr = coordinator_refusing_to_start(nowhere, &[(variable, value)]).await;
        names(&stderr, variable, range);
    }
    let stderr = coordinator_refusing_to_start(nowhere, &[("TASKER_HTTP_ADDR", "nowhere")]).await;
    names(&stderr, "TASKER_HTTP_ADDR", "nowhere");
    let stderr = worker_refusing_to_start(&[("TASKER_CONCURRENCY", "0")]).await;
    names(&stderr, "TASKER_CONCURRENCY", "1..");

    // A flag on the command line is named as the flag, not as the variable.
    let output = tokio::process::Command::new(binary("tasker-coordinator"))
        .args(["serve", "--batch-size", "0"])
        .env("TASKER_BATCH_SIZE", "0")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("'--batch-size <BATCH_SIZE>'"), "{stderr}");
    assert!(!stderr.contains("environment variable"), "{stderr}");
}

/// Run `sql` on `connection`.
async fn run(connection: &mut sqlx::PgConnection, sql: String) {
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(connection)
        .await
        .unwrap();
}

/// A role allowed to connect to its own database only (no CONNECT on `postgres` or
/// `template1`, as with a `pg_hba.conf` or a pooler that knows one database) migrates it:
/// whether the database exists is asked of the database itself.
#[tokio::test]
async fn a_role_confined_to_its_own_database_migrates_it() {
    use sqlx::{Connection, PgConnection};
    let server = tasker_tests::postgres_server();
    let mut admin = PgConnection::connect(&format!("{server}/postgres"))
        .await
        .unwrap();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (role, database) = (
        format!("tasker_confined_{}", &id[..12]),
        format!("tasker_test_confined_{}", &id[..12]),
    );
    run(&mut admin, format!("CREATE ROLE {role} LOGIN")).await;
    run(
        &mut admin,
        format!("CREATE DATABASE {database} OWNER {role}"),
    )
    .await;
    // Every role but superusers loses CONNECT on the maintenance databases while the
    // migration runs (the tests connect as a superuser, so nothing else notices), and
    // gets back exactly what it had: on a server where PUBLIC had none, nothing changes.
    let mut revoked = Vec::new();
    for maintenance in ["postgres", "template1"] {
        let granted: bool =
            sqlx::query_scalar("SELECT has_database_privilege('public', $1, 'CONNECT')")
                .bind(maintenance)
                .fetch_one(&mut admin)
                .await
                .unwrap();
        if granted {
            run(
                &mut admin,
                format!("REVOKE CONNECT ON DATABASE {maintenance} FROM PUBLIC"),
            )
            .await;
            revoked.push(maintenance);
        }
    }
    let url = format!(
        "{}/{database}",
        server.replacen("://postgres@", &format!("://{role}@"), 1)
    );
    let output = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::process::Command::new(binary("tasker-coordinator"))
            .arg("migrate")
            .env("DATABASE_URL", &url)
            .kill_on_drop(true)
            .output(),
    )
    .await;
    for maintenance in revoked {
        run(
            &mut admin,
            format!("GRANT CONNECT ON DATABASE {maintenance} TO PUBLIC"),
        )
        .await;
    }
    let output = output.expect("migrate finishes").unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let migrated: Option<i64> = if output.status.success() {
        let mut own = PgConnection::connect(&url).await.unwrap();
        let count = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(&mut own)
            .await
            .unwrap();
        own.close().await.unwrap();
        Some(count)
    } else {
        None
    };
    run(&mut admin, format!("DROP DATABASE {database} WITH (FORCE)")).await;
    run(&mut admin, format!("DROP ROLE {role}")).await;
    assert!(output.status.success(), "migrate failed: {stderr}");
    assert!(migrated.unwrap() >= 26, "{stderr}");
}
