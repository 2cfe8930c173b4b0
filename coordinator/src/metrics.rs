//! The coordinator's metrics, served on `/metrics` (see `docs/observability.md` for the
//! list). Counters are incremented where the work happens; the gauges are refreshed by
//! the `gauges` loop.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tasker_shared::metrics::{batch_histogram, latency_histogram};
use tasker_shared::states::StepStatus;

/// `namespace`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Namespace {
    pub(crate) namespace: String,
}

/// `namespace`, `status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct NamespaceStatus {
    pub(crate) namespace: String,
    pub(crate) status: String,
}

/// `status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Status {
    pub(crate) status: String,
}

/// `queue`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Queue {
    pub(crate) queue: String,
}

/// `event`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Event {
    pub(crate) event: String,
}

/// `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Reason {
    pub(crate) reason: String,
}

/// `namespace`, `template`, `status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TaskOutcome {
    pub(crate) namespace: String,
    pub(crate) template: String,
    pub(crate) status: String,
}

/// Buckets for whole tasks: 10 ms to about 12 hours, each four times the last.
fn task_duration_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.01, 4.0, 12,
    ))
}

/// `schedule`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ScheduleLabel {
    pub(crate) schedule: String,
}

/// `schedule`, `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ScheduleReason {
    pub(crate) schedule: String,
    pub(crate) reason: String,
}

pub(crate) struct CoordinatorMetrics {
    registry: Registry,
    pub(crate) tasks_created: Family<Namespace, Counter>,
    pub(crate) tasks_finished: Family<NamespaceStatus, Counter>,
    pub(crate) deadlines_exceeded: Family<Namespace, Counter>,
    pub(crate) steps_dispatched: Family<Namespace, Counter>,
    pub(crate) steps_finished: Family<NamespaceStatus, Counter>,
    pub(crate) retries_scheduled: Family<Namespace, Counter>,
    pub(crate) deferrals: Family<Namespace, Counter>,
    pub(crate) leases_expired: Family<Reason, Counter>,
    pub(crate) lost_messages: Family<Reason, Counter>,
    pub(crate) stale_results: Counter,
    pub(crate) pruned_tasks: Counter,
    pub(crate) results_held: Counter,
    pub(crate) runs_withdrawn: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) publish_failures: Counter,
    pub(crate) database_errors: Counter,
    pub(crate) broker_errors: Counter,
    pub(crate) broker_reconnects: Counter,
    pub(crate) control_dropped: Counter,
    pub(crate) queue_latency: Family<Namespace, Histogram>,
    pub(crate) dispatch_batch_size: Histogram,
    pub(crate) step_message_batch_size: Histogram,
    pub(crate) publish_duration: Histogram,
    pub(crate) result_batch_size: Histogram,
    pub(crate) create_batch_size: Histogram,
    pub(crate) ready_backlog: Gauge,
    pub(crate) steps_held: Family<Reason, Gauge>,
    pub(crate) tasks_by_status: Family<Status, Gauge>,
    pub(crate) steps_by_status: Family<Status, Gauge>,
    pub(crate) queue_messages: Family<Queue, Gauge>,
    pub(crate) queue_consumers: Family<Queue, Gauge>,
    /// The queues' depths as the gauges loop last read them, for `/health/status`.
    pub(crate) queue_depths: std::sync::Mutex<Vec<QueueDepth>>,
    pub(crate) events_published: Family<Event, Counter>,
    pub(crate) task_duration: Family<TaskOutcome, Histogram>,
    pub(crate) oldest_ready: Family<Namespace, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub(crate) schedule_fires: Family<ScheduleLabel, Counter>,
    pub(crate) schedule_skips: Family<ScheduleReason, Counter>,
    pub(crate) schedule_lateness: Histogram,
    /// The schedules this coordinator has series for: those deleted (through any
    /// coordinator) are forgotten by the gauges loop.
    pub(crate) schedules_counted: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// A counter family by reason whose known reasons exist from the start, at 0, so rate()
/// works at once.
fn with_reasons(reasons: &[&str]) -> Family<Reason, Counter> {
    let family = Family::<Reason, Counter>::default();
    for reason in reasons {
        let _ = family.get_or_create(&Reason {
            reason: (*reason).to_owned(),
        });
    }
    family
}

/// Add `n` to `family`'s counter for `reason`.
pub(crate) fn count_reason(family: &Family<Reason, Counter>, reason: &str, n: u64) {
    family
        .get_or_create(&Reason {
            reason: reason.to_owned(),
        })
        .inc_by(n);
}

impl CoordinatorMetrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let tasks_created = Family::<Namespace, Counter>::default();
        registry.register(
            "tasker_tasks_created",
            "Tasks created, by namespace",
            tasks_created.clone(),
        );
        let tasks_finished = Family::<NamespaceStatus, Counter>::default();
        registry.register(
            "tasker_tasks_finished",
            "Tasks that reached complete or error, by namespace and status",
            tasks_finished.clone(),
        );
        let steps_dispatched = Family::<Namespace, Counter>::default();
        registry.register(
            "tasker_steps_dispatched",
            "Step attempts claimed and published",
            steps_dispatched.clone(),
        );
        let steps_finished = Family::<NamespaceStatus, Counter>::default();
        registry.register(
            "tasker_steps_finished",
            "Steps that reached complete or error, by namespace and status",
            steps_finished.clone(),
        );
        let deadlines_exceeded = Family::<Namespace, Counter>::default();
        registry.register(
            "tasker_tasks_deadline_exceeded",
            "Tasks ended in error by their deadline (`timeout` or `deadline`), also counted in tasker_tasks_finished_total",
            deadlines_exceeded.clone(),
        );
        let retries_scheduled = Family::<Namespace, Counter>::default();
        registry.register(
            "tasker_step_retries_scheduled",
            "Failed attempts that scheduled another attempt after a backoff",
            retries_scheduled.clone(),
        );
        let deferrals = Family::<Namespace, Counter>::default();
        registry.register(
            "tasker_step_deferrals",
            "Deferrals (\"not now\" answers) scheduled",
            deferrals.clone(),
        );
        let leases_expired = with_reasons(&["lease_lost", "lease_expired"]);
        registry.register(
            "tasker_leases_expired",
            "Steps whose lease expired: lease_lost (publish never confirmed, or message lost: dispatched again) or lease_expired (worker lost)",
            leases_expired.clone(),
        );
        let lost_messages = with_reasons(&["queue_missing", "queue_short"]);
        registry.register(
            "tasker_lost_messages",
            "Confirmed steps found lost with their queue (queue_missing: deleted; queue_short: holds fewer messages than steps wait in it) and handed back for dispatch",
            lost_messages.clone(),
        );
        let stale_results = Counter::default();
        registry.register(
            "tasker_stale_results_dropped",
            "Results dropped by the fence (late, duplicated, cancelled or superseded)",
            stale_results.clone(),
        );
        let pruned_tasks = Counter::default();
        registry.register(
            "tasker_pruned_tasks",
            "Finished tasks removed by retention (TASKER_RETENTION or `tasker-coordinator prune`), with their steps, edges and history",
            pruned_tasks.clone(),
        );
        let results_held = Counter::default();
        registry.register(
            "tasker_result_messages_held",
            "Worker messages put off to the next result batch because another transaction (another coordinator's batch) held their steps",
            results_held.clone(),
        );
        let runs_withdrawn = Counter::default();
        registry.register(
            "tasker_runs_withdrawn",
            "Runs a worker reported (a started notice or a heartbeat) whose step was cancelled or is under another dispatch: the worker was told to abort them",
            runs_withdrawn.clone(),
        );
        let dead_lettered = Counter::default();
        registry.register(
            "tasker_dead_lettered",
            "Messages the coordinator sent to the dead-letter queue",
            dead_lettered.clone(),
        );
        let publish_failures = Counter::default();
        registry.register(
            "tasker_step_publish_failures",
            "Claimed steps the broker did not confirm (re-dispatched when their lease expires)",
            publish_failures.clone(),
        );
        let database_errors = Counter::default();
        registry.register(
            "tasker_database_errors",
            "Failed database transactions of the background loops",
            database_errors.clone(),
        );
        let broker_errors = Counter::default();
        registry.register(
            "tasker_broker_errors",
            "Failed broker operations",
            broker_errors.clone(),
        );
        let control_dropped = Counter::default();
        registry.register(
            "tasker_control_messages_dropped",
            "Messages on the control exchange dropped: undecodable, or a worker status with an invalid id",
            control_dropped.clone(),
        );
        let broker_reconnects = Counter::default();
        registry.register(
            "tasker_broker_reconnects",
            "Times the coordinator reconnected to RabbitMQ after losing its connection",
            broker_reconnects.clone(),
        );
        let task_duration = Family::<TaskOutcome, Histogram>::new_with_constructor(
            task_duration_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "tasker_task_duration",
            "Tasks from creation to complete or error, by namespace, template and status",
            Unit::Seconds,
            task_duration.clone(),
        );
        let oldest_ready = Family::<Namespace, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register_with_unit(
            "tasker_oldest_ready_step_age",
            "How long the oldest step ready to run but not yet dispatched has waited, by namespace (0: none waits); refreshed",
            Unit::Seconds,
            oldest_ready.clone(),
        );
        let schedule_fires = Family::<ScheduleLabel, Counter>::default();
        registry.register(
            "tasker_schedule_fires",
            "Tasks schedules created, by schedule",
            schedule_fires.clone(),
        );
        let schedule_skips = Family::<ScheduleReason, Counter>::default();
        registry.register(
            "tasker_schedule_skips",
            "Fire times schedules ran no task for, by schedule and reason: overlap (the previous task still ran), missed (no coordinator ran then; catch_up), failed (the task could not be created)",
            schedule_skips.clone(),
        );
        let schedule_lateness = latency_histogram();
        registry.register_with_unit(
            "tasker_schedule_lateness",
            "From a fire time to its task being created",
            Unit::Seconds,
            schedule_lateness.clone(),
        );
        let queue_latency = Family::<Namespace, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "tasker_step_queue_latency",
            "From a step becoming ready to a worker starting it, by namespace",
            Unit::Seconds,
            queue_latency.clone(),
        );
        let dispatch_batch_size = batch_histogram();
        registry.register(
            "tasker_dispatch_batch_size",
            "Steps claimed per claim statement",
            dispatch_batch_size.clone(),
        );
        let step_message_batch_size = batch_histogram();
        registry.register(
            "tasker_step_message_batch_size",
            "Steps carried per step message published (one, or a batch of a namespace's steps)",
            step_message_batch_size.clone(),
        );
        let publish_duration = latency_histogram();
        registry.register_with_unit(
            "tasker_step_publish_duration",
            "From publishing a claimed batch to the broker confirming all of it",
            Unit::Seconds,
            publish_duration.clone(),
        );
        let create_batch_size = batch_histogram();
        registry.register(
            "tasker_create_batch_size",
            "Tasks written per task-creating statement",
            create_batch_size.clone(),
        );
        let result_batch_size = batch_histogram();
        registry.register(
            "tasker_result_batch_size",
            "Messages applied per result transaction",
            result_batch_size.clone(),
        );
        let ready_backlog = Gauge::default();
        registry.register(
            "tasker_ready_steps_backlog",
            "Steps ready to run but not yet dispatched",
            ready_backlog.clone(),
        );
        let steps_held = Family::<Reason, Gauge>::default();
        registry.register(
            "tasker_steps_held",
            "Steps ready to run but held by a limit, by reason (concurrency_limited, rate_limited)",
            steps_held.clone(),
        );
        let tasks_by_status = Family::<Status, Gauge>::default();
        registry.register(
            "tasker_tasks",
            "Tasks in the database, by status",
            tasks_by_status.clone(),
        );
        let steps_by_status = Family::<Status, Gauge>::default();
        registry.register(
            "tasker_steps",
            "Steps in the database, by status",
            steps_by_status.clone(),
        );
        let queue_messages = Family::<Queue, Gauge>::default();
        registry.register(
            "tasker_queue_messages",
            "Messages waiting in each Tasker queue",
            queue_messages.clone(),
        );
        let queue_consumers = Family::<Queue, Gauge>::default();
        registry.register(
            "tasker_queue_consumers",
            "Consumers on each Tasker queue",
            queue_consumers.clone(),
        );
        registry.register(
            "tasker_db_statements",
            "SQL statements sent to PostgreSQL by this process (BEGIN and COMMIT included)",
            tasker_shared::metrics::DB_STATEMENTS.clone(),
        );
        let events_published = Family::<Event, Counter>::default();
        registry.register(
            "tasker_events_published",
            "Lifecycle events published to the events exchange, by event",
            events_published.clone(),
        );
        CoordinatorMetrics {
            registry,
            events_published,
            tasks_created,
            tasks_finished,
            steps_dispatched,
            steps_finished,
            retries_scheduled,
            deferrals,
            leases_expired,
            deadlines_exceeded,
            lost_messages,
            stale_results,
            pruned_tasks,
            results_held,
            runs_withdrawn,
            dead_lettered,
            publish_failures,
            database_errors,
            broker_errors,
            broker_reconnects,
            control_dropped,
            queue_latency,
            queue_depths: std::sync::Mutex::default(),
            schedules_counted: std::sync::Mutex::default(),
            task_duration,
            oldest_ready,
            schedule_fires,
            schedule_skips,
            schedule_lateness,
            dispatch_batch_size,
            step_message_batch_size,
            publish_duration,
            result_batch_size,
            create_batch_size,
            ready_backlog,
            steps_held,
            tasks_by_status,
            steps_by_status,
            queue_messages,
            queue_consumers,
        }
    }

    pub(crate) fn render(&self) -> String {
        tasker_shared::metrics::render(&self.registry)
    }

    pub(crate) fn namespace(namespace: &str) -> Namespace {
        Namespace {
            namespace: namespace.to_owned(),
        }
    }

    pub(crate) fn namespace_status(namespace: &str, status: &str) -> NamespaceStatus {
        NamespaceStatus {
            namespace: namespace.to_owned(),
            status: status.to_owned(),
        }
    }
}

/// One queue's depth, as the gauges loop last read it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct QueueDepth {
    /// The queue's name.
    pub(crate) queue: String,
    /// `steps`, `results` or `dead_letter`.
    pub(crate) kind: &'static str,
    /// Messages ready for delivery.
    pub(crate) messages: u32,
    /// Consumers attached.
    pub(crate) consumers: u32,
}

use crate::publisher::Published;
use tasker_shared::store::transitions::{AppliedResults, Dispatch, FinishedTask};

impl CoordinatorMetrics {
    /// A claimed batch was published.
    pub(crate) fn dispatched(
        &self,
        dispatches: &[Dispatch],
        published: &Published,
        took: std::time::Duration,
    ) {
        self.dispatch_batch_size.observe(dispatches.len() as f64);
        for &steps in &published.carried {
            self.step_message_batch_size.observe(steps as f64);
        }
        self.publish_duration.observe(took.as_secs_f64());
        // A step the broker did not take is dispatched again, and counted then.
        let unpublished: std::collections::HashSet<(uuid::Uuid, uuid::Uuid)> =
            published.unpublished.iter().copied().collect();
        for dispatch in dispatches
            .iter()
            .filter(|d| !unpublished.contains(&(d.message.step_id, d.message.dispatch_token)))
        {
            self.steps_dispatched
                .get_or_create(&Self::namespace(&dispatch.message.namespace))
                .inc();
        }
        self.publish_failures.inc_by(published.failed as u64);
    }

    /// A batch of results was applied.
    pub(crate) fn applied(&self, applied: &AppliedResults) {
        self.stale_results.inc_by(applied.stale as u64);
        for change in &applied.changes {
            if let Some(latency) = change.queue_latency {
                self.queue_latency
                    .get_or_create(&Self::namespace(&change.namespace))
                    .observe(latency);
            }
            match (change.to_status, change.deferred) {
                (StepStatus::WaitingForRetry, true) => {
                    self.deferrals
                        .get_or_create(&Self::namespace(&change.namespace))
                        .inc();
                }
                (StepStatus::WaitingForRetry, false) => {
                    self.retries_scheduled
                        .get_or_create(&Self::namespace(&change.namespace))
                        .inc();
                }
                (status, _) => {
                    self.steps_finished
                        .get_or_create(&Self::namespace_status(&change.namespace, status.as_str()))
                        .inc();
                }
            }
        }
    }

    /// Steps whose worker was lost (the sweeper expired their lease): a retry scheduled,
    /// or `error` on the last attempt, counted as the result processor counts a worker's
    /// failure. `tasker_leases_expired_total{reason="lease_expired"}` tells them apart.
    pub(crate) fn workers_lost(&self, steps: &[(String, StepStatus)]) {
        for (namespace, status) in steps {
            if *status == StepStatus::WaitingForRetry {
                self.retries_scheduled
                    .get_or_create(&Self::namespace(namespace))
                    .inc();
            } else {
                self.steps_finished
                    .get_or_create(&Self::namespace_status(namespace, status.as_str()))
                    .inc();
            }
        }
    }

    /// Tasks reached `complete` or `error`.
    pub(crate) fn finished(&self, finished: &[FinishedTask]) {
        for task in finished {
            self.tasks_finished
                .get_or_create(&Self::namespace_status(
                    &task.namespace,
                    task.status.as_str(),
                ))
                .inc();
            self.task_duration
                .get_or_create(&TaskOutcome {
                    namespace: task.namespace.clone(),
                    template: task.name.clone(),
                    status: task.status.as_str().to_owned(),
                })
                .observe(task.seconds.max(0.0));
        }
    }
}
