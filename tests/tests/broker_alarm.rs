//! A RabbitMQ memory alarm: the broker stops reading from every connection that
//! publishes, so a worker's results and heartbeats and the coordinator's step messages
//! wait in their clients until the alarm clears. Nothing may run twice for it: no lease
//! expires while the broker takes nothing, nor right after, before the confirms of what
//! was published meanwhile are in; no publish is given up on while it is blocked (the
//! broker takes it in once the alarm clears, after its work was handed back).
//!
//! The alarm is the machine broker's (`rabbitmqctl set_vm_memory_high_watermark`), so
//! this is a test binary of its own (cargo runs test binaries one after another), run by
//! `deploy/test.sh` like the others. The watermark is set back even when the test fails.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tasker_tests::{EnvOptions, StepStatus, TaskStatus, TestEnv, binary};

/// Longer than a publisher confirm may take before a publish counts as failed (30 s),
/// and than many heartbeat leases of the coordinator below.
const ALARM: Duration = Duration::from_secs(35);

#[tokio::test]
async fn a_memory_alarm_delays_steps_without_running_any_twice() {
    let options = EnvOptions {
        // Leases that would expire many times over during the alarm: a running step's,
        // and a claimed step's whose publish waits for the alarm to clear.
        coordinator_env: vec![
            ("TASKER_HEARTBEAT_LEASE_MS".into(), "3000".into()),
            ("TASKER_DISPATCH_LEASE_MS".into(), "5000".into()),
            ("TASKER_SWEEP_INTERVAL_MS".into(), "500".into()),
        ],
        ..EnvOptions::default()
    };
    let mut env = TestEnv::start_with("alarm", options).await.unwrap();
    let pair = "name: pair\nsteps:\n  - {name: slow, handler: tasker.sleep, config: {ms: 2000}}\n  - {name: after, handler: tasker.noop, depends_on: [slow]}\n";
    // `waiting` has no worker until after the alarm: its claimed step stays queued, its
    // dispatch lease long past, while the confirm of its publish comes in.
    env.register_templates(&[
        &format!("namespace: alarm\n{pair}"),
        &format!("namespace: waiting\n{pair}"),
    ])
    .await;
    env.start_worker_with(
        binary("tasker-worker"),
        "w",
        &["alarm"],
        8,
        &[("TASKER_HEARTBEAT_INTERVAL_MS", "1000")],
    )
    .await
    .unwrap();
    let pair = json!({"namespace": "alarm", "name": "pair"});
    let running = env.api.create_task(&pair).await.unwrap().task_id;
    env.api
        .wait_until(
            running,
            "its first step running",
            Duration::from_secs(30),
            |task| task.step("slow").status == StepStatus::InProgress,
        )
        .await
        .unwrap();

    let alarm = Alarm::raise();
    // The running step finishes during the alarm; tasks created during it are claimed
    // and wait to be published.
    let created = env.api.create_task(&pair).await.unwrap().task_id;
    let queued = env
        .api
        .create_task(&json!({"namespace": "waiting", "name": "pair"}))
        .await
        .unwrap()
        .task_id;
    tokio::time::sleep(ALARM).await;
    drop(alarm);
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.start_worker_with(binary("tasker-worker"), "late", &["waiting"], 8, &[])
        .await
        .unwrap();

    for task in [running, created, queued] {
        let done = env
            .api
            .wait_for_task(task, &[TaskStatus::Complete], Duration::from_secs(60))
            .await
            .unwrap();
        for step in &done.steps {
            assert_eq!(step.attempts, 1, "{task} {}: {done:#?}", step.name);
        }
    }
    let (expired,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM step_transitions WHERE reason IN ('lease_expired', 'lease_lost')",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(expired, 0, "leases expired during the alarm");
    let metrics = env.http.get(env.metrics_url()).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics.contains("tasker_stale_results_dropped_total 0\n"),
        "a step ran twice: {}",
        metrics
            .lines()
            .find(|line| line.starts_with("tasker_stale_results_dropped_total"))
            .unwrap_or("no stale results counter")
    );
    env.finish().await.unwrap();
}

/// The broker's memory alarm, raised until dropped: the watermark is set to one byte,
/// then back to what it was.
struct Alarm {
    watermark: Vec<String>,
}

impl Alarm {
    fn raise() -> Self {
        let was = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        let was = was.trim();
        // A fraction of the machine's memory (`0.4`), or `{absolute,Bytes}`.
        let watermark = match was
            .strip_prefix("{absolute,")
            .and_then(|bytes| bytes.strip_suffix('}'))
        {
            Some(bytes) => vec!["absolute".to_owned(), bytes.to_owned()],
            None if was.parse::<f64>().is_ok() => vec![was.to_owned()],
            None => panic!("unexpected memory watermark `{was}`"),
        };
        rabbitmqctl(&["set_vm_memory_high_watermark", "absolute", "1"]);
        Alarm { watermark }
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        let mut args = vec!["set_vm_memory_high_watermark"];
        args.extend(self.watermark.iter().map(String::as_str));
        rabbitmqctl(&args);
    }
}

fn rabbitmqctl(args: &[&str]) -> String {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl (the broker's own tool, beside it on this machine)");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
