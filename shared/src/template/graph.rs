//! Graph checks: duplicate step names, unknown and self dependencies, and
//! dependency cycles (found without recursion, so very long chains are fine).

use std::collections::{HashMap, HashSet};

use super::draft::Draft;
use super::walker::Walker;
use super::{MAX_CYCLE_NAMES_SHOWN, MAX_DUPLICATE_PLACES_SHOWN, MAX_REPORTED_CYCLES, codes};

/// Duplicate names, unknown and self dependencies, cycles.
pub(super) fn check_graph(w: &mut Walker, draft: &Draft) {
    let steps = &draft.steps;
    let mut positions: HashMap<&str, Vec<usize>> = HashMap::with_capacity(steps.len());
    let mut first_seen: Vec<&str> = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        if let Some(name) = step.name.as_deref() {
            let entry = positions.entry(name).or_default();
            if entry.is_empty() {
                first_seen.push(name);
            }
            entry.push(i);
        }
    }
    for name in first_seen {
        let Some(at) = positions.get(name) else {
            continue;
        };
        if let [_, second, ..] = at.as_slice() {
            let mut places: Vec<&str> = at
                .iter()
                .take(MAX_DUPLICATE_PLACES_SHOWN)
                .map(|&i| steps[i].path.as_str())
                .collect();
            if at.len() > MAX_DUPLICATE_PLACES_SHOWN {
                places.push("...");
            }
            w.report(
                steps[*second].name_path.as_str(),
                codes::DUPLICATE_STEP,
                format!(
                    "step name `{name}` is used {} times ({})",
                    at.len(),
                    places.join(", ")
                ),
            );
        }
    }

    // Edges run parent -> child ("runs before"); `closing[child]` keeps, for
    // each parent, the path of the reference that created the edge.
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    let mut references: Vec<Vec<(usize, &str)>> = vec![Vec::new(); steps.len()];
    for (i, step) in steps.iter().enumerate() {
        let own = step.name.as_deref().unwrap_or("(unnamed)");
        for dep in &step.deps {
            if step.name.as_deref() == Some(dep.name.as_str()) {
                w.report(
                    dep.path.as_str(),
                    codes::SELF_DEPENDENCY,
                    format!("step `{own}` depends on itself"),
                );
                continue;
            }
            match positions.get(dep.name.as_str()).and_then(|at| at.first()) {
                Some(&parent) => {
                    children[parent].push(i);
                    references[i].push((parent, dep.path.as_str()));
                }
                None => w.report(
                    dep.path.as_str(),
                    codes::UNKNOWN_DEPENDENCY,
                    format!(
                        "step `{own}` depends on `{}`, which is not a step of this template",
                        dep.name
                    ),
                ),
            }
        }
    }
    for list in &mut children {
        list.sort_unstable();
        list.dedup();
    }

    let (cycles, more) = elementary_cycles(&children, MAX_REPORTED_CYCLES);
    for cycle in &cycles {
        let (Some(&first), Some(&last)) = (cycle.first(), cycle.last()) else {
            continue;
        };
        let path = references[first]
            .iter()
            .find(|(parent, _)| *parent == last)
            .map_or(steps[first].path.as_str(), |(_, path)| path);
        let names: Vec<&str> = cycle
            .iter()
            .map(|&i| steps[i].name.as_deref().unwrap_or("(unnamed)"))
            .collect();
        w.report(
            path,
            codes::CYCLE,
            format!("dependency cycle: {}", format_cycle(&names)),
        );
    }
    if more {
        w.report(
            "",
            codes::CYCLE,
            format!(
                "more dependency cycles exist; only the first {MAX_REPORTED_CYCLES} are listed"
            ),
        );
    }
}

/// `a -> b -> c -> a`, with the middle of very long cycles elided.
fn format_cycle(names: &[&str]) -> String {
    let Some(first) = names.first() else {
        return String::new();
    };
    let mut parts: Vec<String> = Vec::with_capacity(names.len().min(MAX_CYCLE_NAMES_SHOWN) + 2);
    if names.len() <= MAX_CYCLE_NAMES_SHOWN {
        parts.extend(names.iter().map(|name| (*name).to_owned()));
    } else {
        let head = MAX_CYCLE_NAMES_SHOWN / 2;
        let tail = MAX_CYCLE_NAMES_SHOWN - head;
        parts.extend(names[..head].iter().map(|name| (*name).to_owned()));
        parts.push(format!(
            "... ({} more steps) ...",
            names.len() - head - tail
        ));
        parts.extend(
            names[names.len() - tail..]
                .iter()
                .map(|name| (*name).to_owned()),
        );
    }
    parts.push((*first).to_owned());
    parts.join(" -> ")
}

/// Strongly connected components of the subgraph induced by the nodes
/// `start..`, by an iterative Tarjan. Returns each node's component id
/// (`usize::MAX` below `start`) and the size of each component.
fn strongly_connected(adjacency: &[Vec<usize>], start: usize) -> (Vec<usize>, Vec<usize>) {
    const UNSET: usize = usize::MAX;
    let n = adjacency.len();
    let mut index = vec![UNSET; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut component = vec![UNSET; n];
    let mut sizes = Vec::new();
    let mut stack = Vec::new();
    let mut calls: Vec<(usize, usize)> = Vec::new();
    let mut counter = 0;
    for root in start..n {
        if index[root] != UNSET {
            continue;
        }
        index[root] = counter;
        low[root] = counter;
        counter += 1;
        stack.push(root);
        on_stack[root] = true;
        calls.push((root, 0));
        while let Some(frame) = calls.last_mut() {
            let v = frame.0;
            if let Some(&w) = adjacency[v].get(frame.1) {
                frame.1 += 1;
                if w < start {
                    continue;
                }
                if index[w] == UNSET {
                    index[w] = counter;
                    low[w] = counter;
                    counter += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    calls.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
            } else {
                calls.pop();
                if let Some(&(parent, _)) = calls.last() {
                    low[parent] = low[parent].min(low[v]);
                }
                if low[v] == index[v] {
                    let id = sizes.len();
                    let mut size = 0;
                    while let Some(x) = stack.pop() {
                        on_stack[x] = false;
                        component[x] = id;
                        size += 1;
                        if x == v {
                            break;
                        }
                    }
                    sizes.push(size);
                }
            }
        }
    }
    (component, sizes)
}

/// All elementary cycles (Johnson's algorithm, iterative), each starting at
/// its lowest node, up to `limit` of them; the flag says whether more exist.
/// Self-loops must not be present in `adjacency`.
pub(super) fn elementary_cycles(adjacency: &[Vec<usize>], limit: usize) -> (Vec<Vec<usize>>, bool) {
    let n = adjacency.len();
    let mut cycles: Vec<Vec<usize>> = Vec::new();
    let mut blocked = vec![false; n];
    let mut blocked_by: Vec<HashSet<usize>> = vec![HashSet::new(); n];
    let mut start = 0;
    while start < n {
        let (component, sizes) = strongly_connected(adjacency, start);
        let Some(s) = (start..n).find(|&v| sizes[component[v]] > 1) else {
            break;
        };
        let id = component[s];
        let in_scope = |v: usize| v >= s && component[v] == id;
        for v in s..n {
            if in_scope(v) {
                blocked[v] = false;
                blocked_by[v].clear();
            }
        }
        let mut path = vec![s];
        blocked[s] = true;
        // (node, next edge position, found a cycle below)
        let mut frames: Vec<(usize, usize, bool)> = vec![(s, 0, false)];
        while let Some(frame) = frames.last_mut() {
            let v = frame.0;
            if let Some(&w) = adjacency[v].get(frame.1) {
                frame.1 += 1;
                if !in_scope(w) {
                    continue;
                }
                if w == s {
                    frame.2 = true;
                    cycles.push(path.clone());
                    if cycles.len() > limit {
                        cycles.truncate(limit);
                        return (cycles, true);
                    }
                } else if !blocked[w] {
                    blocked[w] = true;
                    path.push(w);
                    frames.push((w, 0, false));
                }
            } else {
                let found = frame.2;
                frames.pop();
                path.pop();
                if found {
                    unblock(v, &mut blocked, &mut blocked_by);
                } else {
                    for &w in &adjacency[v] {
                        if in_scope(w) {
                            blocked_by[w].insert(v);
                        }
                    }
                }
                if let Some(parent) = frames.last_mut() {
                    parent.2 |= found;
                }
            }
        }
        start = s + 1;
    }
    (cycles, false)
}

fn unblock(node: usize, blocked: &mut [bool], blocked_by: &mut [HashSet<usize>]) {
    blocked[node] = false;
    let mut work = vec![node];
    while let Some(x) = work.pop() {
        for w in std::mem::take(&mut blocked_by[x]) {
            if blocked[w] {
                blocked[w] = false;
                work.push(w);
            }
        }
    }
}
