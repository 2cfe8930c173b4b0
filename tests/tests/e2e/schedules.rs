//! Schedules: tasks created on a clock, once per fire time whatever the number of
//! coordinators, caught up or not after downtime, skipped or cancelling on overlap.

use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use futures::StreamExt;
use serde_json::{Value, json};
use tasker_tests::TestEnv;
use uuid::Uuid;

/// A task that stays unfinished while no worker runs: the schedules' tasks here.
const NIGHTLY: &str = "namespace: clock\nname: nightly\ncontext_schema: {type: object, properties: {day: {type: string}}}\nsteps:\n  - {name: run, handler: tasker.noop}\n";

async fn create(env: &TestEnv, body: Value) -> (u16, Value) {
    let (status, body) = env.post("/v1/schedules", body).await.unwrap();
    (status.as_u16(), body)
}

/// The fires of a schedule, oldest first: (fire time, task, outcome).
async fn fires(env: &TestEnv, name: &str) -> Vec<(DateTime<Utc>, Option<Uuid>, String)> {
    sqlx::query_as(
        "SELECT fire_at, task_id, outcome FROM schedule_fires WHERE schedule = $1 ORDER BY fire_at",
    )
    .bind(name)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

/// The tasks a schedule created, by idempotency key.
async fn tasks_of(env: &TestEnv, name: &str) -> Vec<(Uuid, String, String)> {
    sqlx::query_as(
        "SELECT task_id, idempotency_key, status FROM tasks WHERE idempotency_key LIKE $1 ORDER BY idempotency_key",
    )
    .bind(format!("schedule:{name}:%"))
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn two_coordinators_fire_each_second_once_even_when_one_is_killed() {
    let env = TestEnv::start("schedule-twice").await.unwrap();
    env.register_template(NIGHTLY).await.unwrap();
    let (mut second, _) = env.start_coordinator("second", &[]).await.unwrap();
    let (status, body) = create(
        &env,
        json!({"name": "tick", "namespace": "clock", "template": "nightly", "cron": "* * * * * *",
               "context": {"day": "today"}}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["next_runs"].as_array().unwrap().len(), 5, "{body}");
    // A minute, one coordinator killed half-way.
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(30)).await;
    second.kill().await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (status, _) = env
        .patch("/v1/schedules/tick", json!({"paused": true}))
        .await
        .unwrap();
    assert_eq!(status, 200);

    // One fire per second, none twice, none missed, each with its task.
    let seconds = started.elapsed().as_secs_f64();
    let fires = fires(&env, "tick").await;
    assert!(
        (fires.len() as f64 - seconds).abs() <= 2.0,
        "{} fires in {seconds:.1} s: {fires:?}",
        fires.len()
    );
    for pair in fires.windows(2) {
        assert_eq!(
            (pair[1].0 - pair[0].0).num_milliseconds(),
            1000,
            "a second fired twice or not at all: {fires:?}"
        );
    }
    assert!(
        fires
            .iter()
            .all(|(_, task, outcome)| task.is_some() && outcome == "fired")
    );
    let tasks = tasks_of(&env, "tick").await;
    assert_eq!(tasks.len(), fires.len(), "{tasks:?}");
    let (_, body) = env.get("/v1/schedules/tick").await.unwrap();
    assert_eq!(body["paused"], true);
    assert_eq!(body["next_runs"], json!([]));
    assert_eq!(body["last_runs"].as_array().unwrap().len(), 10, "{body}");
    assert_eq!(body["last_runs"][0]["outcome"], "fired");
    let task: Uuid = body["last_runs"][0]["task_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let task = env.api.task(task).await.unwrap();
    assert_eq!(task.context, json!({"day": "today"}));

    // Deleted, its metric series go with it.
    let series = "tasker_schedule_fires_total{schedule=\"tick\"}";
    let scrape = || async {
        reqwest::get(env.metrics_url())
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert!(scrape().await.contains(series));
    let (status, _) = env.delete("/v1/schedules/tick").await.unwrap();
    assert_eq!(status, 204);
    assert!(!scrape().await.contains(series));
}

#[tokio::test]
async fn missed_windows_are_caught_up_as_each_schedule_says() {
    let env = TestEnv::start("schedule-catch-up").await.unwrap();
    env.register_template(NIGHTLY).await.unwrap();
    for catch_up in ["none", "latest", "all"] {
        let (status, body) = create(
            &env,
            json!({"name": format!("new_year_{catch_up}"), "namespace": "clock",
                   "template": "nightly", "cron": "0 0 1 1 *", "catch_up": catch_up}),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    // As if no coordinator had run for more than two years: three new years went by.
    let year = Utc::now().year();
    sqlx::query("UPDATE schedules SET next_fire_at = make_timestamptz($1, 1, 1, 0, 0, 0, 'UTC')")
        .bind(year - 2)
        .execute(&env.pool)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let due: i64 =
            sqlx::query_scalar("SELECT count(*) FROM schedules WHERE next_fire_at <= now()")
                .fetch_one(&env.pool)
                .await
                .unwrap();
        if due == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outcomes = |fires: Vec<(DateTime<Utc>, Option<Uuid>, String)>| -> Vec<String> {
        fires
            .into_iter()
            .map(|(at, _, outcome)| format!("{}:{outcome}", at.format("%Y")))
            .collect()
    };
    let (two_ago, last, this) = (year - 2, year - 1, year);
    assert_eq!(
        outcomes(fires(&env, "new_year_none").await),
        [
            format!("{two_ago}:missed"),
            format!("{last}:missed"),
            format!("{this}:missed")
        ]
    );
    assert_eq!(
        outcomes(fires(&env, "new_year_latest").await),
        [
            format!("{two_ago}:missed"),
            format!("{last}:missed"),
            format!("{this}:fired")
        ]
    );
    assert_eq!(
        outcomes(fires(&env, "new_year_all").await),
        [
            format!("{two_ago}:fired"),
            format!("{last}:fired"),
            format!("{this}:fired")
        ]
    );
    assert_eq!(tasks_of(&env, "new_year_none").await.len(), 0);
    assert_eq!(
        tasks_of(&env, "new_year_latest").await[0].1,
        format!("schedule:new_year_latest:{this}-01-01T00:00:00.000Z")
    );
    assert_eq!(tasks_of(&env, "new_year_all").await.len(), 3);
    // The next fire is the next new year.
    let (_, body) = env.get("/v1/schedules/new_year_all").await.unwrap();
    assert_eq!(
        body["next_fire_at"],
        format!("{}-01-01T00:00:00Z", this + 1),
        "{body}"
    );
}

#[tokio::test]
async fn overlap_skips_or_cancels_a_task_that_still_runs() {
    let env = TestEnv::start("schedule-overlap").await.unwrap();
    env.register_template(NIGHTLY).await.unwrap();
    let (connection, mut events) = tasker_tests::subscribe_events(&env.prefix, "schedule.*")
        .await
        .unwrap();
    for overlap in ["skip", "cancel_previous"] {
        let (status, body) = create(
            &env,
            json!({"name": overlap, "namespace": "clock", "template": "nightly",
                   "cron": "* * * * * *", "overlap": overlap}),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    tokio::time::sleep(Duration::from_millis(4500)).await;
    for name in ["skip", "cancel_previous"] {
        let (status, _) = env
            .patch(&format!("/v1/schedules/{name}"), json!({"paused": true}))
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
    // No worker runs: the first task never finishes, so the others are skipped.
    let skipped = fires(&env, "skip").await;
    assert!(skipped.len() >= 3, "{skipped:?}");
    assert_eq!(skipped[0].2, "fired");
    assert!(
        skipped[1..]
            .iter()
            .all(|(_, task, outcome)| task.is_none() && outcome == "skipped")
    );
    assert_eq!(tasks_of(&env, "skip").await.len(), 1);
    // Counted once each, after the fire committed.
    let overlaps = (skipped.len() - 1) as f64;
    let counted = tasker_tests::wait_for_metric(
        &env.metrics_url(),
        r#"tasker_schedule_skips_total{schedule="skip",reason="overlap"}"#,
        overlaps,
    )
    .await;
    assert_eq!(counted, overlaps);
    // Each fire cancels the task before it: only the last runs.
    let tasks = tasks_of(&env, "cancel_previous").await;
    assert!(tasks.len() >= 3, "{tasks:?}");
    let (last, earlier) = tasks.split_last().unwrap();
    assert!(
        earlier.iter().all(|(_, _, status)| status == "cancelled"),
        "{tasks:?}"
    );
    assert_ne!(last.2, "cancelled", "{tasks:?}");

    // Each fire is an event: `schedule.fired` with its task, `schedule.skipped` without.
    let expected = skipped.len() + tasks.len();
    let mut seen: Vec<Value> = Vec::new();
    while seen.len() < expected {
        let delivery = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {expected} events: {seen:?}", seen.len()))
            .unwrap()
            .unwrap();
        seen.push(serde_json::from_slice(&delivery.data).unwrap());
    }
    let of = |name: &str| -> Vec<(String, bool)> {
        seen.iter()
            .filter(|event| event["schedule"] == name)
            .map(|event| {
                (
                    event["event"].as_str().unwrap().to_owned(),
                    event["task_id"].is_string(),
                )
            })
            .collect()
    };
    let skip_events = of("skip");
    assert_eq!(skip_events.len(), skipped.len(), "{seen:?}");
    assert_eq!(skip_events[0], ("schedule.fired".to_owned(), true));
    assert!(
        skip_events[1..]
            .iter()
            .all(|event| *event == ("schedule.skipped".to_owned(), false)),
        "{seen:?}"
    );
    let skipped_event = seen
        .iter()
        .find(|event| event["event"] == "schedule.skipped")
        .unwrap();
    assert_eq!(skipped_event["metadata"]["outcome"], "skipped");
    assert_eq!(skipped_event["namespace"], "clock");
    assert_eq!(skipped_event["task_name"], "nightly");
    assert!(
        of("cancel_previous")
            .iter()
            .all(|(event, task)| event == "schedule.fired" && *task)
    );
    let _ = connection.close(200, "OK".into()).await;
}

/// A fire whose task was made but whose record did not commit (its coordinator died
/// between the two) is recorded as fired with that task when the schedule is next
/// reached, however late, not as missed.
#[tokio::test]
async fn a_fire_whose_task_exists_is_recorded_as_fired_however_late() {
    let env = TestEnv::start("schedule-made").await.unwrap();
    env.register_template(NIGHTLY).await.unwrap();
    let (status, body) = create(
        &env,
        json!({"name": "new_year", "namespace": "clock", "template": "nightly",
               "cron": "0 0 1 1 *", "overlap": "skip"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // The task of this year's fire, made by the coordinator that then died.
    let year = Utc::now().year();
    let (status, made) = env
        .post(
            "/v1/tasks",
            json!({"namespace": "clock", "name": "nightly",
                   "idempotency_key": format!("schedule:new_year:{year}-01-01T00:00:00.000Z")}),
        )
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 201, "{made}");
    let made: Uuid = made["task_id"].as_str().unwrap().parse().unwrap();
    sqlx::query("UPDATE schedules SET next_fire_at = make_timestamptz($1, 1, 1, 0, 0, 0, 'UTC')")
        .bind(year - 1)
        .execute(&env.pool)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while fires(&env, "new_year").await.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fires: Vec<(String, Option<Uuid>, String)> = fires(&env, "new_year")
        .await
        .into_iter()
        .map(|(at, task, outcome)| (at.format("%Y").to_string(), task, outcome))
        .collect();
    assert_eq!(
        fires,
        [
            ((year - 1).to_string(), None, "missed".to_owned()),
            (year.to_string(), Some(made), "fired".to_owned())
        ]
    );
    assert_eq!(tasks_of(&env, "new_year").await.len(), 1);
}

/// `overlap: skip` still finds its running task after more fires without a task than a
/// schedule keeps (missed while no coordinator ran, then skipped): the fires kept always
/// include the last one that created a task.
#[tokio::test]
async fn overlap_finds_the_running_task_past_a_hundred_fires_without_one() {
    let env = TestEnv::start("schedule-overlap-kept").await.unwrap();
    env.register_template(NIGHTLY).await.unwrap();
    let (status, body) = create(
        &env,
        json!({"name": "skip", "namespace": "clock", "template": "nightly",
               "cron": "* * * * * *", "overlap": "skip"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tasks_of(&env, "skip").await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "never fired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // As if the task had been created 300 s ago, and no coordinator had run for the
    // last 200 s: 200 fire times missed at once, after it.
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM schedules WHERE name = 'skip' FOR UPDATE")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("DELETE FROM schedule_fires WHERE schedule = 'skip' AND task_id IS NULL")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE schedule_fires SET fire_at = fire_at - INTERVAL '300 seconds'")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE schedules SET next_fire_at = now() - INTERVAL '200 seconds'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let fires = fires(&env, "skip").await;
        if fires
            .iter()
            .filter(|(_, _, outcome)| outcome == "missed")
            .count()
            >= 90
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{fires:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few fires later, the task still runs, and each fire skipped for it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, _) = env
        .patch("/v1/schedules/skip", json!({"paused": true}))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let tasks = tasks_of(&env, "skip").await;
    let fires = fires(&env, "skip").await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert!(
        fires.iter().any(|(_, task, _)| Some(tasks[0].0) == *task),
        "{fires:?}"
    );
    assert_eq!(fires.last().unwrap().2, "skipped", "{fires:?}");
}

#[tokio::test]
async fn schedules_are_checked_changed_and_deleted_and_come_from_template_files() {
    let env = TestEnv::start("schedule-api").await.unwrap();
    let (_, template) = env.register_template(NIGHTLY).await.unwrap();
    // Every problem named at once.
    let (status, body) = create(
        &env,
        json!({"name": "bad name!", "namespace": "clock", "template": "nowhere",
               "cron": "61 * * *", "timezone": "Mars/Olympus", "overlap": "sometimes",
               "colour": "red"}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_schedule");
    let mut paths = crate::detail_paths(&body);
    paths.sort();
    assert_eq!(
        paths,
        ["colour", "cron", "name", "overlap", "template", "timezone"],
        "{body}"
    );
    // A context the template's schema refuses.
    let (status, body) = create(
        &env,
        json!({"name": "typed", "namespace": "clock", "template": "nightly",
               "cron": "0 7 * * *", "context": {"day": 7}}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["details"][0]["path"], "context/day", "{body}");

    // Paris mornings; the name is taken once.
    let morning = json!({"name": "morning", "namespace": "clock", "template": "nightly",
                         "cron": "0 7 * * *", "timezone": "Europe/Paris"});
    let (status, body) = create(&env, morning.clone()).await;
    assert_eq!(status, 201, "{body}");
    let next: Vec<DateTime<Utc>> = serde_json::from_value(body["next_runs"].clone()).unwrap();
    assert_eq!(next.len(), 5);
    assert!(
        next.windows(2)
            .all(|w| w[1] - w[0] == chrono::TimeDelta::days(1))
    );
    let (status, _) = create(&env, morning).await;
    assert_eq!(status, 409);

    // Changed: another clock, paused, resumed.
    let (status, body) = env
        .patch(
            "/v1/schedules/morning",
            json!({"cron": "30 6 * * 1-5", "timezone": "UTC"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let first: DateTime<Utc> = serde_json::from_value(body["next_runs"][0].clone()).unwrap();
    assert_eq!(first.format("%H:%M").to_string(), "06:30");
    // Pinned to a version, then back to the newest at each fire (`null`).
    let (status, body) = env
        .patch(
            "/v1/schedules/morning",
            json!({"version": template["version"]}),
        )
        .await
        .unwrap();
    assert_eq!(
        (status.as_u16(), &body["version"]),
        (200, &template["version"]),
        "{body}"
    );
    let (status, body) = env
        .patch("/v1/schedules/morning", json!({"version": null}))
        .await
        .unwrap();
    assert_eq!(
        (status.as_u16(), &body["version"]),
        (200, &Value::Null),
        "{body}"
    );
    // A context its template's schema no longer accepts (as after a new version): the
    // schedule can still be paused, and is resumed only with a context that fits.
    sqlx::query("UPDATE schedules SET context = '{\"day\": 7}' WHERE name = 'morning'")
        .execute(&env.pool)
        .await
        .unwrap();
    let (status, body) = env
        .patch("/v1/schedules/morning", json!({"paused": true}))
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 200, "{body}");
    let (status, body) = env
        .patch("/v1/schedules/morning", json!({"paused": false}))
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 422, "{body}");
    let (status, body) = env
        .patch(
            "/v1/schedules/morning",
            json!({"paused": false, "context": {}}),
        )
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 200, "{body}");
    let (status, body) = env
        .patch(
            "/v1/schedules/morning",
            json!({"paused": true, "name": "x"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 422, "{body}");
    // A field given empty is refused, each named: it would never fire, or fail each time.
    let (status, body) = env
        .patch(
            "/v1/schedules/morning",
            json!({"cron": "", "namespace": "", "template": "", "timezone": ""}),
        )
        .await
        .unwrap();
    assert_eq!(status, 422, "{body}");
    let mut named: Vec<&str> = body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap())
        .collect();
    named.sort_unstable();
    assert_eq!(
        named,
        ["cron", "namespace", "template", "timezone"],
        "{body}"
    );

    // Two changes at once, while the schedule's row is busy: both land.
    let mut busy = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM schedules WHERE name = 'morning' FOR UPDATE")
        .execute(&mut *busy)
        .await
        .unwrap();
    let (pause, recontext) = (
        env.patch("/v1/schedules/morning", json!({"paused": true})),
        env.patch("/v1/schedules/morning", json!({"context": {"day": "mon"}})),
    );
    let release = async {
        tasker_tests::wait_for_lock_waiters(&env.pool, "schedules", 2).await;
        busy.commit().await.unwrap();
    };
    let (paused, recontexted, ()) = tokio::join!(pause, recontext, release);
    assert_eq!(paused.unwrap().0, 200);
    assert_eq!(recontexted.unwrap().0, 200);
    let (_, body) = env.get("/v1/schedules/morning").await.unwrap();
    assert_eq!(
        (body["paused"].clone(), body["context"].clone()),
        (json!(true), json!({"day": "mon"})),
        "{body}"
    );
    let (status, _) = env
        .patch(
            "/v1/schedules/morning",
            json!({"paused": false, "context": {}}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (_, body) = env
        .patch("/v1/schedules/morning", json!({"paused": true}))
        .await
        .unwrap();
    assert_eq!(
        (body["paused"].clone(), body["next_fire_at"].clone()),
        (json!(true), Value::Null)
    );
    let (_, body) = env
        .patch("/v1/schedules/morning", json!({"paused": false}))
        .await
        .unwrap();
    assert_eq!(body["next_runs"].as_array().unwrap().len(), 5, "{body}");

    // A template file's schedules.
    let with_schedule = format!(
        "{NIGHTLY}schedules:\n  - {{name: nightly_run, cron: '0 2 * * *', timezone: Europe/Paris, context: {{day: tomorrow}}}}\n"
    )
    .replace("name: nightly\n", "name: filed\n");
    let (status, body) = env.register_template(&with_schedule).await.unwrap();
    assert_eq!(status, 201, "{body}");
    let (status, body) = env.get("/v1/schedules/nightly_run").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "template");
    assert_eq!(body["template"], "filed");
    assert_eq!(body["context"], json!({"day": "tomorrow"}));
    let bad = with_schedule.replace("'0 2 * * *'", "'0 2 * *'");
    let (status, body) = env
        .register_template(&bad.replace("1.0.0", "2.0.0"))
        .await
        .unwrap();
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("schedules[0].cron"), "{body}");

    let (_, list) = env.get("/v1/schedules").await.unwrap();
    let names: Vec<&str> = list["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["morning", "nightly_run"]);
    let (status, _) = env.delete("/v1/schedules/morning").await.unwrap();
    assert_eq!(status, 204);
    let (status, body) = env.get("/v1/schedules/morning").await.unwrap();
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "schedule_not_found");
}

/// The names on a page of `GET /v1/schedules`.
fn listed(page: &Value) -> Vec<String> {
    page["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Every schedule's name, page after page of `limit`, in the namespace `filter` names
/// (`&namespace=clock`, or nothing); the pages as read.
async fn all_pages(env: &TestEnv, limit: u32, filter: &str) -> (Vec<String>, Vec<Value>) {
    let (mut names, mut pages) = (Vec::new(), Vec::new());
    let mut cursor = String::new();
    loop {
        let (status, page) = env
            .get(&format!("/v1/schedules?limit={limit}{filter}{cursor}"))
            .await
            .unwrap();
        assert_eq!(status, 200, "{page}");
        names.extend(listed(&page));
        let next = page["next_cursor"].as_str().map(str::to_owned);
        pages.push(page);
        match next {
            Some(next) => cursor = format!("&cursor={next}"),
            None => return (names, pages),
        }
    }
}

/// The list of schedules comes a page at a time, each schedule with its next fire
/// times and its last runs (what the console's and the CLI's lists show), a page cut
/// short once its contexts pass 16 MiB.
#[tokio::test]
async fn schedules_are_listed_in_pages_each_with_its_next_and_last_runs() {
    let env = TestEnv::start("schedule-pages").await.unwrap();
    env.register_template(NIGHTLY).await.unwrap();
    env.register_template(&NIGHTLY.replace("namespace: clock", "namespace: other"))
        .await
        .unwrap();
    // One fires every second; the others wait for 7 o'clock, one of them paused.
    let (status, body) = create(
        &env,
        json!({"name": "a-every-second", "namespace": "clock", "template": "nightly",
               "cron": "* * * * * *"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let mut expected = vec!["a-every-second".to_owned()];
    for n in 0..5 {
        let (namespace, name) = match n {
            0 | 1 => ("other", format!("b-other-{n}")),
            _ => ("clock", format!("c-clock-{n}")),
        };
        let (status, body) = create(
            &env,
            json!({"name": name, "namespace": namespace, "template": "nightly",
                   "cron": "0 7 * * *", "paused": n == 4}),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        expected.push(name);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while fires(&env, "a-every-second").await.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "no fires in 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (names, pages) = all_pages(&env, 2, "").await;
    assert_eq!(names, expected);
    assert_eq!(pages.len(), 3, "{pages:?}");
    let by_name = |name: &str| {
        pages
            .iter()
            .flat_map(|page| page["schedules"].as_array().unwrap())
            .find(|s| s["name"] == name)
            .unwrap()
            .clone()
    };
    let firing = by_name("a-every-second");
    let last_runs = firing["last_runs"].as_array().unwrap();
    assert!(last_runs.len() >= 2, "{firing}");
    assert_eq!(last_runs[0]["outcome"], "fired", "{firing}");
    assert!(last_runs[0]["task_id"].is_string(), "{firing}");
    assert!(last_runs[0]["status"].is_string(), "{firing}");
    assert!(
        last_runs[0]["time"].as_str() > last_runs[1]["time"].as_str(),
        "newest first: {firing}"
    );
    assert_eq!(firing["next_runs"].as_array().unwrap().len(), 5, "{firing}");
    let waiting = by_name("c-clock-2");
    assert_eq!(
        waiting["next_runs"].as_array().unwrap().len(),
        5,
        "{waiting}"
    );
    assert_eq!(waiting["last_runs"], json!([]), "{waiting}");
    assert_eq!(by_name("c-clock-4")["next_runs"], json!([]), "paused");

    // One namespace's.
    let (names, _) = all_pages(&env, 500, "&namespace=other").await;
    assert_eq!(names, ["b-other-0", "b-other-1"]);
    let (names, _) = all_pages(&env, 1, "&namespace=clock").await;
    assert_eq!(
        names,
        ["a-every-second", "c-clock-2", "c-clock-3", "c-clock-4"]
    );

    // Every bad parameter named at once.
    let (status, body) = env
        .get("/v1/schedules?limit=0&cursor=&colour=red")
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    let mut paths = crate::detail_paths(&body);
    paths.sort();
    assert_eq!(paths, ["colour", "cursor", "limit"], "{body}");

    // Contexts of about 900 KB: 18 fit in one page's 16 MiB, the rest come next.
    let pad = "x".repeat(900_000);
    env.register_template(
        "namespace: big\nname: padded\nsteps:\n  - {name: run, handler: tasker.noop}\n",
    )
    .await
    .unwrap();
    let mut padded = Vec::new();
    for n in 0..20 {
        let name = format!("padded-{n:02}");
        let (status, body) = create(
            &env,
            json!({"name": name, "namespace": "big", "template": "padded",
                   "cron": "0 7 * * *", "context": {"pad": pad}}),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        padded.push(name);
    }
    let (names, pages) = all_pages(&env, 500, "&namespace=big").await;
    assert_eq!(names, padded);
    assert_eq!(
        listed(&pages[0]).len(),
        18,
        "the first page is cut at 16 MiB"
    );
    assert_eq!(pages[0]["schedules"][17]["context"]["pad"], pad.as_str());
    env.finish().await.unwrap();
}

/// A schedule's series go from a coordinator that fired it once it is deleted through
/// another: schedules made and deleted by the thousand must not grow `/metrics`.
#[tokio::test]
async fn a_deleted_schedules_series_go_from_the_coordinator_that_fired_it() {
    let gauges = [("TASKER_GAUGE_INTERVAL_MS", "200")];
    let env = TestEnv::start_with(
        "schedule-series",
        tasker_tests::EnvOptions {
            coordinator_env: gauges
                .map(|(name, value)| (name.into(), value.into()))
                .to_vec(),
            ..tasker_tests::EnvOptions::default()
        },
    )
    .await
    .unwrap();
    env.register_template(NIGHTLY).await.unwrap();
    let (_second, second_url) = env.start_coordinator("second", &gauges).await.unwrap();
    let (status, body) = create(
        &env,
        json!({"name": "shared-tick", "namespace": "clock", "template": "nightly", "cron": "* * * * * *"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let series = "tasker_schedule_fires_total{schedule=\"shared-tick\"}";
    let scrape = |url: String| async move {
        reqwest::get(format!("{url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    // A coordinator that fired it; the schedule is deleted through the other.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (fired_on, other) = loop {
        if scrape(second_url.clone()).await.contains(series) {
            break (second_url.clone(), env.base_url.clone());
        }
        if scrape(env.base_url.clone()).await.contains(series) {
            break (env.base_url.clone(), second_url.clone());
        }
        assert!(tokio::time::Instant::now() < deadline, "it never fired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let deleted = env
        .http
        .delete(format!("{other}/v1/schedules/shared-tick"))
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while scrape(fired_on.clone()).await.contains(series) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the series stayed on a coordinator"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.finish().await.unwrap();
}
