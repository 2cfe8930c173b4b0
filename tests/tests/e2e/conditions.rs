//! Steps that do not run: a `when` condition that is false, and a creation's
//! `bypass_steps`. Skipped steps count as done for their dependents and their task.

use std::time::Duration;

use serde_json::{Value, json};
use tasker_tests::{StepStatus, TaskStatus, TestEnv};

const ONBOARD: &str = r#"namespace: branch
name: onboard
steps:
  - name: lookup
    handler: tasker.echo
  - name: kyc
    handler: tasker.echo
    depends_on: [lookup]
    when: "!parents.lookup.context.existing"
  - name: welcome
    handler: tasker.echo
    depends_on: [kyc]
  - name: vip
    handler: tasker.noop
    when: "context.tier == 'gold' && task.priority >= 5"
"#;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_false_condition_skips_its_step_and_its_dependents_go_on() {
    let mut env = TestEnv::start("conditions-when").await.unwrap();
    let (status, body) = env.register_template(ONBOARD).await.unwrap();
    assert_eq!(status, 201, "{body}");
    let (_connection, mut events) = tasker_tests::subscribe_events(&env.prefix, "step.skipped")
        .await
        .unwrap();
    env.start_worker("branch", &["branch"]).await.unwrap();

    // An existing customer: no KYC, no VIP; the welcome runs without KYC's results.
    let task = env
        .api
        .create_task(&json!({"namespace": "branch", "name": "onboard",
                             "context": {"existing": true, "tier": "silver"}}))
        .await
        .unwrap();
    assert_eq!(
        task.step("vip").status,
        StepStatus::Skipped,
        "judged at creation"
    );
    let done = env
        .api
        .wait_for_task(
            task.task_id,
            &[TaskStatus::Complete, TaskStatus::Error],
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Complete);
    assert_eq!(done.step("kyc").status, StepStatus::Skipped);
    assert_eq!(done.step("welcome").status, StepStatus::Complete);
    let parents = &done.step("welcome").results.as_ref().unwrap()["parents"];
    assert_eq!(parents, &json!({}), "a skipped parent is absent");
    let execution = done.execution.as_ref().unwrap();
    assert_eq!(execution["skipped_steps"], 2, "{execution}");
    assert_eq!(execution["completion_percentage"], 100.0, "{execution}");

    let history = crate::step_history(&env.pool, task.task_id).await;
    let reasons: Vec<(&str, &str)> = history
        .iter()
        .filter(|(step, ..)| step == "kyc" || step == "vip")
        .map(|(step, _, _, reason, _)| (step.as_str(), reason.as_str()))
        .collect();
    assert_eq!(
        reasons,
        [("vip", "condition_false"), ("kyc", "condition_false")]
    );
    let readiness: Value = env
        .http
        .get(format!(
            "{}/v1/tasks/{}/readiness",
            env.base_url, task.task_id
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(readiness["steps"][1]["reason"], "skipped", "{readiness}");
    let mut skipped = Vec::new();
    for _ in 0..2 {
        let delivery = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut events))
            .await
            .expect("a step.skipped event")
            .unwrap()
            .unwrap();
        let event: Value = serde_json::from_slice(&delivery.data).unwrap();
        skipped.push(event["step_name"].as_str().unwrap().to_owned());
    }
    skipped.sort();
    assert_eq!(skipped, ["kyc", "vip"]);

    // A new gold customer: everything runs, and the welcome sees KYC's results.
    let task = env
        .api
        .create_task(&json!({"namespace": "branch", "name": "onboard",
                             "context": {"existing": false, "tier": "gold"}}))
        .await
        .unwrap();
    let done = env
        .api
        .wait_for_task(
            task.task_id,
            &[TaskStatus::Complete, TaskStatus::Error],
            WAIT,
        )
        .await
        .unwrap();
    for step in ["lookup", "kyc", "welcome", "vip"] {
        assert_eq!(done.step(step).status, StepStatus::Complete, "{step}");
    }
    let parents = &done.step("welcome").results.as_ref().unwrap()["parents"];
    assert!(parents.get("kyc").is_some(), "{parents}");
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_condition_that_fails_fails_its_step_and_bad_ones_are_refused() {
    let mut env = TestEnv::start("conditions-bad").await.unwrap();
    // Not compiling, or naming another variable: refused at registration.
    let (status, body) = env
        .register_template("namespace: branch\nname: bad\nsteps:\n  - {name: a, handler: tasker.noop, when: \"context.x ==\"}\n  - {name: b, handler: tasker.noop, when: \"item.x\"}\n")
        .await
        .unwrap();
    assert_eq!(status, 422, "{body}");
    let details = body["error"]["details"].as_array().unwrap();
    let paths: Vec<(&str, &str)> = details
        .iter()
        .map(|d| (d["path"].as_str().unwrap(), d["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        paths,
        [
            ("steps[0].when", "invalid_expression"),
            ("steps[1].when", "invalid_expression")
        ]
    );
    assert!(
        details[1]["message"].as_str().unwrap().contains("step `b`"),
        "{body}"
    );

    let (status, body) = env
        .register_template("namespace: branch\nname: fragile\nsteps:\n  - {name: first, handler: tasker.echo, when: \"context.go\"}\n  - {name: second, handler: tasker.noop, depends_on: [first], when: \"parents.first.context.missing.deep == 1\"}\n")
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    // A first step's condition is judged at creation: one that fails is a 422.
    let (status, body) = env
        .create_task(json!({"namespace": "branch", "name": "fragile", "context": {}}))
        .await
        .unwrap();
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_condition");
    assert_eq!(body["error"]["details"][0]["path"], "steps[0].when");
    assert_eq!(crate::task_count(&env.pool).await, 0);

    // A later step's condition that fails at run time fails the step for good.
    env.start_worker("branch", &["branch"]).await.unwrap();
    let task = env
        .api
        .create_task(&json!({"namespace": "branch", "name": "fragile", "context": {"go": true}}))
        .await
        .unwrap();
    let done = env
        .api
        .wait_for_task(
            task.task_id,
            &[TaskStatus::Complete, TaskStatus::Error],
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Error);
    let second = done.step("second");
    assert_eq!(second.status, StepStatus::Error);
    let error = second.last_error.as_ref().unwrap();
    assert_eq!(error.code.as_deref(), Some("expression_error"));
    assert_eq!(error.kind, "permanent");
    assert!(
        error.message.contains("parents.first.context.missing"),
        "{error:?}"
    );
    assert_eq!(second.attempts, 0, "it never ran");

    // A retry judges the condition again, and it fails again: the parent's results are
    // the same. The step still never runs.
    let response = env
        .http
        .post(format!("{}/v1/tasks/{}/retry", env.base_url, task.task_id))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let again = env
        .api
        .wait_for_task(task.task_id, &[TaskStatus::Error], WAIT)
        .await
        .unwrap();
    assert_eq!(again.step("second").attempts, 0);
    let failures = crate::step_history(&env.pool, task.task_id)
        .await
        .into_iter()
        .filter(|(step, _, to, reason, _)| step == "second" && to == "error" && reason == "failed")
        .count();
    assert_eq!(failures, 2, "judged twice");
    env.finish().await.unwrap();
}

#[tokio::test]
async fn bypassed_steps_are_skipped_and_only_skippable_ones_may_be() {
    let mut env = TestEnv::start("conditions-bypass").await.unwrap();
    let (status, body) = env
        .register_template("namespace: branch\nname: ship\nsteps:\n  - {name: pack, handler: tasker.noop, skippable: true}\n  - {name: label, handler: tasker.noop, skippable: true}\n  - {name: send, handler: tasker.echo, depends_on: [pack, label]}\n")
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    env.start_worker("branch", &["branch"]).await.unwrap();

    let task = env
        .api
        .create_task(&json!({"namespace": "branch", "name": "ship", "bypass_steps": ["pack"]}))
        .await
        .unwrap();
    assert_eq!(task.step("pack").status, StepStatus::Skipped);
    let done = env
        .api
        .wait_for_task(
            task.task_id,
            &[TaskStatus::Complete, TaskStatus::Error],
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Complete);
    assert_eq!(done.step("pack").status, StepStatus::Skipped);
    assert_eq!(done.step("label").status, StepStatus::Complete);
    let parents = &done.step("send").results.as_ref().unwrap()["parents"];
    assert_eq!(parents.as_object().unwrap().len(), 1, "{parents}");
    let history = crate::step_history(&env.pool, task.task_id).await;
    assert!(
        history.iter().any(|(step, _, to, reason, _)| step == "pack"
            && to == "skipped"
            && reason == "bypassed"),
        "{history:?}"
    );

    let (status, body) = env
        .create_task(json!({"namespace": "branch", "name": "ship",
                            "bypass_steps": ["send", "nope", 3]}))
        .await
        .unwrap();
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    let paths = crate::detail_paths(&body);
    assert_eq!(
        paths,
        ["bypass_steps[2]"],
        "a wrong type is a field problem first"
    );
    let (status, body) = env
        .create_task(json!({"namespace": "branch", "name": "ship",
                            "bypass_steps": ["send", "nope"]}))
        .await
        .unwrap();
    assert_eq!(status, 422, "{body}");
    let details = crate::problems(&body);
    assert_eq!(
        details,
        [
            ("bypass_steps[0]", "not_skippable"),
            ("bypass_steps[1]", "unknown_step")
        ]
    );

    // Every step bypassed (the last one made skippable in a new version): complete at once.
    let (status, body) = env
        .register_template("namespace: branch\nname: ship\nversion: 2.0.0\nsteps:\n  - {name: pack, handler: tasker.noop, skippable: true}\n")
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let task = env
        .api
        .create_task(&json!({"namespace": "branch", "name": "ship", "bypass_steps": ["pack"]}))
        .await
        .unwrap();
    assert_eq!(task.status, TaskStatus::Complete);
    let stored = env.api.task(task.task_id).await.unwrap();
    assert_eq!(stored.status, TaskStatus::Complete);
    assert_eq!(
        crate::task_history(&env.pool, task.task_id).await,
        ["created", "all_steps_done"]
    );
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_condition_after_an_operator_resolves_a_parent_is_judged_by_the_dispatcher() {
    let mut env = TestEnv::start("conditions-resolve").await.unwrap();
    let (status, body) = env
        .register_template("namespace: branch\nname: gate\nsteps:\n  - {name: a, handler: tasker.fail, retryable: false, config: {times: 9, kind: permanent}}\n  - {name: b, handler: tasker.noop, depends_on: [a], when: \"parents.a.ok\"}\n")
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    env.start_worker("branch", &["branch"]).await.unwrap();
    for (ok, b_status) in [(true, StepStatus::Complete), (false, StepStatus::Skipped)] {
        let task = env
            .api
            .create_task(&json!({"namespace": "branch", "name": "gate"}))
            .await
            .unwrap();
        env.api
            .wait_for_task(task.task_id, &[TaskStatus::Error], WAIT)
            .await
            .unwrap();
        // The parent's failure resolved by hand with results: the task runs on, and the
        // dispatcher claims the child, whose condition it judges first.
        let response = env
            .http
            .post(format!(
                "{}/v1/tasks/{}/steps/a/resolve",
                env.base_url, task.task_id
            ))
            .json(&json!({"results": {"ok": ok}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let done = env
            .api
            .wait_for_task(task.task_id, &[TaskStatus::Complete], WAIT)
            .await
            .unwrap();
        assert_eq!(done.step("b").status, b_status, "ok = {ok}");
    }
    env.finish().await.unwrap();
}

#[tokio::test]
async fn an_expression_that_does_too_much_work_fails_and_the_coordinator_goes_on() {
    let mut env = TestEnv::start("conditions-costly").await.unwrap();
    let (status, body) = env
        .register_template(concat!(
            "namespace: branch\nname: dedupe\nsteps:\n",
            "  - {name: load, handler: tasker.echo}\n",
            // Each item against every other: 400 million comparisons for 20,000 items.
            "  - {name: check, handler: tasker.noop, depends_on: [load], ",
            "when: \"context.items.all(a, context.items.exists_one(b, a.id == b.id))\"}\n",
            "  - {name: each, handler: tasker.echo, depends_on: [load], ",
            "for_each: \"context.items.filter(i, i.id < 3).map(i, i.id)\"}\n",
        ))
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let (status, body) = env
        .register_template(concat!(
            "namespace: branch\nname: keyed\nsteps:\n",
            "  - {name: a, handler: tasker.noop, ",
            "concurrency: {key: \"string(context.items.map(i, context.items).size())\", limit: 1}}\n",
        ))
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    env.start_worker("branch", &["branch"]).await.unwrap();

    let items: Vec<Value> = (0..20_000).map(|id| json!({"id": id})).collect();
    let large = json!({"items": items});
    let costly = env
        .api
        .create_task(&json!({"namespace": "branch", "name": "dedupe", "context": large}))
        .await
        .unwrap();
    // A limit key is evaluated at creation: one that does too much refuses it.
    let (status, body) = env
        .create_task(json!({"namespace": "branch", "name": "keyed", "context": large}))
        .await
        .unwrap();
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_limit_key", "{body}");
    assert!(
        body["error"]["details"][0]["message"]
            .as_str()
            .unwrap()
            .contains("did more work than an expression may"),
        "{body}"
    );

    let done = env
        .api
        .wait_for_task(
            costly.task_id,
            &[TaskStatus::Complete, TaskStatus::Error],
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Error);
    let check = done.step("check");
    assert_eq!(check.status, StepStatus::Error);
    assert_eq!(check.attempts, 0, "it never ran");
    let error = check.last_error.as_ref().unwrap();
    assert_eq!(error.code.as_deref(), Some("expression_error"));
    assert!(
        error
            .message
            .contains("did more work than an expression may"),
        "{error:?}"
    );
    // The macros beside it ran in full: three instances, one per id below 3.
    assert_eq!(done.step("each").status, StepStatus::Complete);
    for n in 0..3 {
        let results = done.step(&format!("each[{n}]")).results.as_ref().unwrap();
        assert_eq!(
            (&results["item"], &results["index"]),
            (&json!(n), &json!(n))
        );
    }

    // The same template over a small context completes: the check runs and passes.
    let small = env
        .api
        .create_task(&json!({"namespace": "branch", "name": "dedupe",
            "context": {"items": [{"id": 0}, {"id": 1}, {"id": 2}]}}))
        .await
        .unwrap();
    let done = env
        .api
        .wait_for_task(
            small.task_id,
            &[TaskStatus::Complete, TaskStatus::Error],
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Complete);
    assert_eq!(done.step("check").status, StepStatus::Complete);
    env.finish().await.unwrap();
}
