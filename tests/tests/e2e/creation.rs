//! Task creations written in batches (`tasks::create_many`, migration 0009): a batch writes
//! what creating each task alone writes, idempotency keys hold inside a batch, and a
//! refused batch writes nothing.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;
use tasker_shared::store::tasks::{self, Created, Creation, NewTask};
use tasker_shared::store::templates::{Resolved, TemplateCache};
use tasker_tests::{TestEnv, metric};
use uuid::Uuid;

const DIAMOND: &str = "namespace: batch\nname: diamond\nversion: 1.0.0\nsteps:
  - name: a\n    handler: tasker.noop\n    config: {n: 1}
  - name: b\n    handler: tasker.noop\n    depends_on: [a]\n    retry_limit: 5\n    backoff: {schedule: [1, 2]}
  - name: c\n    handler: tasker.noop\n    depends_on: [a]
  - name: d\n    handler: tasker.noop\n    depends_on: [b, c]\n";

fn new_task(key: Option<&str>, n: i64) -> Arc<NewTask> {
    Arc::new(NewTask {
        context: json!({"n": n}),
        initiator: Some("batch-test".into()),
        tags: json!(["t"]),
        idempotency_key: key.map(str::to_owned),
        ..NewTask::default()
    })
}

fn task_id(created: &Created) -> Uuid {
    match created {
        Created::New(task, _, _) | Created::Existing(task) => task.task_id,
        Created::TemplateChanged => panic!("refused as stale"),
    }
}

/// The diamond template's newest version, as a coordinator resolves it.
async fn diamond(pool: &PgPool) -> Resolved {
    TemplateCache::default()
        .resolve(pool, "batch", "diamond", None)
        .await
        .unwrap()
        .unwrap()
}

/// Everything a creation wrote for one task, without its ids and times: the task row,
/// its steps, its edges (by step name) and both histories.
async fn written(pool: &PgPool, task_id: Uuid) -> Value {
    sqlx::query_scalar(
        r#"
        SELECT jsonb_build_object(
            'task', (SELECT to_jsonb(t) - 'task_id' - 'created_at' - 'updated_at'
                     FROM tasks t WHERE task_id = $1),
            'steps', (SELECT jsonb_agg(to_jsonb(s) - 'step_id' - 'task_id' - 'dispatch_token'
                                       - 'created_at' - 'updated_at' - 'ready_at'
                                       - 'enqueued_at' - 'lease_expires_at'
                                       ORDER BY s.position)
                      FROM steps s WHERE task_id = $1),
            'edges', (SELECT jsonb_agg(jsonb_build_array(f.name, t.name) ORDER BY f.name, t.name)
                      FROM step_edges e JOIN steps f ON f.step_id = e.from_step
                      JOIN steps t ON t.step_id = e.to_step WHERE e.task_id = $1),
            'step_history', (SELECT jsonb_agg(jsonb_build_array(s.name, h.from_status,
                                  h.to_status, h.reason, h.metadata - 'dispatch_token')
                                  ORDER BY h.transition_id)
                             FROM step_transitions h JOIN steps s USING (step_id)
                             WHERE h.task_id = $1),
            'task_history', (SELECT jsonb_agg(jsonb_build_array(h.from_status, h.to_status,
                                  h.reason) ORDER BY h.transition_id)
                             FROM task_transitions h WHERE h.task_id = $1),
            'ready_at_set', (SELECT jsonb_agg(ready_at IS NOT NULL ORDER BY position)
                             FROM steps WHERE task_id = $1),
            'leased', (SELECT jsonb_agg(lease_expires_at IS NOT NULL
                                        AND dispatch_token IS NOT NULL ORDER BY position)
                       FROM steps WHERE task_id = $1)
        )
        "#,
    )
    .bind(task_id)
    .fetch_one(pool)
    .await
    .expect("written rows")
}

#[tokio::test]
async fn a_batch_writes_what_each_creation_writes_alone() {
    let env = TestEnv::start("create-batch").await.unwrap();
    let (status, _) = env.register_template(DIAMOND).await.unwrap();
    assert_eq!(status, 201);
    let resolved = diamond(&env.pool).await;
    let creation = |new: Arc<NewTask>, claim: Option<i64>| {
        Creation::new(
            resolved.template.clone(),
            new,
            claim,
            resolved.versions_known,
        )
        .unwrap()
    };

    // Alone, claimed and not; then the same four in one batch, with a second use of a
    // key the batch itself takes and one of a key taken before.
    let alone_claimed = tasks::create(&env.pool, &creation(new_task(None, 1), Some(30_000)))
        .await
        .unwrap();
    let alone_pending = tasks::create(&env.pool, &creation(new_task(Some("before"), 2), None))
        .await
        .unwrap();
    let batch = [
        creation(new_task(None, 1), Some(30_000)),
        creation(new_task(Some("k"), 2), None),
        creation(new_task(Some("k"), 2), None),
        creation(new_task(Some("before"), 2), None),
    ];
    let outcomes: Vec<Created> = tasks::create_many(&env.pool, &batch)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();

    let Created::New(task, steps, dispatches) = &outcomes[0] else {
        panic!("{:?}", outcomes[0]);
    };
    assert_eq!(task.status.to_string(), "in_progress");
    assert_eq!(steps.len(), 4);
    assert_eq!(dispatches.len(), 1, "the one root step is claimed");
    assert_eq!(dispatches[0].message.step_name, "a");
    assert!(matches!(outcomes[1], Created::New(..)));
    assert!(
        matches!(&outcomes[2], Created::Existing(task) if task.task_id == task_id(&outcomes[1])),
        "the key's second use in the batch finds its first: {:?}",
        outcomes[2]
    );
    assert!(
        matches!(&outcomes[3], Created::Existing(task) if task.task_id == task_id(&alone_pending)),
        "{:?}",
        outcomes[3]
    );

    let batched_claimed = written(&env.pool, task_id(&outcomes[0])).await;
    assert_eq!(
        batched_claimed,
        written(&env.pool, task_id(&alone_claimed)).await
    );
    let mut batched_pending = written(&env.pool, task_id(&outcomes[1])).await;
    assert_eq!(batched_pending["task"]["idempotency_key"], "k");
    batched_pending["task"]["idempotency_key"] = json!("before");
    assert_eq!(
        batched_pending,
        written(&env.pool, task_id(&alone_pending)).await
    );
    assert_eq!(batched_claimed["edges"].as_array().unwrap().len(), 4);
    assert_eq!(batched_pending["task"]["status"], "pending");

    let count = crate::task_count(&env.pool).await;
    assert_eq!(count, 4);
    env.finish().await.unwrap();
}

#[tokio::test]
async fn a_batch_is_refused_whole_when_a_template_gained_a_version() {
    let env = TestEnv::start("create-batch-stale").await.unwrap();
    env.register_template(DIAMOND).await.unwrap();
    let resolved = diamond(&env.pool).await;
    let (status, _) = env
        .register_template(&DIAMOND.replace("1.0.0", "2.0.0"))
        .await
        .unwrap();
    assert_eq!(status, 201);

    let batch = [
        Creation::new(resolved.template.clone(), new_task(None, 1), None, None).unwrap(),
        Creation::new(
            resolved.template.clone(),
            new_task(None, 2),
            None,
            resolved.versions_known,
        )
        .unwrap(),
    ];
    let error = tasks::create_many(&env.pool, &batch).await.unwrap_err();
    let sqlx::Error::Database(error) = error else {
        panic!("{error}");
    };
    assert_eq!(error.code().as_deref(), Some("TK001"));
    let count = crate::task_count(&env.pool).await;
    assert_eq!(count, 0, "nothing of the batch is written");

    // Alone, the checked creation is refused and the unchecked one written.
    assert!(matches!(
        tasks::create(&env.pool, &batch[1]).await.unwrap(),
        Created::TemplateChanged
    ));
    assert!(matches!(
        tasks::create(&env.pool, &batch[0]).await.unwrap(),
        Created::New(..)
    ));
    env.finish().await.unwrap();
}

/// Many creations at once through the API, as batches form under load: each key makes
/// one task, every request is answered with it, and every task runs to completion.
#[tokio::test]
async fn a_burst_of_creations_each_get_their_task() {
    let mut env = TestEnv::start("create-burst").await.unwrap();
    env.register_template(DIAMOND).await.unwrap();
    env.start_worker("burst-1", &["batch"]).await.unwrap();
    let requests = (0..120).map(|n| {
        // Every fourth request uses one of five keys.
        let key = (n % 4 == 0).then(|| format!("key-{}", n % 10));
        let env = &env;
        async move {
            let mut body =
                json!({"namespace": "batch", "name": "diamond", "context": {"n": n % 10}});
            if let Some(key) = &key {
                body["idempotency_key"] = json!(key);
                body["context"] = json!({"key": key});
            }
            let (status, task) = env.create_task(body).await.unwrap();
            assert!(status == 201 || status == 200, "{status} {task}");
            (key, status, task["task_id"].as_str().unwrap().to_owned())
        }
    });
    let answers = futures::future::join_all(requests).await;
    let metrics = format!("{}/metrics", env.base_url);
    let statements = metric(&metrics, "tasker_create_batch_size_count").await;
    let written = metric(&metrics, "tasker_create_batch_size_sum").await;
    assert_eq!(written, 120.0, "each request's creation is written once");
    assert!(
        statements < written,
        "creations that waited were written together: {statements} statements"
    );

    let mut by_key = std::collections::HashMap::<String, Vec<(u16, String)>>::new();
    let mut ids = std::collections::HashSet::new();
    for (key, status, id) in answers {
        ids.insert(id.clone());
        if let Some(key) = key {
            by_key.entry(key).or_default().push((status.as_u16(), id));
        }
    }
    for (key, answers) in &by_key {
        let first = &answers[0].1;
        assert!(
            answers.iter().all(|(_, id)| id == first),
            "{key}: {answers:?}"
        );
        let created = answers.iter().filter(|(status, _)| *status == 201).count();
        assert_eq!(created, 1, "{key}: {answers:?}");
    }
    let count = crate::task_count(&env.pool).await;
    assert_eq!(count as usize, ids.len());
    assert_eq!(ids.len(), 90 + by_key.len());

    for id in &ids {
        let task = env
            .wait_for_task(id, &["complete", "error"], Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(task["status"], "complete", "{task}");
    }
    env.finish().await.unwrap();
}

/// One batch is written at a time, but a batch waiting on a lock holds up the others only
/// briefly: while another transaction holds an idempotency key's index entry, a creation
/// with that key waits for it, and creations without it are answered meanwhile.
#[tokio::test]
async fn a_creation_waiting_on_a_lock_holds_up_the_others_only_briefly() {
    let env = TestEnv::start("create-lock-wait").await.unwrap();
    env.register_template(DIAMOND).await.unwrap();
    let template = diamond(&env.pool).await;
    // A transaction inserting a task with the key, left open.
    let mut holder = env.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO tasks (task_id, template_id, namespace, name, version, status, context,
                            idempotency_key)
         VALUES ($1, $2, 'batch', 'diamond', '1.0.0', 'pending', '{}', 'held')",
    )
    .bind(Uuid::now_v7())
    .bind(template.template.template_id)
    .execute(&mut *holder)
    .await
    .unwrap();

    let keyed = {
        let url = format!("{}/v1/tasks", env.base_url);
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .json(&json!({"namespace": "batch", "name": "diamond", "idempotency_key": "held"}))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    // Until the keyed creation waits on the lock.
    tasker_tests::wait_for_lock_waiters(&env.pool, "", 1).await;
    let others = async {
        for n in 0..3 {
            let (status, task) = env
                .create_task(json!({"namespace": "batch", "name": "diamond", "context": {"n": n}}))
                .await
                .unwrap();
            assert_eq!(status, 201, "{task}");
        }
    };
    tokio::time::timeout(Duration::from_secs(20), others)
        .await
        .expect("creations without the key were held up by the one waiting on it");
    assert!(!keyed.is_finished(), "the keyed creation still waits");

    // The key's first insert rolls back: the keyed creation writes its task.
    holder.rollback().await.unwrap();
    assert_eq!(keyed.await.unwrap(), 201);
    env.finish().await.unwrap();
}

/// A client that hangs up while its task is being written leaves the task created and
/// its first step published: what the commit claimed does not wait, unpublished, for its
/// lease to run out (a minute) because the request that asked for it went away.
#[tokio::test]
async fn a_client_that_hangs_up_while_its_task_is_written_leaves_it_running() {
    use sqlx::Connection;
    use tokio::io::AsyncWriteExt;
    let mut env = TestEnv::start("creation-gone").await.unwrap();
    env.register_template(
        "namespace: gone\nname: one\nsteps:\n  - {name: a, handler: tasker.noop}\n",
    )
    .await
    .unwrap();
    env.start_worker("gone", &["gone"]).await.unwrap();

    // Creations wait for this lock while the client hangs up.
    let mut holder = sqlx::PgConnection::connect(&env.database_url)
        .await
        .unwrap();
    let mut lock = holder.begin().await.unwrap();
    sqlx::query("LOCK TABLE tasks IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let address = env.base_url.trim_start_matches("http://").to_owned();
    let mut client = tokio::net::TcpStream::connect(&address).await.unwrap();
    let body = json!({"namespace": "gone", "name": "one"}).to_string();
    let request = format!(
        "POST /v1/tasks HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    client.write_all(request.as_bytes()).await.unwrap();
    tasker_tests::wait_for_lock_waiters(&env.pool, "tasker_create_tasks", 1).await;
    drop(client);
    // Time for the coordinator to notice the hang-up (and drop the request's work).
    tokio::time::sleep(Duration::from_millis(500)).await;
    lock.commit().await.unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM tasks")
            .fetch_optional(&env.pool)
            .await
            .unwrap();
        if status.as_deref() == Some("complete") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the task is {status:?} 15 s after its creation committed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.finish().await.unwrap();
}
