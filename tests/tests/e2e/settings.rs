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
        ("TASKER_SWEEP_INTERVAL_MS", "0", "100.."),
        ("TASKER_POLL_INTERVAL_MS", "10", "100.."),
        ("TASKER_DISPATCH_LEASE_MS", "0", "1000.."),
        ("TASKER_DB_POOL_SIZE", "1", "2.."),
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
