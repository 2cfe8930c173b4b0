//! `trigger`: clean-up steps (`all_done`) run whatever their parents' outcome, and
//! compensation steps (`one_failed`) only after a parent failed.

use std::time::Duration;

use serde_json::json;
use tasker_tests::{StepStatus, TaskStatus, TestEnv};

/// A small saga: reserve → charge → ship; `refund` compensates a failed shipment,
/// `release` cleans up after it either way. `ship` fails for good unless {times: 0}.
const ORDER: &str = r#"namespace: saga
name: order_bad
steps:
  - name: reserve
    handler: tasker.noop
  - name: charge
    handler: tasker.echo
    depends_on: [reserve]
  - name: ship
    handler: tasker.fail
    depends_on: [charge]
    config: {kind: permanent}
  - name: refund
    handler: tasker.echo
    depends_on: [ship]
    trigger: one_failed
  - name: release
    handler: tasker.noop
    depends_on: [ship]
    trigger: all_done
"#;

const WAIT: Duration = Duration::from_secs(60);

async fn run(env: &TestEnv, name: &str) -> tasker_tests::Task {
    let task = env
        .api
        .create_task(&json!({"namespace": "saga", "name": name}))
        .await
        .unwrap();
    crate::finished(env, task.task_id, WAIT).await
}

#[tokio::test]
async fn compensation_runs_after_a_failure_and_clean_up_either_way() {
    let mut env = TestEnv::start("triggers").await.unwrap();
    let good = ORDER
        .replace("name: order_bad", "name: order_ok")
        .replace("{kind: permanent}", "{times: 0}");
    for template in [ORDER.to_owned(), good] {
        let (status, body) = env.register_template(&template).await.unwrap();
        assert_eq!(status, 201, "{body}");
    }
    env.start_worker("w", &["saga"]).await.unwrap();

    // Shipping fails: the refund and the release run, then the task ends in error.
    let bad = run(&env, "order_bad").await;
    assert_eq!(bad.status, TaskStatus::Error);
    assert_eq!(bad.step("ship").status, StepStatus::Error);
    assert_eq!(bad.step("refund").status, StepStatus::Complete);
    assert_eq!(bad.step("release").status, StepStatus::Complete);
    assert_eq!(
        bad.step("refund").results.as_ref().unwrap()["parents"]["ship"],
        serde_json::Value::Null,
        "a failed parent's results are null"
    );

    // Shipping succeeds: no refund (skipped, and said why), the release runs.
    let ok = run(&env, "order_ok").await;
    assert_eq!(ok.status, TaskStatus::Complete);
    assert_eq!(ok.step("refund").status, StepStatus::Skipped);
    assert_eq!(ok.step("release").status, StepStatus::Complete);
    let history = crate::step_history(&env.pool, ok.task_id).await;
    assert!(
        history
            .iter()
            .any(|(step, _, to, reason, _)| step == "refund"
                && to == "skipped"
                && reason == "trigger_not_met"),
        "{history:?}"
    );

    // A retry of the failed task runs shipping again (it fails again); what already ran
    // after the first failure does not run twice.
    let (status, body) = env
        .post(&format!("/v1/tasks/{}/retry", bad.task_id), json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let again = env
        .api
        .wait_for_task(bad.task_id, &[TaskStatus::Error], WAIT)
        .await
        .unwrap();
    assert_eq!(again.step("ship").status, StepStatus::Error);
    let dispatched: Vec<(String, i64)> = sqlx::query_as(
        "SELECT s.name, count(*) FROM step_transitions t JOIN steps s USING (step_id)
         WHERE t.task_id = $1 AND t.reason = 'dispatched' GROUP BY s.name ORDER BY s.name",
    )
    .bind(bad.task_id)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        dispatched,
        [
            ("charge".to_owned(), 1),
            ("refund".to_owned(), 1),
            ("release".to_owned(), 1),
            ("reserve".to_owned(), 1),
            ("ship".to_owned(), 2),
        ]
    );
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_clean_up_step_waits_for_every_parent() {
    let mut env = TestEnv::start("triggers-all-done").await.unwrap();
    let template = r#"namespace: saga
name: two
steps:
  - name: broken
    handler: tasker.fail
    config: {kind: permanent}
  - name: slow
    handler: tasker.sleep
    config: {ms: 400}
  - name: tidy
    handler: tasker.noop
    depends_on: [broken, slow]
    trigger: all_done
"#;
    let (status, body) = env.register_template(template).await.unwrap();
    assert_eq!(status, 201, "{body}");
    env.start_worker("w", &["saga"]).await.unwrap();
    let done = run(&env, "two").await;
    assert_eq!(done.status, TaskStatus::Error);
    let tidy = done.step("tidy");
    assert_eq!(tidy.status, StepStatus::Complete);
    assert!(
        tidy.started_at.unwrap() >= done.step("slow").completed_at.unwrap(),
        "tidy ran before its slow parent finished"
    );
    env.finish().await.unwrap();
}

#[tokio::test]
async fn malformed_triggers_are_refused_at_registration() {
    let env = TestEnv::start("triggers-invalid").await.unwrap();
    let template = "namespace: saga\nname: bad\nsteps:\n  - {name: a, handler: tasker.noop, trigger: one_failed}\n  - {name: b, handler: tasker.noop, depends_on: [a], trigger: sometimes}\n";
    let (status, body) = env.register_template(template).await.unwrap();
    assert_eq!(status, 422, "{body}");
    let problems = crate::problems(&body);
    assert_eq!(
        problems,
        [
            ("steps[0].trigger", "invalid_value"),
            ("steps[1].trigger", "invalid_value")
        ],
        "{body}"
    );
    env.finish().await.unwrap();
}
