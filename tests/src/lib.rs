//! The end-to-end test harness: a coordinator, `tasker-worker` processes, the real
//! PostgreSQL and RabbitMQ, each test in its own database (a copy of one migrated once)
//! and under its own queue-name prefix, so tests run in parallel without seeing each
//! other.
//!
//! The coordinator is built in the test process ([`Application::build`] on port 0) unless
//! a test needs it as a process: one it kills, signals or measures, or whose log it reads
//! ([`EnvOptions::binary_coordinator`]). Either way a test waits for `/health/ready`,
//! never for a log line. Workers are always processes.
//!
//! The binaries are taken from the cargo target folder this test binary lives in
//! (`cargo build --workspace --bins --examples` puts them there; `deploy/test.sh` does it),
//! or from `TASKER_BIN_DIR`.
//!
//! ## Layout
//! - this file: where things are, and [`TestEnv`], one test's world.
//! - [`api`]: the typed API client ([`Api`], [`Task`], [`Step`]).
//! - [`coordinator`](Coordinator): the coordinator in-process or as a binary.
//! - [`process`](Process): a binary run as a child process, with its log.
//! - [`broker`]: publishing, dead letters, consumers and connections on RabbitMQ.
//! - [`http_stub`]: a scripted HTTP server for `tasker.http` steps.
//!
//! [`Application::build`]: tasker_coordinator::Application::build

#![allow(missing_docs)]

pub mod api;
pub mod broker;
mod coordinator;
pub mod http_stub;
mod process;
pub mod relay;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::process::Command;
use uuid::Uuid;

pub use api::{Api, Step, StepError, Task};
pub use broker::{
    DeadLetter, assert_no_dead_letters, close_broker_connections, confirm_channel,
    declare_queue_with, delete_broker_objects, delete_broker_objects_at, delete_queue, publish,
    queue_consumers, queue_exists, queue_messages, queued_steps, take_dead_letters, take_messages,
    take_steps, wait_for_consumers, wait_until_taken,
};
pub use coordinator::{Coordinator, InProcess};
pub use process::{Process, spawn_coordinator};
pub use reqwest::StatusCode;
pub use tasker_shared::states::{StepStatus, TaskStatus};

/// Where PostgreSQL is (the server, without a database name).
pub fn postgres_server() -> String {
    std::env::var("TASKER_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Where RabbitMQ is.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| tasker_shared::config::DEFAULT_AMQP_URL.into())
}

/// The folder holding the built binaries.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("TASKER_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // Tests run from target/<profile>/deps/; binaries such as tasker-example from
    // target/<profile>/.
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("the executable's folder");
    if dir.ends_with("deps") {
        dir.parent().expect("target folder").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// A binary of the workspace (or an example, with `examples/` in front).
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins --examples` first (deploy/test.sh does)",
        path.display()
    );
    path
}

/// An HTTP client for the coordinator's API. It lets an idle connection go after 5 s:
/// the coordinator closes one idle for `TASKER_HTTP_HEADER_TIMEOUT_MS` (10 s), and a
/// request sent on it just then would fail (`IncompleteMessage`).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .expect("building an HTTP client")
}

/// Wait (up to 20 s) until `count` sessions of `pool`'s database wait for a lock in a
/// statement that contains `statement`: requests have reached the row the test holds.
///
/// # Panics
///
/// When they have not by then.
pub async fn wait_for_lock_waiters(pool: &PgPool, statement: &str, count: i64) {
    let pattern = format!("%{statement}%");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
               AND query LIKE $1",
        )
        .bind(&pattern)
        .fetch_one(pool)
        .await
        .expect("reading pg_stat_activity");
        if waiting >= count {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{waiting} of {count} statements like `{statement}` wait for a lock after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many SQL statements the coordinator whose metrics page is `url` sends over
/// `period` (`tasker_db_statements_total`, counted by the binary's telemetry layer: start
/// the coordinator as a process, `binary_coordinator`).
pub async fn statements_over(url: &str, period: std::time::Duration) -> f64 {
    let sample = "tasker_db_statements_total";
    let before = metric(url, sample).await;
    tokio::time::sleep(period).await;
    metric(url, sample).await - before
}

/// The value of one sample (`name{labels}`) of the Prometheus text page at `url`; 0 when
/// the page does not have it yet.
pub async fn metric(url: &str, sample: &str) -> f64 {
    let text = reqwest::get(url)
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(key, _)| *key == sample)
        .map_or(0.0, |(_, value)| value.parse().expect("a number"))
}

/// Subscribe to the lifecycle events of the prefix `prefix` whose routing key matches
/// `binding` (`#` for all), as any system would: an exclusive queue of its own bound to
/// the events exchange. Keep the connection as long as the consumer.
pub async fn subscribe_events(
    prefix: &str,
    binding: &str,
) -> anyhow::Result<(lapin::Connection, lapin::Consumer)> {
    let connection =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let queue = channel
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            format!("{prefix}.events").into(),
            binding.into(),
            Default::default(),
            Default::default(),
        )
        .await?;
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?;
    Ok((connection, consumer))
}

/// Wait until the sample reaches at least `target`, for at most 30 s; returns its value.
pub async fn wait_for_metric(url: &str, sample: &str, target: f64) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let value = metric(url, sample).await;
        if value >= target {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sample} is {value} after 30 s, not yet {target}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The environment a test's coordinator starts with (the binary reads it; in-process it
/// becomes the same settings): this test's database and prefix, a free port, and the
/// options' additions last, so they win.
fn coordinator_env(
    database_url: &str,
    prefix: &str,
    options: &EnvOptions,
) -> Vec<(String, String)> {
    let database_url = match &options.database_server {
        Some(server) => {
            let name = database_url.rsplit('/').next().unwrap_or_default();
            format!("{server}/{name}")
        }
        None => database_url.to_owned(),
    };
    let mut vars: Vec<(String, String)> = [
        ("DATABASE_URL", database_url),
        ("AMQP_URL", amqp_url()),
        ("TASKER_AMQP_PREFIX", prefix.to_owned()),
        ("TASKER_HTTP_ADDR", "127.0.0.1:0".to_owned()),
        ("TASKER_DB_POOL_SIZE", "4".to_owned()),
        ("TASKER_SWEEP_INTERVAL_MS", "500".to_owned()),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value))
    .collect();
    if let Some(dir) = &options.templates_dir {
        vars.push(("TASKER_TEMPLATES_DIR".into(), dir.display().to_string()));
    }
    if let Some(queue_type) = &options.queue_type {
        vars.push(("TASKER_QUEUE_TYPE".into(), queue_type.clone()));
    }
    vars.extend(options.coordinator_env.iter().cloned());
    vars
}

/// `tasker-coordinator serve` with the environment `vars`.
fn coordinator_command(vars: &[(String, String)]) -> Command {
    let mut command = Command::new(binary("tasker-coordinator"));
    command.arg("serve");
    for (key, value) in vars {
        command.env(key, value);
    }
    command
}

/// One test's world: a database, a queue prefix, a coordinator and any workers.
pub struct TestEnv {
    pub database_url: String,
    pub prefix: String,
    pub base_url: String,
    pub http: reqwest::Client,
    /// The typed client of the coordinator.
    pub api: Api,
    pub pool: PgPool,
    pub coordinator: Coordinator,
    pub workers: Vec<Process>,
    options: EnvOptions,
    log_dir: PathBuf,
    namespaces: Arc<Mutex<Vec<String>>>,
    finished: bool,
}

impl Drop for TestEnv {
    /// A test that panicked never reached [`TestEnv::finish`]: still stop its coordinator
    /// and drop its database and queues (its worker processes die with their handles), so
    /// failures leave nothing behind.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.coordinator.stop_now();
        let database_url = self.database_url.clone();
        let prefix = self.prefix.clone();
        let namespaces = self
            .namespaces
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default();
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let namespaces = with_registered_namespaces(&database_url, namespaces).await;
                drop_database(&database_url).await;
                let _ = delete_broker_objects(&prefix, &namespaces).await;
            });
        });
        let _ = cleanup.join();
    }
}

/// Options for [`TestEnv::start_with`].
#[derive(Default, Clone)]
pub struct EnvOptions {
    /// `TASKER_TEMPLATES_DIR`.
    pub templates_dir: Option<PathBuf>,
    /// Extra environment for the coordinator (as the binary would read it).
    pub coordinator_env: Vec<(String, String)>,
    /// The PostgreSQL server the coordinator reaches this test's database on (a relay's
    /// `postgres://…@127.0.0.1:port`, say); unset: the server the test itself uses.
    pub database_server: Option<String>,
    /// `TASKER_QUEUE_TYPE` for the coordinators and workers (unset: the default).
    pub queue_type: Option<String>,
    /// Start the `tasker-coordinator` binary instead of building the coordinator in the
    /// test process: for a test that kills or signals it, measures its process, or reads
    /// its log (an in-process coordinator keeps none).
    pub binary_coordinator: bool,
}

impl TestEnv {
    /// A coordinator on a fresh database, no workers yet.
    pub async fn start(test: &str) -> anyhow::Result<Self> {
        Self::start_with(test, EnvOptions::default()).await
    }

    pub async fn start_with(test: &str, options: EnvOptions) -> anyhow::Result<Self> {
        let id = Uuid::new_v4().simple().to_string()[..10].to_owned();
        let database_url = format!("{}/tasker_test_{id}", postgres_server());
        let prefix = format!("tt{id}");
        let log_dir = bin_dir()
            .parent()
            .unwrap_or(Path::new("."))
            .join("e2e-logs")
            .join(format!("{test}-{id}"));
        std::fs::create_dir_all(&log_dir)?;

        create_database(&database_url).await?;
        let started = async {
            let vars = coordinator_env(&database_url, &prefix, &options);
            let (coordinator, base_url) = if options.binary_coordinator {
                let command = coordinator_command(&vars);
                let (process, address) =
                    spawn_coordinator(command, "coordinator", &log_dir).await?;
                let base_url = format!("http://{address}");
                coordinator::wait_until_ready(&base_url, Duration::from_secs(60)).await?;
                (Coordinator::Binary(process), base_url)
            } else {
                let settings = coordinator::settings_from_env(&vars)?;
                let coordinator = InProcess::start(test, settings).await?;
                let base_url = coordinator.base_url();
                (Coordinator::InProcess(coordinator), base_url)
            };
            let pool = PgPool::connect(&database_url).await?;
            anyhow::Ok((coordinator, base_url, pool))
        };
        let (coordinator, base_url, pool) = match started.await {
            Ok(started) => started,
            Err(error) => {
                drop_database(&database_url).await;
                return Err(error);
            }
        };
        Ok(TestEnv {
            database_url,
            prefix,
            api: Api::new(base_url.clone()).with_log(coordinator.lines()),
            base_url,
            http: http_client(),
            pool,
            coordinator,
            workers: Vec::new(),
            options,
            log_dir,
            namespaces: Arc::default(),
            finished: false,
        })
    }

    /// Start the `tasker-coordinator` binary, one more coordinator on this test's database
    /// and prefix (`name` names its log), with extra environment; returns it and its base
    /// URL once it is ready.
    pub async fn start_coordinator(
        &self,
        name: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<(Process, String)> {
        let mut vars = coordinator_env(&self.database_url, &self.prefix, &self.options);
        vars.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let command = coordinator_command(&vars);
        let (process, address) = spawn_coordinator(command, name, &self.log_dir).await?;
        let base_url = format!("http://{address}");
        coordinator::wait_until_ready(&base_url, Duration::from_secs(60)).await?;
        Ok((process, base_url))
    }

    /// One more coordinator on this test's database and prefix, in the test process, with
    /// extra environment; ready when returned.
    pub async fn start_coordinator_in_process(
        &self,
        name: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<InProcess> {
        let mut vars = coordinator_env(&self.database_url, &self.prefix, &self.options);
        vars.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let settings = coordinator::settings_from_env(&vars)?;
        InProcess::start(name, settings).await
    }

    /// Start a `tasker-worker` (or another worker binary) serving `namespaces` (empty:
    /// all), and wait until it consumes them. Returns its index in `workers`.
    pub async fn start_worker_binary(
        &mut self,
        binary_path: PathBuf,
        worker_id: &str,
        namespaces: &[&str],
        concurrency: u16,
    ) -> anyhow::Result<usize> {
        self.start_worker_with(binary_path, worker_id, namespaces, concurrency, &[])
            .await
    }

    /// Start a worker binary with extra environment variables.
    pub async fn start_worker_with(
        &mut self,
        binary_path: PathBuf,
        worker_id: &str,
        namespaces: &[&str],
        concurrency: u16,
        env: &[(&str, &str)],
    ) -> anyhow::Result<usize> {
        let mut command = Command::new(binary_path);
        command
            .env("AMQP_URL", amqp_url())
            .env("TASKER_AMQP_PREFIX", &self.prefix)
            .env("TASKER_NAMESPACES", namespaces.join(","))
            .env("TASKER_CONCURRENCY", concurrency.to_string())
            .env("TASKER_WORKER_ID", worker_id);
        if let Some(queue_type) = &self.options.queue_type {
            command.env("TASKER_QUEUE_TYPE", queue_type);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let mut worker = Process::spawn(command, worker_id.to_owned(), &self.log_dir)?;
        // Its queues are deleted with the test's, templates or not.
        self.namespaces
            .lock()
            .unwrap()
            .extend(namespaces.iter().map(|n| (*n).to_owned()));
        worker
            .wait_for_log("worker started", Duration::from_secs(30))
            .await?;
        for namespace in namespaces {
            worker
                .wait_for_log(
                    &format!("\"queue\":\"{}\"", self.queue(namespace)),
                    Duration::from_secs(30),
                )
                .await?;
        }
        self.workers.push(worker);
        Ok(self.workers.len() - 1)
    }

    /// Start a `tasker-worker` that serves its metrics on a free port; returns its index
    /// in `workers` and the URL of its `/metrics`.
    pub async fn start_metered_worker(
        &mut self,
        worker_id: &str,
        namespaces: &[&str],
        concurrency: u16,
    ) -> anyhow::Result<(usize, String)> {
        self.start_metered_worker_with(worker_id, namespaces, concurrency, &[])
            .await
    }

    /// [`TestEnv::start_metered_worker`] with extra environment variables.
    pub async fn start_metered_worker_with(
        &mut self,
        worker_id: &str,
        namespaces: &[&str],
        concurrency: u16,
        env: &[(&str, &str)],
    ) -> anyhow::Result<(usize, String)> {
        let mut env = env.to_vec();
        env.push(("TASKER_METRICS_ADDR", "127.0.0.1:0"));
        let index = self
            .start_worker_with(
                binary("tasker-worker"),
                worker_id,
                namespaces,
                concurrency,
                &env,
            )
            .await?;
        let address = self.workers[index]
            .wait_for_address("metrics listening", Duration::from_secs(10))
            .await?;
        Ok((index, format!("http://{address}/metrics")))
    }

    /// Start a `tasker-worker` with the built-in handlers.
    pub async fn start_worker(
        &mut self,
        worker_id: &str,
        namespaces: &[&str],
    ) -> anyhow::Result<usize> {
        self.start_worker_binary(binary("tasker-worker"), worker_id, namespaces, 8)
            .await
    }

    /// Start a `tasker-worker` whose `tasker.http` may call the test's own HTTP stubs on
    /// 127.0.0.1 (the outbound policy refuses loopback by default).
    pub async fn start_worker_calling_stubs(
        &mut self,
        worker_id: &str,
        namespaces: &[&str],
    ) -> anyhow::Result<usize> {
        self.start_worker_with(
            binary("tasker-worker"),
            worker_id,
            namespaces,
            8,
            &[("TASKER_HTTP_ALLOW", "127.0.0.1")],
        )
        .await
    }

    /// The step queue of a namespace under this test's prefix.
    pub fn queue(&self, namespace: &str) -> String {
        format!("{}.steps.{namespace}", self.prefix)
    }

    /// The URL of the coordinator's `/metrics`.
    pub fn metrics_url(&self) -> String {
        format!("{}/metrics", self.base_url)
    }

    /// `POST /v1/templates` of each of `templates`, each answered 201 (a test's set-up).
    ///
    /// # Panics
    ///
    /// When one is not created.
    pub async fn register_templates(&self, templates: &[&str]) {
        for template in templates {
            let (status, body) = self.register_template(template).await.unwrap();
            assert_eq!(status, StatusCode::CREATED, "{body}");
        }
    }

    /// `POST /v1/templates`.
    pub async fn register_template(&self, body: &str) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .http
            .post(format!("{}/v1/templates", self.base_url))
            .header("content-type", "application/yaml")
            .body(body.to_owned())
            .send()
            .await?;
        let status = response.status();
        let value: Value = response.json().await?;
        if let Some(namespace) = value["namespace"].as_str() {
            self.namespaces.lock().unwrap().push(namespace.to_owned());
        }
        Ok((status, value))
    }

    /// `POST /v1/tasks`, the answer as JSON (see [`Api::create_task`] for the typed one).
    pub async fn create_task(&self, body: Value) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .http
            .post(format!("{}/v1/tasks", self.base_url))
            .json(&body)
            .send()
            .await?;
        Ok((response.status(), response.json().await?))
    }

    /// `GET` a path of the API.
    pub async fn get(&self, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .http
            .get(format!("{}{path}", self.base_url))
            .send()
            .await?;
        Ok((response.status(), response.json().await?))
    }

    /// `POST` a JSON body to a path of the API.
    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .http
            .post(format!("{}{path}", self.base_url))
            .json(&body)
            .send()
            .await?;
        Ok((response.status(), response.json().await?))
    }

    /// `PATCH` a JSON body to a path of the API.
    pub async fn patch(&self, path: &str, body: Value) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .http
            .patch(format!("{}{path}", self.base_url))
            .json(&body)
            .send()
            .await?;
        Ok((response.status(), response.json().await?))
    }

    /// `DELETE` a path of the API: the status, and the body when there is one.
    pub async fn delete(&self, path: &str) -> anyhow::Result<(StatusCode, Option<Value>)> {
        let response = self
            .http
            .delete(format!("{}{path}", self.base_url))
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        Ok((status, serde_json::from_str(&text).ok()))
    }

    /// Poll the task until `done` holds for its JSON.
    pub async fn wait_until(
        &self,
        task_id: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let path = format!("/v1/tasks/{task_id}");
        api::poll_until(
            &format!("task {task_id}: {what}"),
            timeout,
            self.coordinator.lines().as_ref(),
            || async { Ok(self.get(&path).await?.1) },
            done,
            |task| serde_json::to_string_pretty(task).unwrap_or_default(),
        )
        .await
    }

    /// The id of the newest transition committed (task, step or schedule fire): where
    /// the events relay's cursor stops once it has passed everything
    /// ([`TestEnv::wait_for_relay`]). Not the sequence's last value: an id drawn by a
    /// transaction that rolled back has no row, and the cursor never rests on it.
    pub async fn newest_transition_id(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COALESCE(greatest((SELECT max(transition_id) FROM task_transitions), \
                                      (SELECT max(transition_id) FROM step_transitions), \
                                      (SELECT max(transition_id) FROM schedule_fires)), 0)",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Poll until the events relay's cursor is at transition `id`: every transition up
    /// to it was published or passed over.
    pub async fn wait_for_relay(&self, id: i64, timeout: Duration) -> anyhow::Result<i64> {
        api::poll_until(
            &format!("the events relay at transition {id}"),
            timeout,
            self.coordinator.lines().as_ref(),
            || async {
                Ok(
                    sqlx::query_scalar("SELECT last_transition_id FROM event_relay")
                        .fetch_one(&self.pool)
                        .await?,
                )
            },
            |cursor: &i64| *cursor == id,
            |cursor| format!("the relay is at {cursor}"),
        )
        .await
    }

    /// The step of a task JSON with this name.
    pub fn step<'a>(task: &'a Value, name: &str) -> &'a Value {
        task["steps"]
            .as_array()
            .and_then(|steps| steps.iter().find(|s| s["name"] == name))
            .unwrap_or_else(|| panic!("no step {name} in {task}"))
    }

    /// Poll the task until its status is one of `statuses`; its JSON.
    pub async fn wait_for_task(
        &self,
        task_id: &str,
        statuses: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        self.wait_until(task_id, &format!("one of {statuses:?}"), timeout, |task| {
            statuses.iter().any(|s| task["status"] == *s)
        })
        .await
    }

    /// Create a task and wait for it to finish; its JSON.
    pub async fn run_task(&self, body: Value, timeout: Duration) -> anyhow::Result<Value> {
        let (status, task) = self.create_task(body).await?;
        anyhow::ensure!(
            status == StatusCode::CREATED,
            "create answered {status}: {task}"
        );
        let id = task["task_id"].as_str().context("task_id")?.to_owned();
        self.wait_for_task(&id, &["complete", "error", "cancelled"], timeout)
            .await
    }

    /// Stop every process and the coordinator, drop the database and delete the queues.
    pub async fn finish(mut self) -> anyhow::Result<()> {
        for worker in &mut self.workers {
            worker.kill().await;
        }
        let stopped = self.coordinator.stop().await;
        self.pool.close().await;
        self.finished = true;
        let namespaces = self.namespaces.lock().unwrap().clone();
        let namespaces = with_registered_namespaces(&self.database_url, namespaces).await;
        let (_, deleted) = tokio::join!(
            drop_database(&self.database_url),
            delete_broker_objects(&self.prefix, &namespaces)
        );
        deleted?;
        stopped
    }
}

/// `tracked` with every namespace the test's database has templates of: a test may
/// register templates by other ways than [`TestEnv`]'s (a templates directory, a raw
/// request), and each namespace has a step queue to delete.
async fn with_registered_namespaces(database_url: &str, mut tracked: Vec<String>) -> Vec<String> {
    if let Ok(mut conn) = PgConnection::connect(database_url).await {
        let registered: Vec<String> = sqlx::query_scalar("SELECT name FROM namespaces")
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
        let _ = conn.close().await;
        tracked.extend(registered);
    }
    tracked.sort_unstable();
    tracked.dedup();
    tracked
}

/// A connection to the server's `postgres` database, to create and drop others.
async fn admin_connection() -> anyhow::Result<PgConnection> {
    Ok(PgConnection::connect(&format!("{}/postgres", postgres_server())).await?)
}

/// Create a test's database as a copy of the migrated template ([`migrated_template`]):
/// the coordinator finds its migrations applied and starts at once.
async fn create_database(database_url: &str) -> anyhow::Result<()> {
    static TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    let template = TEMPLATE.get_or_try_init(migrated_template).await?;
    let (_, database) = database_url.rsplit_once('/').context("a database name")?;
    let mut admin = admin_connection().await?;
    let sql = format!("CREATE DATABASE \"{database}\" TEMPLATE \"{template}\"");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut admin)
        .await
        .with_context(|| format!("creating {database} from {template}"))?;
    admin.close().await?;
    Ok(())
}

/// The name of a database with every migration of this build applied, made once for
/// the whole server (its name says which migrations): applying them takes longer than
/// copying it, and every test would.
///
/// It is built under a name of its own, then renamed, so a test binary running meanwhile
/// never copies it half-migrated; it refuses connections, so none ever stops a copy.
async fn migrated_template() -> anyhow::Result<String> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    for migration in tasker_shared::db::MIGRATOR.iter() {
        migration.version.hash(&mut hasher);
        migration.checksum.hash(&mut hasher);
    }
    let template = format!("tasker_test_template_{:016x}", hasher.finish());
    let mut admin = admin_connection().await?;
    if !database_exists(&mut admin, &template).await? {
        let building = format!("{template}_{}", &Uuid::new_v4().simple().to_string()[..8]);
        let settings = tasker_shared::config::DatabaseSettings {
            database_url: format!("{}/{building}", postgres_server()).parse()?,
            db_pool_size: 2,
            db_idle_in_transaction_timeout_ms: 60_000,
            db_answer_timeout_ms: 30_000,
        };
        tasker_shared::db::migrate(&settings).await?;
        for sql in [
            format!("ALTER DATABASE \"{building}\" WITH ALLOW_CONNECTIONS false"),
            format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{building}'"
            ),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut admin)
                .await?;
        }
        let rename = format!("ALTER DATABASE \"{building}\" RENAME TO \"{template}\"");
        if let Err(error) = sqlx::query(sqlx::AssertSqlSafe(rename))
            .execute(&mut admin)
            .await
        {
            // Another test binary made it first.
            let drop = format!("DROP DATABASE IF EXISTS \"{building}\"");
            sqlx::query(sqlx::AssertSqlSafe(drop))
                .execute(&mut admin)
                .await?;
            if !database_exists(&mut admin, &template).await? {
                return Err(error).context("naming the migrated template");
            }
        }
    }
    admin.close().await?;
    Ok(template)
}

async fn database_exists(admin: &mut PgConnection, name: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(admin)
        .await
}

/// Drop the database at `database_url`, closing whatever connections it still has
/// (without `FORCE`, PostgreSQL waits for the backends of closed connections to exit).
async fn drop_database(database_url: &str) {
    let Some((_, database)) = database_url.rsplit_once('/') else {
        return;
    };
    if let Ok(mut admin) = admin_connection().await {
        let sql = format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)");
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await;
        let _ = admin.close().await;
    }
}

/// Start `tasker-worker` with `env` and expect it to refuse to start (a setting it
/// cannot use): returns what it wrote to stderr.
pub async fn worker_refusing_to_start(env: &[(&str, &str)]) -> String {
    let mut command = Command::new(binary("tasker-worker"));
    command
        .env("AMQP_URL", amqp_url())
        .env("TASKER_AMQP_PREFIX", "unused")
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    refusing_to_start("tasker-worker", command).await
}

/// Start `tasker-coordinator serve` on `database_url` with `env` and expect it to refuse
/// to start: returns what it wrote to stderr. It must exit, not retry.
pub async fn coordinator_refusing_to_start(database_url: &str, env: &[(&str, &str)]) -> String {
    let mut command = Command::new(binary("tasker-coordinator"));
    command
        .arg("serve")
        .env("DATABASE_URL", database_url)
        .env("AMQP_URL", amqp_url())
        .env("TASKER_HTTP_ADDR", "127.0.0.1:0")
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    refusing_to_start("tasker-coordinator", command).await
}

async fn refusing_to_start(name: &str, mut command: Command) -> String {
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .unwrap_or_else(|_| panic!("{name} stops at once instead of retrying"))
        .unwrap_or_else(|error| panic!("{name} runs: {error}"));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{name} started: {stderr}");
    stderr
}
