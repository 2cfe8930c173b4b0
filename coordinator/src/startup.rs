//! Building and running the coordinator.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::control::Control;
use crate::dispatcher::{Dispatcher, DispatcherConfig};
use crate::events::EventRelay;
use crate::gauges::Gauges;
use crate::http::{AppState, register_template, router};
use crate::metrics::CoordinatorMetrics;
use crate::publisher::StepPublisher;
use crate::result_processor::{ResultProcessor, ResultProcessorConfig};
use crate::settings::CoordinatorSettings;
use crate::sweeper::Sweeper;
use tasker_shared::broker::{self, Topology};
use tasker_shared::store::transitions::LeasePolicy;
use tasker_shared::template::parse_template;

/// A coordinator, built and ready to run.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    settings: CoordinatorSettings,
    channel: lapin::Channel,
    confirm_channel: lapin::Channel,
    topology: Topology,
}

impl Application {
    /// Apply migrations, connect to PostgreSQL and RabbitMQ, declare the topology,
    /// register the templates of `TASKER_TEMPLATES_DIR`, and bind the HTTP port.
    pub async fn build(settings: CoordinatorSettings) -> anyhow::Result<Self> {
        tasker_shared::db::migrate(&settings.database).await?;
        let pool = tasker_shared::db::connect_lazy(&settings.database)?;
        let topology = Topology::new(settings.broker.amqp_prefix.clone());
        let connection = broker::connect(&settings.broker, "tasker-coordinator").await?;
        let channel = connection.create_channel().await?;
        topology
            .declare_base(&channel)
            .await
            .context("declaring the broker topology")?;
        let confirm_channel = broker::confirm_channel(&connection).await?;
        let publisher = Arc::new(StepPublisher::new(
            broker::confirm_channel(&connection).await?,
            topology.clone(),
            settings.dispatch_lease_ms,
        ));
        for namespace in tasker_shared::store::templates::namespaces(&pool).await? {
            publisher.ensure_namespace(&namespace).await?;
        }
        let state = AppState {
            pool: pool.clone(),
            publisher,
            metrics: Arc::new(CoordinatorMetrics::new()),
            control: Control::new(pool, confirm_channel.clone(), topology.clone()),
            wake_dispatcher: Arc::new(Notify::new()),
            wake_events: Arc::new(Notify::new()),
            environment: settings.environment.clone(),
            broker: Arc::new(connection),
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
            channel,
            confirm_channel,
            topology,
        })
    }

    /// The port the API listens on (useful with `TASKER_HTTP_ADDR=127.0.0.1:0`).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serve and run the background loops until `shutdown` resolves. Returns an error if
    /// a loop stops on its own (lost broker connection): a supervisor should restart us.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let settings = &self.settings;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut loops = JoinSet::new();
        let dispatcher = Dispatcher::new(
            self.state.pool.clone(),
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
        loops.spawn(dispatcher.run(stop_rx.clone()));
        let processor = ResultProcessor::new(
            self.state.pool.clone(),
            self.state.publisher.clone(),
            self.state.metrics.clone(),
            (
                self.state.wake_dispatcher.clone(),
                self.state.wake_events.clone(),
            ),
            self.channel.clone(),
            self.confirm_channel.clone(),
            ResultProcessorConfig {
                topology: self.topology.clone(),
                batch_size: settings.batch_size,
                lease_ms: settings.dispatch_lease_ms,
                lease: LeasePolicy {
                    grace_ms: settings.lease_grace_ms,
                    heartbeat_lease_ms: settings.heartbeat_lease_ms,
                },
            },
        );
        loops.spawn(processor.run(stop_rx.clone()));
        let sweeper = Sweeper::new(
            self.state.pool.clone(),
            self.state.metrics.clone(),
            self.state.wake_dispatcher.clone(),
            self.state.wake_events.clone(),
            Duration::from_millis(settings.sweep_interval_ms),
        );
        loops.spawn(sweeper.run(stop_rx.clone()));
        loops.spawn(self.state.control.clone().run(stop_rx.clone()));
        let gauges = Gauges::new(
            self.state.pool.clone(),
            self.state.broker.create_channel().await?,
            self.topology.clone(),
            self.state.metrics.clone(),
            Duration::from_millis(settings.gauge_interval_ms),
        );
        loops.spawn(gauges.run(stop_rx.clone()));
        if settings.events {
            let relay = EventRelay::new(
                self.state.pool.clone(),
                broker::confirm_channel(&self.state.broker).await?,
                self.topology.clone(),
                self.state.metrics.clone(),
                self.state.wake_events.clone(),
                Duration::from_millis(settings.events_poll_ms),
            );
            loops.spawn(relay.run(stop_rx.clone()));
        } else {
            tracing::info!("lifecycle events are off (TASKER_EVENTS=false)");
        }

        let address = self.listener.local_addr()?;
        tracing::info!(%address, "coordinator listening");
        let app = router(self.state.clone(), settings.max_body_bytes);
        let mut server_stop = stop_rx.clone();
        let server = axum::serve(self.listener, app).with_graceful_shutdown(async move {
            let _ = server_stop.changed().await;
        });
        let server = tokio::spawn(async move { server.await });

        let outcome = tokio::select! {
            () = shutdown => Ok(()),
            _ = loops.join_next() => Err(anyhow::anyhow!(
                "a background loop stopped unexpectedly (lost broker connection?); exiting so a supervisor can restart the coordinator")),
        };
        let _ = stop_tx.send(true);
        while loops.join_next().await.is_some() {}
        server.await??;
        self.state.pool.close().await;
        tracing::info!("coordinator stopped");
        outcome
    }
}

/// Register every template file in `dir`; refuse to start when one is invalid, naming the
/// file and every problem.
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
        let definition = parse_template(&text, &state.environment).map_err(|error| {
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
        register_template(state, &definition)
            .await
            .map_err(|error| anyhow::anyhow!("cannot register {}: {error:?}", path.display()))?;
        tracing::info!(file = %path.display(), "template loaded");
    }
    Ok(())
}
