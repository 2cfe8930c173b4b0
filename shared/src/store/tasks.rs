//! Creating tasks and reading them.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgExecutor, PgPool, Row};
use uuid::Uuid;

use crate::states::{StepStatus, TaskStatus, TransitionReason};
use crate::store::templates::TemplateRecord;
use crate::store::transitions::{Dispatch, FirstStep, first_step_in};
use crate::template::{
    KeyInputs, Limits, Problem, TemplateDefinition, condition_task, evaluate_condition,
};

/// A task as the API shows it (without steps).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TaskRecord {
    /// The task's id (UUIDv7, so ids sort by creation).
    pub task_id: Uuid,
    /// Template namespace.
    pub namespace: String,
    /// Template name.
    pub name: String,
    /// Template version.
    pub version: String,
    /// Current status.
    pub status: TaskStatus,
    /// Priority, 0 to 9: among ready steps, the higher is claimed first.
    pub priority: i16,
    /// The caller's context.
    pub context: Value,
    /// Who asked for it.
    pub initiator: Option<String>,
    /// Which system asked for it.
    pub source_system: Option<String>,
    /// Why.
    pub reason: Option<String>,
    /// Free-form tags.
    pub tags: Value,
    /// The caller's idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When it finished.
    pub completed_at: Option<DateTime<Utc>>,
    /// When its first steps may run, when created to run later (`run_at`, `delay_ms`).
    pub run_at: Option<DateTime<Utc>>,
    /// When it ends in `error` (`deadline_exceeded`) unless finished: the earlier of its
    /// creation's `deadline` and its template's `timeout` from when it may start.
    pub deadline_at: Option<DateTime<Utc>>,
    /// The task whose `tasker.task` step started this one, if any.
    pub parent_task_id: Option<Uuid>,
}

/// A step as the API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StepRecord {
    /// The step's id.
    pub step_id: Uuid,
    /// Its name in the template.
    pub name: String,
    /// The handler that runs it.
    pub handler: String,
    /// Current status.
    pub status: StepStatus,
    /// Attempts made so far (the one running included).
    pub attempts: i32,
    /// Maximum attempts.
    pub retry_limit: i32,
    /// "Not now" answers so far (they spend no attempt).
    pub deferrals: i32,
    /// Whether failures are retried.
    pub retryable: bool,
    /// How long one attempt may run.
    pub timeout_ms: i64,
    /// Names of the steps it waits for.
    pub depends_on: Vec<String>,
    /// Its handler's output, once complete (or as resolved by an operator); `null` when
    /// left out of a task's page (`results_omitted`).
    pub results: Option<Value>,
    /// Its results were left out of this page of the task: they did not fit in what was
    /// left of the page's 16 MiB of JSON. `GET /v1/tasks/{task_id}/steps/{step_name}` has them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub results_omitted: bool,
    /// The size of its results as JSON, when measured to choose which to read.
    #[serde(skip)]
    pub results_size: Option<i64>,
    /// The last failure: `{"kind","message","code"?}`.
    pub last_error: Option<Value>,
    /// When the next attempt may start, while waiting for a retry.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When the current or last attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub completed_at: Option<DateTime<Utc>>,
    /// A `for_each` step: how many elements its list had, once evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<i32>,
    /// An instance: the `for_each` step it is an instance of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_of: Option<String>,
    /// An instance: its element's index in the list, from 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<i32>,
    /// A `tasker.task` step: the child task it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_task_id: Option<Uuid>,
}

/// A task that a `tasker.task` step started, as its parent task lists it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ChildTask {
    /// The child task.
    pub task_id: Uuid,
    /// The parent's step that started it.
    pub step: String,
    /// Its template's namespace.
    pub namespace: String,
    /// Its template's name.
    pub name: String,
    /// Its template's version.
    pub version: String,
    /// Its status.
    pub status: TaskStatus,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it finished.
    pub completed_at: Option<DateTime<Utc>>,
}

/// What a caller asks for when creating a task (already checked against the template).
#[derive(Debug, Clone, Default)]
pub struct NewTask {
    /// The context.
    pub context: Value,
    /// Who asks.
    pub initiator: Option<String>,
    /// Which system asks.
    pub source_system: Option<String>,
    /// Why.
    pub reason: Option<String>,
    /// Tags (any JSON, usually a list of strings).
    pub tags: Value,
    /// Makes creation idempotent within the template's namespace and name.
    pub idempotency_key: Option<String>,
    /// The trace the task's spans belong to (W3C traceparent), when traces are on.
    pub trace_parent: Option<String>,
    /// Priority, 0 to 9; the template's when absent.
    pub priority: Option<i16>,
    /// Run its first steps no earlier than this.
    pub run_at: Option<DateTime<Utc>>,
    /// End it in `error` if it has not finished by then.
    pub deadline: Option<DateTime<Utc>>,
    /// Steps to skip (each marked `skippable: true` in the template).
    pub bypass_steps: Vec<String>,
}

/// Whether a create made a new task or found the one with the same idempotency key.
#[derive(Debug)]
pub enum Created {
    /// A new task, with its steps as created, and the steps claimed with it (see
    /// [`create`]) for the caller to publish.
    New(TaskRecord, Vec<StepRecord>, Vec<Dispatch>),
    /// The task created earlier with the same idempotency key.
    Existing(TaskRecord),
    /// Nothing was written: the caller named no version, and the template's name no
    /// longer has `versions_known` versions (one was registered since it looked).
    /// Resolve the newest version again and retry.
    TemplateChanged,
}

/// The SQLSTATE `tasker_create_tasks` (migration 0010) raises when a template's versions
/// changed.
const TEMPLATE_CHANGED: &str = "TK001";

const TASK_COLUMNS: &str = "task_id, namespace, name, version, status, priority, context, \
     initiator, source_system, reason, tags, idempotency_key, created_at, updated_at, \
     completed_at, run_at, deadline_at, parent_task_id";

/// A task about to be created: the caller's request, checked against its template, with
/// the ids of the task and its steps chosen.
///
/// With `claim_lease_ms`, the steps without parents are claimed by the creating
/// statement, through the one claim path (`tasker_claim_steps`: `enqueued`, attempt 1, a
/// dispatch token and a lease of that many milliseconds), and returned for the caller to
/// publish once it committed. Without it they stay `pending` for the dispatcher.
///
/// With `versions_known` (see [`Resolved`](crate::store::templates::Resolved)), the
/// statement first checks that the template's name still has that many versions, and
/// writes nothing when it has not ([`Created::TemplateChanged`]).
#[derive(Debug)]
pub struct Creation {
    template: Arc<TemplateRecord>,
    new: Arc<NewTask>,
    claim_lease_ms: Option<i64>,
    versions_known: Option<i32>,
    task_id: Uuid,
    step_ids: Vec<Uuid>,
    edge_from: Vec<Uuid>,
    edge_to: Vec<Uuid>,
    /// Each step's parents, by position in template order.
    parents: Vec<Vec<usize>>,
    /// The task's and each step's limits with their keys evaluated; empty when the
    /// template has none.
    limits: Limits,
    /// The creation's `deadline` or its template's `timeout` from when it may start,
    /// whichever comes first.
    deadline_at: Option<DateTime<Utc>>,
    /// Which steps are skipped at creation, which wait to judge a condition, and each
    /// one's parents still to finish.
    plan: StepPlan,
}

/// A new task's steps before they are written: each one's parents still to finish (its
/// parents less those skipped), why it is skipped at creation (bypassed, or its
/// condition false with no parent to wait for), and the condition it waits to judge.
#[derive(Debug, Clone, Default)]
struct StepPlan {
    remaining: Vec<i32>,
    skipped: Vec<Option<TransitionReason>>,
    conditions: Vec<Option<String>>,
}

impl StepPlan {
    /// Plan the steps of `definition` (with `parents` by position) for `new`.
    fn new(
        definition: &TemplateDefinition,
        parents: &[Vec<usize>],
        new: &NewTask,
        priority: i16,
    ) -> Result<Self, Vec<Problem>> {
        let steps = &definition.steps;
        let mut plan = StepPlan {
            remaining: parents.iter().map(|p| p.len() as i32).collect(),
            skipped: vec![None; steps.len()],
            conditions: vec![None; steps.len()],
        };
        let mut problems = Vec::new();
        for (n, name) in new.bypass_steps.iter().enumerate() {
            let path = format!("bypass_steps[{n}]");
            match steps.iter().position(|step| &step.name == name) {
                None => problems.push(Problem::new(
                    path,
                    "unknown_step",
                    format!(
                        "no step `{name}` in {}/{} {}",
                        definition.namespace, definition.name, definition.version
                    ),
                )),
                Some(i) if !steps[i].skippable => problems.push(Problem::new(
                    path,
                    "not_skippable",
                    format!(
                        "step `{name}` is not marked `skippable: true`, so it cannot be bypassed"
                    ),
                )),
                Some(i) => plan.skipped[i] = Some(TransitionReason::Bypassed),
            }
        }
        // The conditions are judged whatever the bypass list's problems, so that one
        // answer names them all.
        if new.bypass_steps.is_empty()
            && steps
                .iter()
                .all(|step| step.when.is_none() && !step.run_by_coordinator())
        {
            return if problems.is_empty() {
                Ok(plan)
            } else {
                Err(problems)
            };
        }
        // Parents before children: a step's parents still to finish are its parents not
        // skipped; one with none is judged now if it has a condition. A step the
        // coordinator runs (`for_each`, `tasker.wait`, `tasker.task`, `one_failed`) waits to
        // be judged as if its condition were `true` (when it has none): it fans out, starts
        // waiting or starts its child then, by the coordinator after the task is written
        // when it has no parent to wait for.
        let task = condition_task(definition, priority, &new.tags);
        let no_parents = serde_json::json!({});
        for i in parent_first(parents) {
            plan.remaining[i] = parents[i]
                .iter()
                .filter(|&&parent| plan.skipped[parent].is_none())
                .count() as i32;
            if plan.skipped[i].is_some() {
                continue;
            }
            let by_coordinator = steps[i].run_by_coordinator();
            let condition = match &steps[i].when {
                Some(condition) => condition.as_str(),
                None if by_coordinator => "true",
                None => continue,
            };
            if plan.remaining[i] > 0 {
                plan.conditions[i] = Some(condition.to_owned());
                continue;
            }
            match evaluate_condition(condition, &new.context, &no_parents, &task) {
                Ok(true) if by_coordinator => plan.conditions[i] = Some("true".to_owned()),
                Ok(true) => {}
                Ok(false) => plan.skipped[i] = Some(TransitionReason::ConditionFalse),
                Err(error) => problems.push(Problem::new(
                    format!("steps[{i}].when"),
                    "expression_error",
                    format!("step `{}`: the condition {error}", steps[i].name),
                )),
            }
        }
        if problems.is_empty() {
            Ok(plan)
        } else {
            Err(problems)
        }
    }

    /// Whether step `i` is skipped at creation.
    fn skipped(&self, i: usize) -> bool {
        self.skipped.get(i).is_some_and(Option::is_some)
    }
}

/// The positions of a graph's steps, each after its parents (the graph has no cycle).
fn parent_first(parents: &[Vec<usize>]) -> Vec<usize> {
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); parents.len()];
    for (child, parents) in parents.iter().enumerate() {
        for &parent in parents {
            children[parent].push(child);
        }
    }
    let mut waiting: Vec<usize> = parents.iter().map(Vec::len).collect();
    let mut order: Vec<usize> = (0..parents.len()).filter(|&i| waiting[i] == 0).collect();
    let mut next = 0;
    while next < order.len() {
        for &child in &children[order[next]] {
            waiting[child] -= 1;
            if waiting[child] == 0 {
                order.push(child);
            }
        }
        next += 1;
    }
    order
}

impl Creation {
    /// Choose the ids for creating `new` from `template`, and evaluate its limit keys (the
    /// template's and its steps').
    ///
    /// # Errors
    ///
    /// Every problem at once: the `bypass_steps` entries that are no step or not
    /// skippable, the first steps' conditions that cannot be evaluated for this task, and
    /// the limit keys that cannot, named by step and key.
    pub fn new(
        template: Arc<TemplateRecord>,
        new: Arc<NewTask>,
        claim_lease_ms: Option<i64>,
        versions_known: Option<i32>,
    ) -> Result<Self, Vec<Problem>> {
        let limits = template.definition.limit_keys(KeyInputs {
            context: &new.context,
            tags: &new.tags,
            priority: new.priority.unwrap_or(template.definition.priority),
        });
        let timeout = template
            .definition
            .timeout_ms()
            .map(|ms| new.run_at.unwrap_or_else(Utc::now) + chrono::TimeDelta::milliseconds(ms));
        let deadline_at = match (new.deadline, timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let steps = &template.definition.steps;
        let step_ids: Vec<Uuid> = steps.iter().map(|_| Uuid::now_v7()).collect();
        let parents = template.definition.parent_indices();
        let plan = StepPlan::new(
            &template.definition,
            &parents,
            &new,
            new.priority.unwrap_or(template.definition.priority),
        );
        let (limits, plan) = match (limits, plan) {
            (Ok(limits), Ok(plan)) => (limits, plan),
            (limits, plan) => {
                let mut problems = plan.err().unwrap_or_default();
                problems.extend(limits.err().unwrap_or_default());
                return Err(problems);
            }
        };
        let (mut edge_from, mut edge_to) = (Vec::new(), Vec::new());
        for (child, parents) in parents.iter().enumerate() {
            for &parent in parents {
                edge_from.push(step_ids[parent]);
                edge_to.push(step_ids[child]);
            }
        }
        Ok(Self {
            template,
            new,
            claim_lease_ms,
            versions_known,
            task_id: Uuid::now_v7(),
            step_ids,
            edge_from,
            edge_to,
            parents,
            limits,
            deadline_at,
            plan,
        })
    }

    /// The id chosen for the task.
    pub fn task_id(&self) -> Uuid {
        self.task_id
    }

    /// The steps to claim with the task, when it claims at all: those with no parent to
    /// wait for, and not skipped. The claim hands back those the coordinator runs
    /// (`for_each`, `tasker.wait`, `tasker.task`) to be judged, once their time has come
    /// (else the dispatcher finds them when they are due).
    fn first_steps(&self) -> impl Iterator<Item = Uuid> + '_ {
        let claims = self.claim_lease_ms.is_some();
        self.roots()
            .filter(move |_| claims)
            .map(|i| self.step_ids[i])
    }

    /// The positions of the steps with no parent to wait for, and not skipped.
    fn roots(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.step_ids.len()).filter(|&i| self.plan.remaining[i] == 0 && !self.plan.skipped(i))
    }

    /// Whether its steps' claims count keys: its template has limits, or bounds the
    /// instances of a `for_each` (`max_parallel`).
    fn keyed(&self) -> bool {
        !self.limits.is_empty()
            || self
                .template
                .definition
                .steps
                .iter()
                .any(|step| step.max_parallel.is_some())
    }

    /// Whether every step is skipped at creation: the task is complete at once.
    fn all_skipped(&self) -> bool {
        (0..self.step_ids.len()).all(|i| self.plan.skipped(i))
    }

    /// The task's priority: the one asked for, else its template's.
    fn priority(&self) -> i16 {
        self.new
            .priority
            .unwrap_or(self.template.definition.priority)
    }

    /// The task as the statement wrote it: the request's fields, `pending`, created (and
    /// last changed) at `created_at`.
    fn record(&self, created_at: DateTime<Utc>) -> TaskRecord {
        let (definition, new) = (&self.template.definition, &self.new);
        TaskRecord {
            task_id: self.task_id,
            namespace: definition.namespace.clone(),
            name: definition.name.clone(),
            version: definition.version.clone(),
            status: TaskStatus::Pending,
            priority: self.priority(),
            context: new.context.clone(),
            initiator: new.initiator.clone(),
            source_system: new.source_system.clone(),
            reason: new.reason.clone(),
            tags: new.tags.clone(),
            idempotency_key: new.idempotency_key.clone(),
            created_at,
            updated_at: created_at,
            completed_at: None,
            run_at: new.run_at,
            deadline_at: self.deadline_at,
            parent_task_id: None,
        }
    }

    /// The task and its steps as the statement wrote them (built here, not read back),
    /// with the claimed ones' messages: started when a first step was claimed or taken up
    /// to be judged; or cancelled at once, by its template's concurrency (`on_limit:
    /// cancel_newest`).
    fn created(&self, written: Written) -> Created {
        let definition = &self.template.definition;
        let mut task = self.record(written.created_at);
        let cancelled = written.cancelled;
        let claimed: HashMap<Uuid, i32> = written
            .dispatches
            .iter()
            .map(|d| (d.message.step_id, d.message.attempt))
            .collect();
        if written.started() {
            task.status = TaskStatus::InProgress;
        }
        if cancelled {
            task.status = TaskStatus::Cancelled;
            task.completed_at = Some(task.updated_at);
        } else if self.all_skipped() {
            task.status = TaskStatus::Complete;
            task.completed_at = Some(task.updated_at);
        }
        let steps = definition
            .steps
            .iter()
            .zip(&self.step_ids)
            .zip(&self.parents)
            .enumerate()
            .map(|(i, ((step, step_id), parents))| StepRecord {
                step_id: *step_id,
                name: step.name.clone(),
                handler: step.handler.clone(),
                status: if self.plan.skipped(i) {
                    StepStatus::Skipped
                } else if cancelled {
                    StepStatus::Cancelled
                } else if claimed.contains_key(step_id) {
                    StepStatus::Enqueued
                } else {
                    StepStatus::Pending
                },
                attempts: claimed.get(step_id).copied().unwrap_or(0),
                retry_limit: step.retry_limit,
                deferrals: 0,
                retryable: step.retryable,
                timeout_ms: step.timeout_ms,
                // In template order, as reading the task back lists them.
                depends_on: parents
                    .iter()
                    .map(|&parent| definition.steps[parent].name.clone())
                    .collect(),
                results: None,
                results_omitted: false,
                results_size: None,
                last_error: None,
                // A first step of a task to run later is due then.
                next_attempt_at: self.new.run_at.filter(|at| {
                    self.plan.remaining[i] == 0 && !self.plan.skipped(i) && *at > Utc::now()
                }),
                started_at: None,
                completed_at: self.plan.skipped(i).then_some(task.created_at),
                instances: None,
                instance_of: None,
                index: None,
                child_task_id: None,
            })
            .collect();
        Created::New(task, steps, written.dispatches)
    }

    /// What became of this creation, given what its statement wrote of it (nothing: the
    /// idempotency key was taken).
    async fn outcome(&self, pool: &PgPool, written: Option<Written>) -> sqlx::Result<Created> {
        match written {
            Some(written) => Ok(self.created(written)),
            None => {
                let definition = &self.template.definition;
                let key = self.new.idempotency_key.as_deref().unwrap_or_default();
                let existing =
                    find_by_idempotency_key(pool, &definition.namespace, &definition.name, key)
                        .await?
                        .ok_or(sqlx::Error::RowNotFound)?;
                Ok(Created::Existing(existing))
            }
        }
    }
}

/// Whether an error is `tasker_create_tasks` refusing because a template's versions
/// changed.
fn template_changed(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(error) if error.code().as_deref() == Some(TEMPLATE_CHANGED))
}

/// Create a task with all its steps and edges in one statement: a batch of one (see
/// [`create_many`]), refused as [`Created::TemplateChanged`] when its template's versions
/// changed.
pub async fn create(pool: &PgPool, creation: &Creation) -> sqlx::Result<Created> {
    match create_many(pool, std::slice::from_ref(creation)).await {
        Err(error) if template_changed(&error) => Ok(Created::TemplateChanged),
        Err(error) => Err(error),
        Ok(mut outcomes) => outcomes.pop().ok_or(sqlx::Error::RowNotFound)?,
    }
}

/// Create tasks, each with all its steps and edges, and claim their first steps, in one
/// statement (`tasker_create_tasks`, which claims through `tasker_claim_steps`): one round
/// trip and one commit for them all. The outcomes are in the order of `creations`; each
/// can fail on its own only where a taken idempotency key sends it to read the task that
/// holds the key.
///
/// The statement writes all of them or nothing. When it fails, this fails, and nothing
/// was written: the caller may then create each on its own, as with a template whose
/// versions changed (`TK001`, refused for the whole batch here and answered per task by
/// [`create`]).
///
/// Once it has committed, the tasks exist, and this answers for each of them (failing
/// would make the caller write them a second time). What follows is tried three times
/// over a failure that may pass (a pool timeout, a deadlock) and then logged: reading
/// which tasks a limit cancelled at once (else answered as created); judging the first
/// steps the coordinator runs (else their dispatch lease runs out and the sweeper hands
/// them to the dispatcher, which judges them); finishing a task whose every step was
/// skipped (else it stays unfinished, named in the log).
pub async fn create_many(
    pool: &PgPool,
    creations: &[Creation],
) -> sqlx::Result<Vec<sqlx::Result<Created>>> {
    let rows = insert(pool, creations).await?;
    let lease_ms = creations
        .iter()
        .find_map(|creation| creation.claim_lease_ms);
    let mut created = written(&rows)?;
    // First steps the coordinator runs, handed back by the claim: fanned out (the first
    // instances claimed), waiting, or started as a child task, now. The first steps of
    // child tasks started here (`tasker.task`) go with the first creation that judged
    // any: the caller publishes each creation's dispatches.
    let mut to_judge = Vec::new();
    let mut judging = None;
    for creation in creations {
        if let Some(written) = created.get(&creation.task_id)
            && !written.to_judge.is_empty()
        {
            judging.get_or_insert(creation.task_id);
            to_judge.extend_from_slice(&written.to_judge);
        }
    }
    // A task its template's concurrency cancelled at once (on_limit: cancel_newest). Asked
    // for those templates only, by primary key.
    let limited: Vec<Uuid> = creations
        .iter()
        .filter(|creation| !creation.limits.task.is_empty())
        .map(|creation| creation.task_id)
        .collect();
    if !limited.is_empty() {
        let cancelled: Vec<Uuid> = again("reading which a limit cancelled", &limited, || {
            sqlx::query_scalar(
                "SELECT task_id FROM tasks WHERE task_id = ANY($1) AND status = 'cancelled'",
            )
            .bind(&limited)
            .fetch_all(pool)
        })
        .await
        .unwrap_or_default();
        for task_id in cancelled {
            if let Some(written) = created.get_mut(&task_id) {
                written.cancelled = true;
            }
        }
    }
    if let (false, Some(lease_ms)) = (to_judge.is_empty(), lease_ms) {
        // Judged in a transaction of its own: a failed try changed nothing.
        let judged = again("judging their first steps", &to_judge, || {
            crate::store::transitions::judge_steps(pool, to_judge.clone(), lease_ms)
        })
        .await
        .unwrap_or_default();
        for dispatch in judged {
            let task_id = if created.contains_key(&dispatch.message.task_id) {
                dispatch.message.task_id
            } else {
                judging.unwrap_or_default()
            };
            if let Some(written) = created.get_mut(&task_id) {
                written.dispatches.push(dispatch);
            }
        }
    }
    // A task whose every step was skipped at creation is complete at once.
    let all_skipped: Vec<Uuid> = creations
        .iter()
        .filter(|creation| creation.all_skipped() && created.contains_key(&creation.task_id))
        .map(|creation| creation.task_id)
        .collect();
    if !all_skipped.is_empty() {
        let _ = again(
            "finishing those whose every step was skipped",
            &all_skipped,
            || async {
                let mut tx = pool.begin().await?;
                // No new task has a parent: nothing is left for the dispatcher.
                crate::store::transitions::finish_tasks(&mut tx, &all_skipped, None).await?;
                tx.commit().await
            },
        )
        .await;
    }
    let mut outcomes = Vec::with_capacity(creations.len());
    for creation in creations {
        let written = created.remove(&creation.task_id);
        outcomes.push(creation.outcome(pool, written).await);
    }
    Ok(outcomes)
}

/// Run `op` (a read, or a transaction of its own: a failed try changes nothing) up to
/// three times; the last failure is logged, with `what` was not done and the `ids` (of
/// tasks or steps) it was for.
async fn again<T, F, Fut>(what: &str, ids: &[Uuid], op: F) -> sqlx::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = sqlx::Result<T>>,
{
    use backon::{ExponentialBuilder, Retryable};
    let policy = ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_millis(50))
        .with_max_times(2);
    op.retry(policy).await.inspect_err(|error| {
        tracing::error!(%error, ?ids, "tasks created, but {what} failed");
    })
}

/// A child task [`create_children`] created.
#[derive(Debug)]
pub(crate) struct NewChild {
    /// The child.
    pub task_id: Uuid,
    /// Its first steps, claimed.
    pub dispatches: Vec<Dispatch>,
    /// Its first steps the coordinator runs, to judge.
    pub to_judge: Vec<Uuid>,
    /// Every step was skipped at creation: it is to finish at once.
    pub all_skipped: bool,
}

/// Create child tasks (without idempotency keys) in the caller's transaction, claiming
/// their first steps: what [`create_many`] writes, in one statement, without judging or
/// finishing anything (the caller does, in the same transaction).
pub(crate) async fn create_children(
    conn: &mut sqlx::PgConnection,
    creations: &[Creation],
) -> sqlx::Result<Vec<NewChild>> {
    let rows = insert(&mut *conn, creations).await?;
    let mut created = written(&rows)?;
    Ok(creations
        .iter()
        .map(|creation| {
            let written = created.remove(&creation.task_id).unwrap_or_default();
            NewChild {
                task_id: creation.task_id,
                dispatches: written.dispatches,
                to_judge: written.to_judge,
                all_skipped: creation.all_skipped(),
            }
        })
        .collect())
}

/// What `tasker_create_tasks` wrote of one task: when, and its first steps as the claim
/// returned them.
#[derive(Default)]
struct Written {
    created_at: DateTime<Utc>,
    /// Claimed: to publish.
    dispatches: Vec<Dispatch>,
    /// Steps the coordinator runs, to judge.
    to_judge: Vec<Uuid>,
    /// Its template's concurrency cancelled it at once (`on_limit: cancel_newest`).
    cancelled: bool,
}

impl Written {
    /// Whether the claim started the task: a first step claimed or taken up to be judged
    /// (else it waits for its time or for a key of its template's concurrency).
    fn started(&self) -> bool {
        !self.dispatches.is_empty() || !self.to_judge.is_empty()
    }
}

/// What `tasker_create_tasks` wrote of each task it created, from its rows.
fn written(rows: &[PgRow]) -> sqlx::Result<HashMap<Uuid, Written>> {
    let mut tasks: HashMap<Uuid, Written> = HashMap::new();
    for row in rows {
        let task_id: Uuid = row.try_get("created_task_id")?;
        let steps = match tasks.entry(task_id) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(Written {
                created_at: row.try_get("created_at")?,
                ..Written::default()
            }),
        };
        match first_step_in(row)? {
            Some(FirstStep::Claimed(dispatch)) => steps.dispatches.push(*dispatch),
            Some(FirstStep::ToJudge(step_id)) => steps.to_judge.push(step_id),
            None => {}
        }
    }
    Ok(tasks)
}

/// Write `creations` with `tasker_create_tasks`: one row per claimed first step of each
/// created task (one with a NULL step for a task with none), none for a task whose
/// idempotency key was taken.
async fn insert<'e>(
    db: impl PgExecutor<'e>,
    creations: &[Creation],
) -> sqlx::Result<Vec<sqlx::postgres::PgRow>> {
    let mut tasks = TaskColumns::default();
    let mut steps = StepColumns::default();
    let (mut edge_task_ids, mut edge_from, mut edge_to) = (Vec::new(), Vec::new(), Vec::new());
    for creation in creations {
        tasks.push(creation);
        steps.push(creation);
        edge_task_ids.extend(creation.edge_from.iter().map(|_| creation.task_id));
        edge_from.extend_from_slice(&creation.edge_from);
        edge_to.extend_from_slice(&creation.edge_to);
    }
    // Every claim in one batch has the publisher's one lease.
    let lease_ms = creations
        .iter()
        .find_map(|creation| creation.claim_lease_ms);
    let first_steps: Vec<Uuid> = creations.iter().flat_map(Creation::first_steps).collect();
    let step_limits = creations
        .iter()
        .any(|creation| !creation.limits.steps.is_empty());
    let keyed = creations.iter().any(Creation::keyed);
    // Whether a step is skipped at creation or waits to judge a condition.
    let shapes = creations.iter().any(|creation| {
        creation.plan.skipped.iter().any(Option::is_some)
            || creation.plan.conditions.iter().any(Option::is_some)
    });
    sqlx::query(
        "SELECT * \
         FROM tasker_create_tasks($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
                                  $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, \
                                  $27, $28, $29, $30, $31, $32, $33, $34, $35, $36, $37, $38, \
                                  $39, $40, $41, $42, $43, $44, $45, $46, $47, $48)",
    )
    .bind(tasks.task_ids)
    .bind(tasks.template_ids)
    .bind(tasks.namespaces)
    .bind(tasks.names)
    .bind(tasks.versions)
    .bind(tasks.contexts)
    .bind(tasks.initiators)
    .bind(tasks.source_systems)
    .bind(tasks.reasons)
    .bind(tasks.tags)
    .bind(tasks.idempotency_keys)
    .bind(tasks.trace_parents)
    .bind(tasks.versions_known)
    .bind(steps.task_ids)
    .bind(steps.positions)
    .bind(steps.step_ids)
    .bind(steps.names)
    .bind(steps.handlers)
    .bind(steps.configs)
    .bind(steps.parents)
    .bind(steps.retry_limits)
    .bind(steps.retryable)
    .bind(steps.timeouts_ms)
    .bind(steps.backoff_base_ms)
    .bind(steps.backoff_max_ms)
    .bind(steps.backoff_jitter)
    .bind(steps.backoff_schedules)
    .bind(steps.max_deferrals)
    .bind(edge_task_ids)
    .bind(edge_from)
    .bind(edge_to)
    .bind(first_steps)
    .bind(lease_ms)
    .bind(tasks.priorities)
    // Without step limits in the batch, their columns go as NULL: no array of NULLs to
    // encode and decode per step.
    .bind(step_limits.then_some(steps.concurrency_keys))
    .bind(step_limits.then_some(steps.concurrency_limits))
    .bind(step_limits.then_some(steps.rate_keys))
    .bind(step_limits.then_some(steps.rate_limits))
    .bind(step_limits.then_some(steps.rate_windows_ms))
    .bind(tasks.limit_task_ids)
    .bind(tasks.limit_keys)
    .bind(tasks.limit_limits)
    .bind(tasks.limit_on_limit)
    .bind(tasks.run_at)
    .bind(tasks.deadlines)
    .bind(shapes.then_some(steps.skipped))
    .bind(shapes.then_some(steps.conditions))
    .bind(keyed.then_some(tasks.keyed))
    .fetch_all(db)
    .await
}

/// The task columns of a batch, one entry per task.
#[derive(Default)]
struct TaskColumns<'a> {
    task_ids: Vec<Uuid>,
    template_ids: Vec<i64>,
    namespaces: Vec<&'a str>,
    names: Vec<&'a str>,
    versions: Vec<&'a str>,
    contexts: Vec<&'a Value>,
    initiators: Vec<Option<&'a str>>,
    source_systems: Vec<Option<&'a str>>,
    reasons: Vec<Option<&'a str>>,
    tags: Vec<&'a Value>,
    idempotency_keys: Vec<Option<&'a str>>,
    trace_parents: Vec<Option<&'a str>>,
    versions_known: Vec<Option<i32>>,
    priorities: Vec<i16>,
    /// The tasks' template concurrency limits, one entry per limit (of the task in
    /// `limit_task_ids`).
    limit_task_ids: Vec<Uuid>,
    limit_keys: Vec<&'a str>,
    limit_limits: Vec<i32>,
    limit_on_limit: Vec<&'static str>,
    run_at: Vec<Option<DateTime<Utc>>>,
    deadlines: Vec<Option<DateTime<Utc>>>,
    /// Whether the task's template has limits (a step's or its own).
    keyed: Vec<bool>,
}

impl<'a> TaskColumns<'a> {
    fn push(&mut self, creation: &'a Creation) {
        let (definition, new) = (&creation.template.definition, &creation.new);
        self.task_ids.push(creation.task_id);
        self.template_ids.push(creation.template.template_id);
        self.namespaces.push(&definition.namespace);
        self.names.push(&definition.name);
        self.versions.push(&definition.version);
        self.contexts.push(&new.context);
        self.initiators.push(new.initiator.as_deref());
        self.source_systems.push(new.source_system.as_deref());
        self.reasons.push(new.reason.as_deref());
        self.tags.push(&new.tags);
        self.idempotency_keys.push(new.idempotency_key.as_deref());
        self.trace_parents.push(new.trace_parent.as_deref());
        self.versions_known.push(creation.versions_known);
        self.priorities.push(creation.priority());
        self.run_at.push(new.run_at);
        self.keyed.push(creation.keyed());
        self.deadlines.push(creation.deadline_at);
        for limit in &creation.limits.task {
            self.limit_task_ids.push(creation.task_id);
            self.limit_keys.push(&limit.key);
            self.limit_limits.push(limit.limit);
            self.limit_on_limit.push(limit.on_limit.as_str());
        }
    }
}

/// The step columns of a batch, one entry per step of every task.
#[derive(Default)]
struct StepColumns<'a> {
    task_ids: Vec<Uuid>,
    positions: Vec<i32>,
    step_ids: Vec<Uuid>,
    names: Vec<&'a str>,
    handlers: Vec<&'a str>,
    configs: Vec<&'a Value>,
    parents: Vec<i32>,
    retry_limits: Vec<i32>,
    retryable: Vec<bool>,
    timeouts_ms: Vec<i64>,
    backoff_base_ms: Vec<i64>,
    backoff_max_ms: Vec<i64>,
    backoff_jitter: Vec<bool>,
    backoff_schedules: Vec<Value>,
    max_deferrals: Vec<i32>,
    concurrency_keys: Vec<Option<&'a str>>,
    concurrency_limits: Vec<Option<i32>>,
    rate_keys: Vec<Option<&'a str>>,
    rate_limits: Vec<Option<i32>>,
    rate_windows_ms: Vec<Option<i32>>,
    skipped: Vec<Option<&'static str>>,
    conditions: Vec<Option<&'a str>>,
}

impl<'a> StepColumns<'a> {
    fn push(&mut self, creation: &'a Creation) {
        let steps = &creation.template.definition.steps;
        for (position, (step, step_id)) in steps.iter().zip(&creation.step_ids).enumerate() {
            self.task_ids.push(creation.task_id);
            self.positions.push(position as i32);
            self.step_ids.push(*step_id);
            self.names.push(&step.name);
            self.handlers.push(&step.handler);
            self.configs.push(&step.config);
            self.parents.push(creation.plan.remaining[position]);
            self.skipped
                .push(creation.plan.skipped[position].map(TransitionReason::as_str));
            self.conditions
                .push(creation.plan.conditions[position].as_deref());
            self.retry_limits.push(step.retry_limit);
            self.retryable.push(step.retryable);
            self.timeouts_ms.push(step.timeout_ms);
            self.backoff_base_ms.push(step.backoff.base_ms);
            self.backoff_max_ms.push(step.backoff.max_ms);
            self.backoff_jitter.push(step.backoff.jitter);
            self.backoff_schedules
                .push(serde_json::json!(step.backoff.schedule_ms));
            self.max_deferrals.push(step.max_deferrals);
            let limits = creation.limits.steps.get(position);
            let concurrency = limits.and_then(|l| l.concurrency.as_ref());
            let rate = limits.and_then(|l| l.rate.as_ref());
            self.concurrency_keys
                .push(concurrency.map(|(key, _)| key.as_str()));
            self.concurrency_limits
                .push(concurrency.map(|(_, limit)| *limit));
            self.rate_keys.push(rate.map(|(key, _, _)| key.as_str()));
            self.rate_limits.push(rate.map(|(_, limit, _)| *limit));
            self.rate_windows_ms
                .push(rate.map(|(_, _, window)| *window));
        }
    }
}

/// The task of template `namespace`/`name` created with idempotency key `key`, if any.
pub async fn find_by_idempotency_key(
    pool: &PgPool,
    namespace: &str,
    name: &str,
    key: &str,
) -> sqlx::Result<Option<TaskRecord>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE namespace = $1 AND name = $2 AND idempotency_key = $3"
    )))
    .bind(namespace)
    .bind(name)
    .bind(key)
    .fetch_optional(pool)
    .await
}

/// One task.
pub async fn get<'e>(db: impl PgExecutor<'e>, task_id: Uuid) -> sqlx::Result<Option<TaskRecord>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE task_id = $1"
    )))
    .bind(task_id)
    .fetch_optional(db)
    .await
}

/// Most bytes of JSON one answer carries of the values whose size its caller cannot
/// bound: the step results of [`steps_with_results`], the task contexts of a page of
/// [`list`].
pub const MAX_PAGE_JSON_BYTES: i64 = 16 * 1024 * 1024;

/// What wraps a query of a page's rows and one more (`SELECT … ORDER BY {key}
/// {direction} LIMIT n + 1`), in front and behind, so that it returns only the rows whose
/// `json` column, with the rows before them, fits in [`MAX_PAGE_JSON_BYTES`] (the first
/// row always), each as a [`Budgeted`] row. [`budgeted_page`] makes the page of them.
pub(crate) fn page_budget(json: &str, key: &str, direction: &str) -> (String, String) {
    (
        format!(
            "SELECT * FROM (SELECT p.*, count(*) OVER () AS fetched, \
                    row_number() OVER w AS place, \
                    sum(octet_length(p.{json}::text)) OVER w AS listed_through \
             FROM ("
        ),
        format!(
            ") p WINDOW w AS (ORDER BY p.{key} {direction} ROWS UNBOUNDED PRECEDING)) q \
             WHERE q.place = 1 OR q.listed_through <= {MAX_PAGE_JSON_BYTES} \
             ORDER BY q.{key} {direction}"
        ),
    )
}

/// A row of a query wrapped by [`page_budget`]: the row, with how many rows the wrapped
/// query read.
#[derive(sqlx::FromRow)]
pub(crate) struct Budgeted<T> {
    #[sqlx(flatten)]
    pub(crate) row: T,
    fetched: i64,
}

/// The page of at most `limit` rows that `rows` (read through [`page_budget`]) make, and
/// whether another page follows: there was a row past the limit, or the budget cut the
/// rows read short.
pub(crate) fn budgeted_page<T>(rows: Vec<Budgeted<T>>, limit: i64) -> (Vec<T>, bool) {
    let fetched = rows.first().map_or(0, |row| row.fetched);
    let mut page: Vec<T> = rows.into_iter().map(|row| row.row).collect();
    let cut = page.len() as i64 > limit;
    if cut {
        page.truncate(limit as usize);
    }
    let more = cut || (page.len() as i64) < fetched;
    (page, more)
}

/// A task's steps in template order, each with the names of its parents, without their
/// results (`results_omitted` where they have some): for a reader of statuses.
pub async fn steps<'e>(db: impl PgExecutor<'e>, task_id: Uuid) -> sqlx::Result<Vec<StepRecord>> {
    sqlx::query_as(include_str!("../../sql/tasks/steps.sql"))
        .bind(task_id)
        .bind(None::<&str>)
        .bind(false)
        .bind(false)
        .fetch_all(db)
        .await
}

/// A task's steps in template order, each with the names of its parents and with its
/// results while they fit in [`MAX_PAGE_JSON_BYTES`] with those already taken: a step
/// whose results would pass it is left out (`results_omitted`, to be read with [`step`])
/// and the later ones are still taken if they fit. So one read of a task whose steps
/// hold gigabytes of results stays bounded.
pub async fn steps_with_results(
    conn: &mut PgConnection,
    task_id: Uuid,
) -> sqlx::Result<Vec<StepRecord>> {
    let mut steps: Vec<StepRecord> = sqlx::query_as(include_str!("../../sql/tasks/steps.sql"))
        .bind(task_id)
        .bind(None::<&str>)
        .bind(false)
        .bind(true)
        .fetch_all(&mut *conn)
        .await?;
    let mut room = MAX_PAGE_JSON_BYTES;
    let mut taken = Vec::new();
    for step in &steps {
        if let Some(size) = step.results_size.filter(|size| *size <= room) {
            room -= size;
            taken.push(step.step_id);
        }
    }
    if taken.is_empty() {
        return Ok(steps);
    }
    let mut results: HashMap<Uuid, Value> = sqlx::query_as(
        "SELECT step_id, results FROM steps WHERE step_id = ANY ($1) AND results IS NOT NULL",
    )
    .bind(&taken)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    for step in &mut steps {
        if let Some(results) = results.remove(&step.step_id) {
            step.results = Some(results);
            step.results_omitted = false;
        }
    }
    Ok(steps)
}

/// The step `name` of task `task_id`, with its results whole.
pub async fn step<'e>(
    db: impl PgExecutor<'e>,
    task_id: Uuid,
    name: &str,
) -> sqlx::Result<Option<StepRecord>> {
    sqlx::query_as(include_str!("../../sql/tasks/steps.sql"))
        .bind(task_id)
        .bind(name)
        .bind(true)
        .bind(false)
        .fetch_optional(db)
        .await
}

/// The child tasks of task `task_id` (started by its `tasker.task` steps), oldest first.
pub async fn children<'e>(db: impl PgExecutor<'e>, task_id: Uuid) -> sqlx::Result<Vec<ChildTask>> {
    sqlx::query_as(
        "SELECT c.task_id, s.name AS step, c.namespace, c.name, c.version, c.status, \
                c.created_at, c.completed_at \
         FROM tasks c JOIN steps s ON s.step_id = c.parent_step_id \
         WHERE c.parent_task_id = $1 ORDER BY c.task_id",
    )
    .bind(task_id)
    .fetch_all(db)
    .await
}

/// Which tasks to read, list or operate on. Every criterion narrows; none is "every task".
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Only this template name.
    pub name: Option<String>,
    /// Only tasks in one of these statuses (empty: any status).
    pub statuses: Vec<TaskStatus>,
    /// Only tasks whose `tags` hold every one of these (JSON containment).
    pub tags: Vec<String>,
    /// Only tasks created after this instant.
    pub created_after: Option<DateTime<Utc>>,
    /// Only tasks created before this instant.
    pub created_before: Option<DateTime<Utc>>,
}

/// The order of [`list`]: by creation, which for a UUIDv7 `task_id` is `task_id` order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Order {
    /// Oldest first (`order=created_at`).
    Oldest,
    /// Newest first (`order=-created_at`, the default).
    #[default]
    Newest,
}

/// One page of [`list`]: where it starts, how long it is, in which order.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    /// Only tasks after this one in `order` (the previous page's cursor).
    pub cursor: Option<Uuid>,
    /// At most this many.
    pub limit: i64,
    /// Oldest or newest first.
    pub order: Order,
}

/// How far the coordinator's clock (which stamps `task_id`) and the database's (which
/// stamps `created_at`) may disagree. The time window is applied exactly to
/// `created_at`; this margin widens the `task_id` range that bounds the index scan, so
/// a skew below it never drops a task from the window.
const CLOCK_MARGIN: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// The smallest UUIDv7 of the millisecond `at` (every id made then or later is larger).
fn first_id_at(at: DateTime<Utc>) -> Uuid {
    let ms = u64::try_from(at.timestamp_millis()).unwrap_or(0) & 0xFFFF_FFFF_FFFF;
    Uuid::from_u128(u128::from(ms) << 80)
}

/// `SELECT <columns> FROM tasks WHERE <filter>`: only the criteria given are written,
/// so the planner sees plain equalities and ranges and picks `tasks_by_status`
/// (`status, task_id`), `tasks_by_template` (`namespace, name, task_id`) or the primary
/// key, each ordered by `task_id`. The time window becomes a `task_id` range (UUIDv7
/// ids sort by creation) widened by [`CLOCK_MARGIN`], and the exact `created_at` test.
fn select_where(columns: &str, filter: &TaskFilter) -> sqlx::QueryBuilder<sqlx::Postgres> {
    filter_into(
        sqlx::QueryBuilder::new(format!("SELECT {columns} FROM tasks WHERE TRUE")),
        filter,
    )
}

/// `query`, which ends in a `WHERE` clause, with `filter`'s criteria added to it.
fn filter_into(
    mut query: sqlx::QueryBuilder<sqlx::Postgres>,
    filter: &TaskFilter,
) -> sqlx::QueryBuilder<sqlx::Postgres> {
    if let Some(namespace) = &filter.namespace {
        query.push(" AND namespace = ").push_bind(namespace.clone());
    }
    if let Some(name) = &filter.name {
        query.push(" AND name = ").push_bind(name.clone());
    }
    match filter.statuses.as_slice() {
        [] => {}
        [status] => {
            query.push(" AND status = ").push_bind(*status);
        }
        statuses => {
            let names: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
            query.push(" AND status = ANY(").push_bind(names).push(")");
        }
    }
    if !filter.tags.is_empty() {
        query
            .push(" AND tags @> ")
            .push_bind(Value::from(filter.tags.clone()));
    }
    if let Some(after) = filter.created_after {
        query
            .push(" AND task_id >= ")
            .push_bind(first_id_at(after - CLOCK_MARGIN))
            .push(" AND created_at > ")
            .push_bind(after);
    }
    if let Some(before) = filter.created_before {
        query
            .push(" AND task_id < ")
            .push_bind(first_id_at(before + CLOCK_MARGIN))
            .push(" AND created_at < ")
            .push_bind(before);
    }
    query
}

/// Tasks matching `filter`, one page at a time in `page.order`: returns the page and
/// the cursor of the next (pass it back with the same filter and order). A page ends
/// early, with a cursor, once its tasks' contexts pass [`MAX_PAGE_JSON_BYTES`] (the first
/// task always comes).
pub async fn list(
    pool: &PgPool,
    filter: &TaskFilter,
    page: Page,
) -> sqlx::Result<(Vec<TaskRecord>, Option<Uuid>)> {
    let (after, direction) = match page.order {
        Order::Oldest => (">", "ASC"),
        Order::Newest => ("<", "DESC"),
    };
    // The page's tasks (one more, to know whether more follow), then only those whose
    // contexts, with those before them, fit in the budget: the first always.
    let (head, tail) = page_budget("context", "task_id", direction);
    let mut query = filter_into(
        sqlx::QueryBuilder::new(format!("{head}SELECT {TASK_COLUMNS} FROM tasks WHERE TRUE")),
        filter,
    );
    if let Some(cursor) = page.cursor {
        query
            .push(format_args!(" AND task_id {after} "))
            .push_bind(cursor);
    }
    query
        .push(format_args!(" ORDER BY task_id {direction} LIMIT "))
        .push_bind(page.limit + 1)
        .push(tail);
    let rows: Vec<Budgeted<TaskRecord>> = query.build_query_as().fetch_all(pool).await?;
    let (tasks, more) = budgeted_page(rows, page.limit);
    let next = more.then(|| tasks.last().map(|t| t.task_id)).flatten();
    Ok((tasks, next))
}

/// The ids of the oldest `limit` tasks matching `filter` (what a bulk operation acts on).
pub async fn matching_ids(
    pool: &PgPool,
    filter: &TaskFilter,
    limit: i64,
) -> sqlx::Result<Vec<Uuid>> {
    let mut query = select_where("task_id", filter);
    query.push(" ORDER BY task_id ASC LIMIT ").push_bind(limit);
    query.build_query_scalar().fetch_all(pool).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_id_of_a_millisecond_sorts_before_ids_made_then() {
        let at = Utc::now();
        let id = Uuid::now_v7();
        assert!(first_id_at(at) <= id);
        assert!(first_id_at(at + chrono::TimeDelta::seconds(1)) > id);
        assert_eq!(first_id_at(at).get_version_num(), 0, "a bound, not an id");
    }
}
