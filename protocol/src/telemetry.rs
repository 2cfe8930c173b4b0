//! Logging and tracing set-up shared by the binaries, and W3C trace-context propagation
//! through AMQP headers.
//!
//! Logs: `tracing` with a human or JSON formatter (`TASKER_LOG_FORMAT`), filtered by
//! `RUST_LOG`. Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, spans are exported with OTLP over HTTP;
//! otherwise no OpenTelemetry layer is installed and the per-step spans (at `debug`
//! level, below the usual log filter) cost nothing.
//!
//! A task's trace: `create_task` (API) → `dispatch_step` (coordinator, its parent stored
//! on the task row) → `execute_step` (worker, parent from the step message's
//! `traceparent` header) → `apply_result` (coordinator, parent from the result's header).

use std::collections::HashMap;

use opentelemetry::global;
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::{LogFormat, LogSettings};

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes it.
#[must_use = "dropping it does not flush the spans: call shutdown() before exiting"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Export what is buffered and stop the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            eprintln!("cannot flush traces: {error}");
        }
    }

    /// Export what is buffered now.
    pub fn flush(&self) {
        if let Some(provider) = &self.provider {
            let _ = provider.force_flush();
        }
    }
}

/// Whether the environment asks for traces to be exported.
fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

/// Install the global subscriber: logs always, traces over OTLP when configured. Call
/// once, at the top of `main`.
pub fn init(settings: &LogSettings, service: &'static str) -> Telemetry {
    let provider = if otlp_configured() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => Some(provider_with(exporter, service, true)),
            Err(error) => {
                eprintln!("cannot set up the OTLP trace exporter ({error}); traces are off");
                None
            }
        }
    } else {
        None
    };
    install(settings, service, provider)
}

/// Install the global subscriber with `exporter` receiving every span synchronously (for
/// tests: an in-memory exporter).
pub fn init_with_exporter(
    settings: &LogSettings,
    service: &'static str,
    exporter: impl SpanExporter + 'static,
) -> Telemetry {
    let provider = provider_with(exporter, service, false);
    install(settings, service, Some(provider))
}

fn provider_with(
    exporter: impl SpanExporter + 'static,
    service: &'static str,
    batch: bool,
) -> SdkTracerProvider {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let builder = if batch {
        builder.with_batch_exporter(exporter)
    } else {
        builder.with_simple_exporter(exporter)
    };
    builder.build()
}

fn install(
    settings: &LogSettings,
    service: &'static str,
    provider: Option<SdkTracerProvider>,
) -> Telemetry {
    let filter = EnvFilter::try_new(&settings.log_filter).unwrap_or_else(|error| {
        eprintln!(
            "invalid log filter {:?} ({error}); using `info`",
            settings.log_filter
        );
        EnvFilter::new("info")
    });
    let logs = match settings.log_format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(filter);
    let traces = provider.as_ref().map(|provider| {
        global::set_text_map_propagator(TraceContextPropagator::new());
        // Tasker's own spans, per-step ones (debug) included, whatever RUST_LOG says.
        let targets = Targets::new()
            .with_target("tasker_coordinator", LevelFilter::DEBUG)
            .with_target("tasker_worker", LevelFilter::DEBUG)
            .with_target("tasker_shared", LevelFilter::DEBUG)
            .with_default(LevelFilter::OFF);
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service))
            .with_filter(targets)
    });
    // Counts database round trips (sqlx logs every statement at debug under this target).
    let statements =
        StatementCounter.with_filter(Targets::new().with_target("sqlx::query", LevelFilter::TRACE));
    let _ = Registry::default()
        .with(logs)
        .with(traces)
        .with(statements)
        .try_init();
    Telemetry { provider }
}

/// Counts sqlx's per-statement events into [`crate::metrics::DB_STATEMENTS`].
struct StatementCounter;

impl<S: tracing::Subscriber> Layer<S> for StatementCounter {
    fn on_event(
        &self,
        _event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        crate::metrics::DB_STATEMENTS.inc();
    }
}

/// The W3C `traceparent` of `span`, when traces are on.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    global::get_text_map_propagator(|propagator| propagator.inject_context(&context, &mut carrier));
    carrier.remove("traceparent")
}

/// Make `span` a child of the remote span `traceparent` (when given and traces are on),
/// and record its trace id in the span's `trace_id` field, so log lines carry it.
pub fn adopt(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(traceparent) = traceparent {
        let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
        let parent = global::get_text_map_propagator(|propagator| propagator.extract(&carrier));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    record_trace_id(span);
}

/// Record `span`'s trace id in its `trace_id` field (declared `tracing::field::Empty`).
pub fn record_trace_id(span: &tracing::Span) {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", tracing::field::display(span_context.trace_id()));
    }
}
