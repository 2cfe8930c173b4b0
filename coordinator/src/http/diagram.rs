//! `GET /v1/templates/{namespace}/{name}/diagram` and `GET /v1/tasks/{task_id}/diagram`:
//! a Mermaid `flowchart TD` with a node per step and an edge from each parent; a task's
//! nodes are labelled and coloured (`classDef`) by step status.
//!
//! Step names are the template author's text and the diagram is rendered by whatever
//! reads it, so nothing of a name reaches the diagram unescaped: node ids are the name
//! only when it is a plain identifier (and no Mermaid keyword), else `step_<n>`, and the
//! name itself appears only inside a quoted label, with Mermaid's entity codes for the
//! characters that could end the label or be read as markup.

use std::collections::HashMap;
use std::fmt::Write as _;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::body::path_rejection;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::tasks::{parse_task_id, snapshot};
use tasker_shared::store::tasks;

/// The media type of a Mermaid diagram.
pub(crate) const MERMAID: &str = "text/vnd.mermaid";

/// The colours of the task diagram's step statuses (Mermaid `classDef` bodies).
const CLASS_DEFS: &[(&str, &str)] = &[
    ("complete", "fill:#d4edda,stroke:#28a745,color:#155724"),
    ("error", "fill:#f8d7da,stroke:#dc3545,color:#721c24"),
    ("in_progress", "fill:#cce5ff,stroke:#0d6efd,color:#084298"),
    (
        "enqueued",
        "fill:#e7f1ff,stroke:#0d6efd,color:#084298,stroke-dasharray:4 2",
    ),
    (
        "waiting_for_retry",
        "fill:#ffe5d0,stroke:#fd7e14,color:#8a4500",
    ),
    ("pending", "fill:#eeeeee,stroke:#9e9e9e,color:#424242"),
    (
        "cancelled",
        "fill:#f5f5f5,stroke:#343a40,color:#6c757d,stroke-dasharray:5 5",
    ),
    (
        "resolved_manually",
        "fill:#e2d9f3,stroke:#6f42c1,color:#3d2373",
    ),
    (
        "skipped",
        "fill:#fafafa,stroke:#bdbdbd,color:#9e9e9e,stroke-dasharray:2 2",
    ),
];

/// Words a Mermaid flowchart does not accept as a node id.
const MERMAID_KEYWORDS: &[&str] = &[
    "end",
    "graph",
    "flowchart",
    "subgraph",
    "style",
    "class",
    "classdef",
    "click",
    "linkstyle",
    "direction",
    "default",
    "call",
    "href",
];

/// One node of a diagram.
pub(crate) struct Node<'a> {
    pub(crate) name: &'a str,
    pub(crate) depends_on: &'a [String],
    /// The step's status, for a task's diagram.
    pub(crate) status: Option<&'a str>,
    /// The label's second line when not the status (a group of instances).
    pub(crate) detail: Option<&'a str>,
}

/// A Mermaid `flowchart TD`: `title` as a comment, a node per step (labelled
/// `name<br/>status` when it has a status, with that status's class), an edge from each
/// parent, and a `classDef` for each status shown.
pub(crate) fn flowchart(title: &str, nodes: &[Node<'_>]) -> String {
    let names: Vec<&str> = nodes.iter().map(|n| n.name).collect();
    let ids = node_ids(&names);
    let id_of: HashMap<&str, &str> = names
        .iter()
        .zip(&ids)
        .map(|(name, id)| (*name, id.as_str()))
        .collect();
    let mut out = String::from("flowchart TD\n");
    let _ = writeln!(out, "    %% {}", title.replace(['\n', '\r'], " "));
    let mut used: Vec<&str> = Vec::new();
    for (node, id) in nodes.iter().zip(&ids) {
        let _ = write!(out, "    {id}[\"{}", escape(node.name));
        if let Some(status) = node.status {
            let _ = write!(out, "<br/>{}\"]", escape(node.detail.unwrap_or(status)));
            if let Some((class, _)) = CLASS_DEFS.iter().find(|(class, _)| *class == status) {
                let _ = write!(out, ":::{class}");
                if !used.contains(class) {
                    used.push(class);
                }
            }
        } else {
            out.push_str("\"]");
        }
        out.push('\n');
    }
    for (node, id) in nodes.iter().zip(&ids) {
        for parent in node.depends_on {
            if let Some(parent) = id_of.get(parent.as_str()) {
                let _ = writeln!(out, "    {parent} --> {id}");
            }
        }
    }
    for (class, body) in CLASS_DEFS {
        if used.contains(class) {
            let _ = writeln!(out, "    classDef {class} {body}");
        }
    }
    out
}

/// Node ids: the step's name where Mermaid takes it as an id, else `step_<n>`.
fn node_ids(names: &[&str]) -> Vec<String> {
    let safe = |name: &str| {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !MERMAID_KEYWORDS.contains(&name.to_ascii_lowercase().as_str())
    };
    let mut ids: Vec<String> = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let mut id = if safe(name) {
            (*name).to_owned()
        } else {
            format!("step_{}", i + 1)
        };
        while ids.contains(&id) {
            id.push('_');
        }
        ids.push(id);
    }
    ids
}

/// Text safe inside a quoted Mermaid label: the quote, markup and entity characters as
/// Mermaid entity codes, control characters as spaces.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("#quot;"),
            '<' => out.push_str("#lt;"),
            '>' => out.push_str("#gt;"),
            '#' => out.push_str("#35;"),
            '&' => out.push_str("#amp;"),
            '`' => out.push_str("#96;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn mermaid(text: String) -> Response {
    ([(CONTENT_TYPE, format!("{MERMAID}; charset=utf-8"))], text).into_response()
}

/// A template's steps as a Mermaid flowchart: `?version=` or the latest.
#[utoipa::path(
    get,
    path = "/v1/templates/{namespace}/{name}/diagram",
    tag = "templates",
    operation_id = "template_diagram",
    params(
        ("namespace" = String, Path, description = "The template's namespace."),
        ("name" = String, Path, description = "The template's name."),
        ("version" = Option<String>, Query, description = "An exact version; the highest by semver when absent."),
    ),
    responses(
        (status = 200, description = "A Mermaid `flowchart TD`: a node per step, an edge from each step it depends on.",
            body = String, content_type = "text/vnd.mermaid",
            example = json!("flowchart TD\n    %% template billing/charge 1.0.0\n    authorize[\"authorize\"]\n    capture[\"capture\"]\n    authorize --> capture\n")),
        (status = 400, description = "`malformed_request`: an unknown query parameter.", body = ErrorBody),
        (status = 404, description = "`template_not_found`.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn template(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<Response> {
    let template = super::templates::requested(&state, path, query).await?;
    let definition = &template.definition;
    let nodes: Vec<Node<'_>> = definition
        .steps
        .iter()
        .map(|step| Node {
            name: &step.name,
            depends_on: &step.depends_on,
            status: None,
            detail: None,
        })
        .collect();
    let title = format!(
        "template {}/{} {}",
        definition.namespace, definition.name, definition.version
    );
    Ok(mermaid(flowchart(&title, &nodes)))
}

/// A task's steps as a Mermaid flowchart, each node labelled and coloured by status.
#[utoipa::path(
    get,
    path = "/v1/tasks/{task_id}/diagram",
    tag = "operate",
    operation_id = "task_diagram",
    params(("task_id" = Uuid, Path, description = "The task's id.")),
    responses(
        (status = 200, description = "A Mermaid `flowchart TD`: a node per step labelled `name<br/>status` with the class of its status (`classDef complete`, `error`, `in_progress`, `enqueued`, `waiting_for_retry`, `pending`, `cancelled`, `resolved_manually`, `skipped`, each defined when used), an edge from each step it depends on.",
            body = String, content_type = "text/vnd.mermaid",
            example = json!("flowchart TD\n    %% task 019ae3c2-0000-7000-8000-000000000001 billing/charge 1.0.0: in_progress\n    authorize[\"authorize<br/>complete\"]:::complete\n    capture[\"capture<br/>in_progress\"]:::in_progress\n    authorize --> capture\n    classDef complete fill:#d4edda,stroke:#28a745,color:#155724\n    classDef in_progress fill:#cce5ff,stroke:#0d6efd,color:#084298\n")),
        (status = 400, description = "`malformed_request`: `task_id` is not a UUID.", body = ErrorBody),
        (status = 404, description = "`task_not_found`.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn task(
    State(state): State<AppState>,
    task_id: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let Path(task_id) = task_id.map_err(path_rejection)?;
    let task_id = parse_task_id(&task_id)?;
    // Task and steps in one snapshot, so the title and the nodes agree.
    let (task, steps) = state
        .db
        .run(async |conn| {
            let (mut tx, task) = snapshot(conn, task_id).await?;
            let steps = tasks::steps(&mut *tx, task_id).await?;
            tx.commit().await?;
            Ok::<_, ApiError>((task, steps))
        })
        .await?;
    let drawn = grown(&steps);
    let nodes: Vec<Node<'_>> = drawn
        .iter()
        .map(|node| Node {
            name: &node.name,
            depends_on: &node.depends_on,
            status: Some(node.status),
            detail: node.detail.as_deref(),
        })
        .collect();
    let title = format!(
        "task {} {}/{} {}: {}",
        task.task_id, task.namespace, task.name, task.version, task.status
    );
    Ok(mermaid(flowchart(&title, &nodes)))
}

/// More instances of one `for_each` step than this are drawn as one node.
const MAX_DRAWN_INSTANCES: usize = 12;

/// A node of a task's grown graph.
struct Drawn {
    name: String,
    depends_on: Vec<String>,
    status: &'static str,
    detail: Option<String>,
}

/// A task's steps as drawn: a `for_each` step's instances between its parents and the
/// step itself, which gathers them; past [`MAX_DRAWN_INSTANCES`], one node for them all,
/// coloured by the most pressing status among them and labelled with their counts.
fn grown(steps: &[tasks::StepRecord]) -> Vec<Drawn> {
    let mut instances: HashMap<&str, Vec<&tasks::StepRecord>> = HashMap::new();
    for step in steps {
        if let Some(of) = &step.instance_of {
            instances.entry(of.as_str()).or_default().push(step);
        }
    }
    let mut drawn = Vec::with_capacity(steps.len());
    for step in steps.iter().filter(|step| step.instance_of.is_none()) {
        let Some(group) = instances.get(step.name.as_str()) else {
            drawn.push(Drawn {
                name: step.name.clone(),
                depends_on: step.depends_on.clone(),
                status: step.status.as_str(),
                detail: None,
            });
            continue;
        };
        let gathered = if group.len() <= MAX_DRAWN_INSTANCES {
            for instance in group {
                drawn.push(Drawn {
                    name: instance.name.clone(),
                    depends_on: step.depends_on.clone(),
                    status: instance.status.as_str(),
                    detail: None,
                });
            }
            group.iter().map(|instance| instance.name.clone()).collect()
        } else {
            let name = format!("{}[0…{}]", step.name, group.len() - 1);
            let mut counts: Vec<(&'static str, usize)> = Vec::new();
            for instance in group {
                let status = instance.status.as_str();
                match counts.iter_mut().find(|(s, _)| *s == status) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((status, 1)),
                }
            }
            counts.sort_by_key(|(status, _)| urgency(status));
            drawn.push(Drawn {
                name: name.clone(),
                depends_on: step.depends_on.clone(),
                status: counts[0].0,
                detail: Some(
                    counts
                        .iter()
                        .map(|(status, n)| format!("{n} {status}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
            });
            vec![name]
        };
        drawn.push(Drawn {
            name: step.name.clone(),
            depends_on: gathered,
            status: step.status.as_str(),
            detail: None,
        });
    }
    drawn
}

/// Which status colours a group of instances: the one an operator looks at first.
fn urgency(status: &str) -> usize {
    const ORDER: &[&str] = &[
        "error",
        "in_progress",
        "waiting_for_retry",
        "enqueued",
        "pending",
        "cancelled",
        "resolved_manually",
        "complete",
    ];
    ORDER
        .iter()
        .position(|s| *s == status)
        .unwrap_or(ORDER.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tasker_shared::states::StepStatus;
    use tasker_shared::store::tasks::StepRecord;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_diagram_has_nodes_edges_and_status_classes() {
        let (none, fetch, both) = (names(&[]), names(&["fetch"]), names(&["fetch", "charge"]));
        let nodes = [
            Node {
                name: "fetch",
                depends_on: &none,
                status: Some("complete"),
                detail: None,
            },
            Node {
                name: "charge",
                depends_on: &fetch,
                status: Some("error"),
                detail: None,
            },
            Node {
                name: "end",
                depends_on: &both,
                status: Some("pending"),
                detail: None,
            },
        ];
        let text = flowchart("task x", &nodes);
        assert!(text.starts_with("flowchart TD\n    %% task x\n"), "{text}");
        assert!(text.contains("    fetch[\"fetch<br/>complete\"]:::complete\n"));
        // `end` is a Mermaid keyword: its node gets another id, its label keeps the name.
        assert!(text.contains("    step_3[\"end<br/>pending\"]:::pending\n"));
        assert!(text.contains("    fetch --> charge\n"));
        assert!(text.contains("    fetch --> step_3\n"));
        assert!(text.contains("    charge --> step_3\n"));
        assert!(text.contains("classDef complete fill:#d4edda"));
        assert!(text.contains("classDef error "));
        assert!(!text.contains("classDef cancelled"), "only used classes");
    }

    #[test]
    fn a_template_diagram_has_no_status() {
        let none = names(&[]);
        let a = names(&["a b"]);
        let nodes = [
            Node {
                name: "a b",
                depends_on: &none,
                status: None,
                detail: None,
            },
            Node {
                name: "c",
                depends_on: &a,
                status: None,
                detail: None,
            },
        ];
        let text = flowchart("template t", &nodes);
        assert_eq!(
            text,
            "flowchart TD\n    %% template t\n    step_1[\"a b\"]\n    c[\"c\"]\n    step_1 --> c\n"
        );
    }

    fn step(name: &str, status: StepStatus, depends_on: &[&str], of: Option<&str>) -> StepRecord {
        StepRecord {
            step_id: uuid::Uuid::nil(),
            name: name.to_owned(),
            handler: "tasker.noop".to_owned(),
            status,
            attempts: 0,
            retry_limit: 1,
            deferrals: 0,
            retryable: true,
            timeout_ms: 1,
            depends_on: names(depends_on),
            results: None,
            results_omitted: false,
            results_size: None,
            last_error: None,
            next_attempt_at: None,
            started_at: None,
            completed_at: None,
            instances: None,
            instance_of: of.map(str::to_owned),
            index: None,
            child_task_id: None,
        }
    }

    #[test]
    fn instances_are_drawn_between_the_parents_and_their_step_or_as_one_node() {
        let mut steps = vec![
            step("list", StepStatus::Complete, &[], None),
            step("load", StepStatus::Pending, &["list"], None),
        ];
        steps.push(step(
            "load[0]",
            StepStatus::Complete,
            &["list"],
            Some("load"),
        ));
        steps.push(step(
            "load[1]",
            StepStatus::InProgress,
            &["list"],
            Some("load"),
        ));
        steps.push(step("report", StepStatus::Pending, &["load"], None));
        let drawn = grown(&steps);
        let edges: Vec<(&str, Vec<&str>)> = drawn
            .iter()
            .map(|d| {
                (
                    d.name.as_str(),
                    d.depends_on.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            edges,
            [
                ("list", vec![]),
                ("load[0]", vec!["list"]),
                ("load[1]", vec!["list"]),
                ("load", vec!["load[0]", "load[1]"]),
                ("report", vec!["load"]),
            ]
        );

        // Many: one node, coloured by the most pressing status, with the counts.
        let mut steps = vec![step("load", StepStatus::Pending, &[], None)];
        for n in 0..20 {
            let status = if n == 7 {
                StepStatus::Error
            } else {
                StepStatus::Complete
            };
            steps.push(step(&format!("load[{n}]"), status, &[], Some("load")));
        }
        let drawn = grown(&steps);
        assert_eq!(drawn.len(), 2);
        assert_eq!(drawn[0].name, "load[0…19]");
        assert_eq!(drawn[0].status, "error");
        assert_eq!(drawn[0].detail.as_deref(), Some("1 error, 19 complete"));
        assert_eq!(drawn[1].depends_on, ["load[0…19]"]);
    }

    #[test]
    fn labels_are_escaped_and_ids_unique() {
        assert_eq!(
            escape("a \"b\" <c> & `d` #e\n"),
            "a #quot;b#quot; #lt;c#gt; #amp; #96;d#96; #35;e "
        );
        assert_eq!(
            node_ids(&["a-b", "step_1", "ok", "End"]),
            ["step_1", "step_1_", "ok", "step_4"]
        );
        // A title cannot end the comment line.
        let text = flowchart("x\nflowchart LR", &[]);
        assert_eq!(text.lines().count(), 2, "{text}");
    }
}
