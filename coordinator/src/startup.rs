//! Building and running the coordinator.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::control::Control;
use crate::creator::TaskCreator;
use crate::dispatcher::{Dispatcher, DispatcherConfig};
use crate::events::EventRelay;
use crate::gauges::Gauges;
use crate::http::{AppState, register_template, router};
use crate::link::BrokerLink;
use crate::metrics::CoordinatorMetrics;
use crate::publisher::StepPublisher;
use crate::result_processor::{ResultProcessor, ResultProcessorConfig};
use crate::retention::{Retention, RetentionLoop};
use crate::service::{Services, wait_for_all};
use crate::settings::CoordinatorSettings;
use crate::sweeper::{QueueAudit, Sweeper};
use tasker_shared::broker::{self, Topology};
use tasker_shared::db::Database;
use tasker_shared::template::parse_template_with_warnings;

/// A coordinator, built and ready to run.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    settings: CoordinatorSettings,
    session: BrokerSession,
    topology: Topology,
    /// Every task the coordinator spawns, awaited before [`run_until_stopped`] returns
    /// (see `service`).
    ///
    /// [`run_until_stopped`]: Application::run_until_stopped
    tasks: TaskTracker,
}

/// How long the loops of a broker session get to stop before they are abandoned: a
/// broker in trouble must not hold the reconnect up.
const SESSION_STOP: Duration = Duration::from_secs(5);
/// How long each call of a session's opening (a namespace's queue declared, a channel
/// opened) may take: past it, the session is given up and the coordinator reconnects
/// (at start-up, it exits).
const SETUP_CALL: Duration = Duration::from_secs(10);
/// How long the publisher gets at shutdown to publish the batches claimed before it.
const FLUSH: Duration = Duration::from_secs(10);
/// How long the database loops (the dispatcher, the sweeper…) get to stop at shutdown: a
/// round in progress ends, one stuck on an unanswering database is abandoned (what it
/// claimed is dispatched again when its lease expires).
const DATABASE_STOP: Duration = Duration::from_secs(10);
/// How long the tasks left once everything else stopped (creations being written, a
/// connection's last answer) get before they are abandoned; and the pool's connections
/// to come back.
const LAST_TASKS: Duration = Duration::from_secs(5);

/// What one RabbitMQ connection gives the coordinator: made at start and again after every
/// reconnect.
struct BrokerSession {
    connection: Arc<lapin::Connection>,
    /// For consuming results and declaring.
    channel: lapin::Channel,
    /// Confirm mode: dead letters, control broadcasts.
    confirm_channel: lapin::Channel,
    /// Confirm mode: step messages.
    publish_channel: lapin::Channel,
}

impl BrokerSession {
    /// Declare the topology on a fresh connection and open the channels.
    async fn open(connection: lapin::Connection, topology: &Topology) -> anyhow::Result<Self> {
        let channel = connection.create_channel().await?;
        topology
            .declare_base(&channel)
            .await
            .map_err(|error| topology.declare_error(error))?;
        let confirm_channel = broker::confirm_channel(&connection).await?;
        let publish_channel = broker::confirm_channel(&connection).await?;
        Ok(BrokerSession {
            connection: Arc::new(connection),
            channel,
            confirm_channel,
            publish_channel,
        })
    }
}

/// Why a broker session ended.
enum SessionEnd {
    Shutdown,
    /// The connection (or a loop that needs it) was lost: reconnect.
    BrokerLost(&'static str),
    /// A database-only loop (named) stopped on its own, which it never should.
    LoopDied(&'static str),
}

impl Application {
    /// Apply migrations, connect to PostgreSQL and RabbitMQ, declare the topology,
    /// register the templates of `TASKER_TEMPLATES_DIR`, and bind the HTTP port.
    pub async fn build(settings: CoordinatorSettings) -> anyhow::Result<Self> {
        tasker_shared::db::migrate(&settings.database).await?;
        tasker_shared::store::transitions::set_max_fan_out(settings.max_fan_out as usize);
        tasker_shared::store::transitions::set_max_task_tree(settings.max_task_tree as usize);
        let pool = tasker_shared::db::connect_lazy_with(
            &settings.database,
            &[(
                tasker_shared::db::MAX_GATHERED_BYTES,
                settings.max_step_message_bytes.to_string(),
            )],
        )?;
        warn_without_autovacuum(&pool).await;
        let db = Database::new(
            pool.clone(),
            Duration::from_millis(settings.database.db_answer_timeout_ms),
        );
        let topology = settings.broker.topology().map_err(anyhow::Error::msg)?;
        if !topology.signs() {
            tracing::warn!(
                "TASKER_MESSAGE_KEY is not set: broker messages are not signed, so anyone who \
                 can publish to this RabbitMQ virtual host can complete, inject or cancel steps \
                 (docs/security.md)"
            );
        }
        let connection = broker::connect(&settings.broker, &connection_name(&topology)).await?;
        let session = broker::within(
            broker::ATTEMPT_PATIENCE,
            BrokerSession::open(connection, &topology),
        )
        .await
        .context("opening the broker session")?;
        let tasks = TaskTracker::new();
        let broker = Arc::new(BrokerLink::new(session.connection.clone()));
        let publisher = StepPublisher::new(
            db.clone(),
            (broker.clone(), session.publish_channel.clone()),
            topology.clone(),
            settings.dispatch_lease_ms,
            tasks.clone(),
        );
        let publisher = publisher.max_message_bytes(settings.max_step_message_bytes);
        #[cfg(feature = "failpoints")]
        let publisher = publisher.pause_after_claims(settings.failpoint_pause_after_claims);
        let publisher = Arc::new(publisher);
        for namespace in tasker_shared::store::templates::namespaces(&pool).await? {
            broker::within(SETUP_CALL, async {
                publisher
                    .ensure_namespace(&namespace)
                    .await
                    .map_err(|error| topology.declare_error(error))
            })
            .await
            .with_context(|| format!("declaring the queue of namespace `{namespace}`"))?;
        }
        let auth = Arc::new(Authenticator::from_settings(&settings.auth, pool.clone())?);
        let metrics = Arc::new(CoordinatorMetrics::new());
        let state = AppState {
            auth,
            db: db.clone(),
            templates: Arc::default(),
            creator: TaskCreator::start(
                db.clone(),
                metrics.create_batch_size.clone(),
                settings.max_pending_creates,
                &tasks,
            ),
            publisher,
            metrics: metrics.clone(),
            control: Control::new(
                db,
                (broker.clone(), session.confirm_channel.clone()),
                topology.clone(),
                metrics,
            ),
            wake_dispatcher: Arc::new(Notify::new()),
            wake_events: Arc::new(Notify::new()),
            wake_scheduler: Arc::new(Notify::new()),
            environment: settings.environment.clone(),
            limits: crate::http::Limits::from(&settings),
            broker: broker.clone(),
            live: Arc::new(crate::live::LiveEvents::new(
                broker,
                topology.clone(),
                settings.events.clone(),
                settings.http_max_connections as usize,
            )),
            status_counts: Arc::default(),
            effects: TaskTracker::new(),
        };
        if let Some(dir) = &settings.templates_dir {
            load_templates(&state, dir).await?;
        }
        let listener = TcpListener::bind(settings.http_addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.http_addr))?;
        Ok(Application {
            listener,
            state,
            settings,
            session,
            topology,
            tasks,
        })
    }

    /// The port the API listens on (useful with `TASKER_HTTP_ADDR=127.0.0.1:0`).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serve and run the background loops until `shutdown` resolves.
    ///
    /// The API, the dispatcher and the sweeper live as long as the process. The loops that
    /// need RabbitMQ (result processor, control, gauges, events relay) live as long as one
    /// connection: when it is lost they stop, the coordinator reconnects (retrying without
    /// limit, with backoff) and starts them again on the new connection. Meanwhile the API
    /// keeps accepting tasks and the dispatcher's failed publishes are handed back to the
    /// sweeper. Returns an error only if a database loop stops on its own.
    ///
    /// On shutdown the loops stop, the steps they claimed are published, the requests in
    /// progress are answered, and every task the coordinator spawned has ended (or, past
    /// a timeout, is reported in the log as abandoned) before this returns.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let settings = &self.settings;
        let stop = CancellationToken::new();
        // The console's event streams end as soon as the coordinator stops.
        let live = self.state.live.clone();
        let stopping = stop.clone();
        self.tasks.spawn(async move {
            stopping.cancelled().await;
            live.close();
        });
        let mut database_services = Services::new(self.tasks.clone(), stop.child_token());
        let dispatcher = Dispatcher::new(
            self.state.db.clone(),
            self.state.publisher.clone(),
            self.state.metrics.clone(),
            self.state.wake_dispatcher.clone(),
            self.state.wake_events.clone(),
            DispatcherConfig {
                batch_size: settings.batch_size,
                lease_ms: settings.dispatch_lease_ms,
                poll_interval: Duration::from_millis(settings.poll_interval_ms),
            },
        );
        database_services.start(dispatcher);
        database_services.start(crate::publisher::LeaseLifter {
            publisher: self.state.publisher.clone(),
        });
        let sweeper = Sweeper::new(
            self.state.db.clone(),
            self.state.metrics.clone(),
            (
                self.state.wake_dispatcher.clone(),
                self.state.wake_events.clone(),
            ),
            Duration::from_millis(settings.sweep_interval_ms),
            self.state.publisher.clone(),
            settings.lease_policy(),
            QueueAudit {
                control: self.state.control.clone(),
                broker: self.state.broker.clone(),
                topology: self.topology.clone(),
                lease_ms: settings.dispatch_lease_ms,
            },
        );
        database_services.start(sweeper);
        database_services.start(crate::scheduler::Scheduler {
            state: self.state.clone(),
            grace: chrono::TimeDelta::milliseconds(settings.schedule_grace_ms as i64),
            wake: self.state.wake_scheduler.clone(),
            keep_unrelayed: settings.events.is_on(),
        });
        if let Retention::Keep(keep) = settings.retention {
            let retention = RetentionLoop {
                db: self.state.db.clone(),
                metrics: self.state.metrics.clone(),
                keep,
                keep_unrelayed: settings.events.is_on(),
                every: Duration::from_millis(settings.retention_interval_ms.max(100)),
            };
            database_services.start(retention);
        }

        let address = self.listener.local_addr()?;
        tracing::info!(%address, "coordinator listening");
        let app = router(
            self.state.clone(),
            settings.max_body_bytes,
            settings.max_inflight_body_bytes,
            Duration::from_millis(settings.http_body_timeout_ms),
        );
        let server = self.tasks.spawn(crate::http::server::serve(
            self.listener,
            app,
            crate::http::server::ConnectionLimits {
                max_connections: settings.http_max_connections as usize,
                header_timeout: Duration::from_millis(settings.http_header_timeout_ms),
            },
            stop.clone(),
            self.tasks.clone(),
        ));

        tokio::pin!(shutdown);
        let mut session = Some(self.session);
        let outcome = loop {
            let current = match session.take() {
                Some(current) => current,
                None => {
                    let topology = &self.topology;
                    let name = connection_name(topology);
                    let metrics = &self.state.metrics;
                    let reconnect = broker::reconnect(
                        &settings.broker,
                        &name,
                        |connection| BrokerSession::open(connection, topology),
                        || {
                            metrics.broker_errors.inc();
                        },
                    );
                    tokio::select! {
                        () = &mut shutdown => break Ok(()),
                        current = reconnect => {
                            self.state.metrics.broker_reconnects.inc();
                            tracing::info!("reconnected to RabbitMQ");
                            current
                        }
                    }
                }
            };
            match run_session(
                &self.state,
                settings,
                &self.topology,
                current,
                &mut shutdown,
                &mut database_services,
            )
            .await
            {
                SessionEnd::Shutdown => break Ok(()),
                SessionEnd::LoopDied(service) => {
                    break Err(anyhow::anyhow!(
                        "the background loop `{service}` stopped unexpectedly; exiting so a supervisor can restart the coordinator"
                    ));
                }
                SessionEnd::BrokerLost(why) => {
                    self.state.metrics.broker_errors.inc();
                    tracing::warn!(
                        reason = why,
                        "lost the connection to RabbitMQ; reconnecting (the API stays up)"
                    );
                    // Never spin: a session that ends at once waits a moment first.
                    tokio::select! {
                        () = &mut shutdown => break Ok(()),
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        // Stops the server (it answers the requests in progress) and every service.
        stop.cancel();
        database_services.stop(Some(DATABASE_STOP)).await;
        server.await?;
        // What the last requests' commits promised, their clients gone or not.
        wait_for_all(&self.state.effects, FLUSH).await;
        // Batches claimed before the stop, by the dispatcher or by the last requests, still
        // go out (or fail and are handed back).
        if tokio::time::timeout(FLUSH, self.state.publisher.flush())
            .await
            .is_err()
        {
            tracing::warn!(
                "claimed steps still unpublished after {FLUSH:?}; the sweeper dispatches \
                 them again when their lease expires"
            );
        }
        // Nothing is left to publish or broadcast.
        close_broker(&self.state.broker.connection(), "coordinator stopped").await;
        // No request is left to create a task.
        self.state.creator.close();
        wait_for_all(&self.tasks, LAST_TASKS).await;
        // Closing waits for every connection to come back: one a stuck query holds
        // (an abandoned loop's, a lost network) must not keep the process up.
        if tokio::time::timeout(LAST_TASKS, self.state.db.pool().close())
            .await
            .is_err()
        {
            tracing::warn!("database connections still busy after {LAST_TASKS:?}; exiting anyway");
        }
        tracing::info!("coordinator stopped");
        outcome
    }
}

/// Run the loops that need RabbitMQ on one connection until it is lost or `shutdown`.
async fn run_session(
    state: &AppState,
    settings: &CoordinatorSettings,
    topology: &Topology,
    session: BrokerSession,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    database_services: &mut Services,
) -> SessionEnd {
    state.broker.replace(session.connection.clone());
    // The session's channels and declarations, before anything is published on the new
    // connection (a broker in a memory or disk alarm blocks a connection once it
    // publishes, and lapin then sends nothing, a channel's opening included), each
    // bounded and shutdown heard meanwhile: neither a broker that does not answer nor
    // one that blocks holds the session's loops, or a stop, for ever.
    // Each broker call is bounded, not the whole: a thousand namespaces' queues take
    // their time on a fresh broker.
    state.publisher.forget_namespaces();
    let setup = async {
        let namespaces = tasker_shared::store::templates::namespaces(state.db.pool());
        match tokio::time::timeout(SETUP_CALL, namespaces).await {
            Ok(Ok(namespaces)) => {
                for namespace in namespaces {
                    let declared = state.publisher.ensure_namespace(&namespace);
                    match tokio::time::timeout(SETUP_CALL, declared).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => {
                            tracing::warn!(%error, %namespace, "cannot declare a namespace's queue");
                        }
                        Err(_) => anyhow::bail!(
                            "declaring the queue of namespace `{namespace}`: no answer within {SETUP_CALL:?}"
                        ),
                    }
                }
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot list namespaces to declare their queues");
            }
            Err(_) => tracing::warn!(
                "cannot list namespaces to declare their queues: no answer within {SETUP_CALL:?}"
            ),
        }
        // Several consumers, each with its own channel: a `multiple` ack covers only its
        // own channel's deliveries. Their batches skip each other's locked steps as
        // another coordinator's would (transitions::lock_batch).
        let mut consumer_channels = vec![session.channel.clone()];
        for _ in 1..settings.result_consumers {
            let channel = session.connection.create_channel();
            consumer_channels.push(broker::within(SETUP_CALL, channel).await?);
        }
        let events_channel = match settings.events.is_on() {
            true => {
                let channel = broker::confirm_channel(&session.connection);
                Some(broker::within(SETUP_CALL, channel).await?)
            }
            false => None,
        };
        anyhow::Ok((consumer_channels, events_channel))
    };
    let use_session = || {
        state.publisher.use_channel(session.publish_channel.clone());
        state.control.use_channel(session.confirm_channel.clone());
    };
    let opened = tokio::select! {
        () = shutdown.as_mut() => {
            // The last publishes of the stop go out on this connection.
            use_session();
            return SessionEnd::Shutdown;
        }
        opened = setup => opened,
    };
    let (consumer_channels, events_channel) = match opened {
        Ok(opened) => opened,
        Err(error) => {
            tracing::warn!(
                error = format!("{error:#}"),
                "cannot open the session's channels"
            );
            close_broker(&session.connection, "coordinator session not opened").await;
            return SessionEnd::BrokerLost("cannot open the session's channels");
        }
    };
    use_session();
    // Steps claimed while the broker was away could not be published; dispatch again.
    state.wake_dispatcher.notify_one();

    // Stopped with the database services too, on the same tracker.
    let mut services = database_services.child();
    for (rank, channel) in consumer_channels.iter().enumerate() {
        let processor = ResultProcessor::new(
            state.db.clone(),
            state.publisher.clone(),
            state.metrics.clone(),
            (state.wake_dispatcher.clone(), state.wake_events.clone()),
            channel.clone(),
            session.confirm_channel.clone(),
            ResultProcessorConfig {
                topology: topology.clone(),
                batch_size: settings.batch_size,
                lease_ms: settings.dispatch_lease_ms,
                lease: settings.lease_policy(),
                priority: i32::from(settings.result_consumers) - rank as i32,
                control: state.control.clone(),
            },
        );
        services.start(processor);
    }
    services.start(state.control.clone());
    // The channels that publish, which no loop of their own watches: the broker closes a
    // channel on an error (a publish to an exchange deleted meanwhile, say) while the
    // connection stays up, and a closed channel never opens again. The session then
    // ends and reconnects.
    let mut watched = vec![
        ("step publishing", session.publish_channel.clone()),
        ("dead letters and control", session.confirm_channel.clone()),
    ];
    services.start(Gauges::new(
        state.db.clone(),
        state.broker.clone(),
        topology.clone(),
        state.metrics.clone(),
        Duration::from_millis(settings.gauge_interval_ms),
    ));
    match events_channel {
        Some(channel) => {
            watched.push(("lifecycle events", channel.clone()));
            services.start(EventRelay::new(
                state.db.clone(),
                (channel, state.broker.clone()),
                topology.clone(),
                settings.events.clone(),
                state.metrics.clone(),
                state.wake_events.clone(),
                Duration::from_millis(settings.events_poll_ms),
            ));
        }
        None => tracing::info!("lifecycle events are off (TASKER_EVENTS=false)"),
    }
    let mut end = None;
    let mut health = tokio::time::interval(Duration::from_millis(500));
    while end.is_none() {
        end = tokio::select! {
            () = shutdown.as_mut() => Some(SessionEnd::Shutdown),
            service = database_services.stopped_early() => Some(SessionEnd::LoopDied(service)),
            service = services.stopped_early() => {
                tracing::warn!(service, "a loop of the broker session stopped");
                Some(SessionEnd::BrokerLost("a broker loop stopped"))
            }
            _ = health.tick() => broken(&session.connection, &watched),
        };
    }
    // Loops stop at once when told; a broker in trouble must not hold the restart up.
    services.stop(Some(SESSION_STOP)).await;
    let end = end.unwrap_or(SessionEnd::Shutdown);
    // Close what is left of the connection (a loop may have stopped on a channel error
    // while the connection itself is up), so reconnecting does not leak it. On shutdown
    // it stays open: the steps claimed meanwhile are still to be published, and the
    // requests still answered may broadcast cancels ([`close_broker`] closes it last).
    if !matches!(end, SessionEnd::Shutdown) {
        close_broker(&session.connection, "coordinator session ended").await;
    }
    end
}

/// Close `connection` if it is up, waiting for the broker a moment at most.
async fn close_broker(connection: &lapin::Connection, why: &str) {
    if connection.status().connected() {
        let _ =
            tokio::time::timeout(Duration::from_secs(2), connection.close(200, why.into())).await;
    }
}

/// The name a coordinator's broker connection shows in RabbitMQ (`rabbitmqctl
/// list_connections client_properties`): the deployment's queue prefix tells coordinators
/// of different deployments on one broker apart.
fn connection_name(topology: &Topology) -> String {
    format!("tasker-coordinator {}", topology.prefix())
}

/// Why a broker session must end, if it must: its connection closed, or one of the
/// `channels` it holds did.
fn broken(
    connection: &lapin::Connection,
    channels: &[(&'static str, lapin::Channel)],
) -> Option<SessionEnd> {
    if !connection.status().connected() {
        return Some(SessionEnd::BrokerLost("the connection closed"));
    }
    let (name, _) = channels
        .iter()
        .find(|(_, channel)| !channel.status().connected())?;
    tracing::warn!(
        channel = name,
        "the broker closed a channel of this session"
    );
    Some(SessionEnd::BrokerLost("a channel closed"))
}

/// Register every template file in `dir`; refuse to start when one is invalid, naming the
/// file and every problem.
/// Step rows are rewritten several times each; without autovacuum their dead versions
/// pile up and every claim and result walks over them (docs/operating.md, "PostgreSQL").
async fn warn_without_autovacuum(pool: &PgPool) {
    match sqlx::query_scalar::<_, String>("SHOW autovacuum")
        .fetch_one(pool)
        .await
    {
        Ok(setting) if setting != "on" => tracing::warn!(
            autovacuum = %setting,
            "autovacuum is off on this PostgreSQL server: dead step versions will pile up and \
             slow claims and results down unless the tables are vacuumed (docs/operating.md)"
        ),
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot read the server's autovacuum setting"),
    }
}

async fn load_templates(state: &AppState, dir: &Path) -> anyhow::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read TASKER_TEMPLATES_DIR {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    entries.sort();
    for path in entries {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let parsed = parse_template_with_warnings(
            &text,
            &state.environment,
            tasker_shared::template::TemplateLimits::default(),
        )
        .map_err(|error| {
            let problems: Vec<String> = error
                .0
                .iter()
                .map(|p| format!("  {}: {} ({})", p.path, p.message, p.code))
                .collect();
            anyhow::anyhow!(
                "invalid template {}:\n{}",
                path.display(),
                problems.join("\n")
            )
        })?;
        for warning in &parsed.warnings {
            tracing::warn!(file = %path.display(), path = %warning.path, code = %warning.code,
                "{}", warning.message);
        }
        register_template(state, &parsed.definition)
            .await
            .map_err(|error| anyhow::anyhow!("cannot register {}: {error:?}", path.display()))?;
        tracing::info!(file = %path.display(), warnings = parsed.warnings.len(), "template loaded");
    }
    Ok(())
}
