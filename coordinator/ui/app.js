// The Tasker console: a page per hash route, everything read from the coordinator's API
// with the token the user pasted (kept in sessionStorage, so for this tab only), live
// updates from GET /v1/events/stream. Text from the API is only ever set as text.

import { drawGraph } from "./graph.js";

const TOKEN_KEY = "tasker.token";
// The longest an API read may take (analytics over a long window included).
const API_TIMEOUT_MS = 60_000;
const STATUSES = ["pending", "in_progress", "complete", "error", "cancelled", "resolved_manually"];
const FINISHED_STEP = new Set(["complete", "error", "cancelled", "resolved_manually", "skipped"]);

const app = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  me: null,
  stream: null, // {abort()} of the page's live stream
  wantedStream: null, // {params, onEvent} of the stream the page asks for, open or paused while hidden
  page: 0, // bumped on every navigation: late answers for an old page are dropped
};

// ---------------------------------------------------------------------------------------
// Small helpers

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// More instances of one for_each step than this are drawn as one node.
const MAX_DRAWN_INSTANCES = 12;
// Which status an operator looks at first.
const URGENCY = ["error", "in_progress", "waiting_for_retry", "enqueued", "pending", "cancelled", "resolved_manually", "skipped", "complete"];

// A task's for_each instances by the step they belong to, each in its order.
function instanceGroups(steps) {
  const groups = new Map();
  for (const s of steps) {
    if (!s.instance_of) continue;
    if (!groups.has(s.instance_of)) groups.set(s.instance_of, []);
    groups.get(s.instance_of).push(s);
  }
  return groups;
}

function byUrgency(steps) {
  const rank = (s) => {
    const at = URGENCY.indexOf(s.status);
    return at < 0 ? URGENCY.length : at;
  };
  return [...steps].sort((a, b) => rank(a) - rank(b));
}

// "3 error, 40 complete", most pressing first.
function statusCounts(steps) {
  const counts = new Map();
  for (const s of byUrgency(steps)) counts.set(s.status, (counts.get(s.status) || 0) + 1);
  return [...counts].map(([status, n]) => `${n} ${status.replaceAll("_", " ")}`).join(", ");
}

function badge(status) {
  return h("span", { class: `badge status-${status}` }, status.replaceAll("_", " "));
}

function when(at) {
  if (!at) return "—";
  const d = new Date(at);
  return d.toLocaleString(undefined, { hourCycle: "h23" });
}

function ms(value) {
  if (value === undefined || value === null || Number.isNaN(value)) return "—";
  if (value < 1000) return `${Math.round(value)} ms`;
  if (value < 60_000) return `${(value / 1000).toFixed(value < 10_000 ? 2 : 1)} s`;
  return `${(value / 60_000).toFixed(1)} min`;
}

function span(from, to) {
  if (!from) return null;
  return (to ? new Date(to) : new Date()) - new Date(from);
}

function pct(value) {
  return value === undefined || value === null ? "—" : `${(value * 100).toFixed(1)}%`;
}

function json(value) {
  return h("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

function can(scope) {
  const scopes = app.me?.scopes || [];
  return scopes.includes("admin") || scopes.includes(scope);
}

function flash(message, kind = "info") {
  const el = document.getElementById("flash");
  el.hidden = false;
  el.className = kind;
  el.textContent = message;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => (el.hidden = true), kind === "error" ? 12_000 : 5_000);
}

// Call `fn` at most once every `wait` ms, and once more after the last call: a page
// reloads at a steady pace however many events arrive, and always shows the last state.
// Never while its previous call (a promise) runs: a call asked for meanwhile runs once
// after it, so an older read never lands after a newer one.
function throttle(fn, wait) {
  let timer = null;
  let last = 0;
  let running = false;
  let again = false;
  const trigger = () => {
    if (running) {
      again = true;
      return;
    }
    if (timer) return;
    timer = setTimeout(async () => {
      timer = null;
      running = true;
      last = Date.now();
      try {
        await fn();
      } finally {
        running = false;
        if (again) {
          again = false;
          trigger();
        }
      }
    }, Math.max(0, last + wait - Date.now()));
  };
  return trigger;
}

class ApiError extends Error {
  constructor(status, body) {
    const error = body?.error || {};
    const details = (error.details || [])
      .map((d) => (d.path ? `${d.path}: ${d.message}` : d.message || JSON.stringify(d)))
      .join("; ");
    super(`${status} ${error.code || ""}: ${error.message || "request failed"}${details ? ` (${details})` : ""}`);
    this.status = status;
    this.code = error.code;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (app.token) headers.Authorization = `Bearer ${app.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    // A request nobody answers must not hold a page's reloads (they wait for each other).
    signal: AbortSignal.timeout(API_TIMEOUT_MS),
  });
  const text = await response.text();
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    parsed = text;
  }
  if (!response.ok) {
    if (response.status === 401 && path !== "/v1/whoami") {
      showSignIn("The token was refused; paste another.");
    }
    throw new ApiError(response.status, parsed);
  }
  return parsed;
}

// `load` called one call at a time, in the order asked ("more" clicks and live reloads
// alike): an older answer must not replace, or cut into, a newer one. Errors are flashed.
function serialized(load) {
  let reading = Promise.resolve();
  return (...args) => {
    reading = reading.then(() => load(...args), () => load(...args));
    return reading.catch((e) => flash(e.message, "error"));
  };
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (Array.isArray(v)) v.filter(Boolean).forEach((x) => q.append(k, x));
    else if (v !== undefined && v !== null && v !== "") q.set(k, v);
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

// ---------------------------------------------------------------------------------------
// Live updates: server-sent events read through fetch, so the token goes in a header
// (EventSource cannot send one) and never into a URL or a log.

function setLive(state, text) {
  const el = document.getElementById("live");
  el.className = `live ${state}`;
  el.textContent = text;
}

// A hidden tab holds no stream: a browser opens at most six HTTP/1.1 connections to one
// host, shared by all its tabs, and a stream holds one for as long as it is open. The
// page reads what it shows again when it is shown (the new stream's `ready`).
function openStream(params, onEvent) {
  closeStream();
  app.wantedStream = { params, onEvent };
  if (document.hidden) setLive("off", "paused while hidden");
  else startStream();
}

document.addEventListener("visibilitychange", () => {
  if (!app.wantedStream) return;
  if (document.hidden) {
    stopStream();
    setLive("off", "paused while hidden");
  } else if (!app.stream) startStream();
});

function startStream() {
  const { params, onEvent } = app.wantedStream;
  const controller = new AbortController();
  let stopped = false;
  app.stream = {
    abort() {
      stopped = true;
      controller.abort();
    },
  };
  setLive("off", "connecting");
  // Between tries: 2 s, doubling up to 30 s while the stream is refused (a coordinator at
  // its limit of streams, say), jittered so that many tabs do not come back together.
  let delay = 2000;
  const connect = async () => {
    try {
      const headers = { Accept: "text/event-stream" };
      if (app.token) headers.Authorization = `Bearer ${app.token}`;
      const response = await fetch(`/v1/events/stream${query(params)}`, { headers, signal: controller.signal });
      if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          let name = "message";
          const data = [];
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) name = line.slice(6).trim();
            else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
          }
          if (!data.length) continue;
          const payload = JSON.parse(data.join("\n"));
          if (name === "ready") {
            if (payload.events) {
              delay = 2000;
              setLive("on", payload.only ? `live: ${payload.only.join(", ")} only` : "live");
              // What changed between the page's first read (or a dropped stream) and
              // now reached no stream: read once more.
              onEvent(null);
            } else if (app.me?.events) {
              // Events are on but this coordinator could not consume them in time (the
              // broker is away): this stream would stay silent, so connect again.
              await reader.cancel();
              throw new Error("not live yet");
            } else setLive("off", "events off");
          } else if (name === "lagged") {
            onEvent(null);
          } else {
            onEvent(payload);
          }
        }
      }
    } catch (error) {
      if (stopped) return;
      if (error.status === 401) {
        // The token was revoked or has expired: another try would be refused as well.
        showSignIn("The token was refused; paste another.");
        return;
      }
      setLive("off", "reconnecting");
    }
    if (stopped) return;
    setTimeout(connect, delay * (0.75 + Math.random() / 2));
    delay = Math.min(delay * 2, 30000);
  };
  connect();
}

function stopStream() {
  if (app.stream) app.stream.abort();
  app.stream = null;
}

function closeStream() {
  app.wantedStream = null;
  stopStream();
  setLive("off hidden", "");
}

// ---------------------------------------------------------------------------------------
// Sign-in

function showSignIn(message) {
  closeStream();
  // Whatever the page before was still reading must not draw over the form.
  app.page += 1;
  app.me = null;
  document.getElementById("who").textContent = "";
  document.getElementById("sign-out").hidden = true;
  const main = document.getElementById("main");
  main.replaceChildren(document.getElementById("token-page").content.cloneNode(true));
  const error = document.getElementById("token-error");
  if (message) {
    error.hidden = false;
    error.textContent = message;
  }
  document.getElementById("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    app.token = document.getElementById("token-input").value.trim();
    sessionStorage.setItem(TOKEN_KEY, app.token);
    await start();
  });
}

async function start() {
  try {
    app.me = await api("/v1/whoami");
  } catch (error) {
    if (error.status === 401) return showSignIn(app.token ? "The token was refused: " + error.message : null);
    if (error.status === 403) return showSignIn("This token cannot read tasks (it needs tasks:read).");
    document.getElementById("main").replaceChildren(h("p", { class: "error" }, `Cannot reach the API: ${error.message}`));
    return;
  }
  const who = app.me.authentication ? `${app.me.subject} · ${app.me.scopes.join(", ")}` : "authentication off";
  document.getElementById("who").textContent = who;
  document.getElementById("sign-out").hidden = !app.me.authentication;
  route();
}

// ---------------------------------------------------------------------------------------
// Routing

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/tasks";
  const [path, search] = raw.split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(search || "") };
}

function route() {
  if (!app.me) return;
  app.page += 1;
  const page = app.page;
  closeStream();
  const { parts, params } = parseHash();
  const [name, ...rest] = parts;
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.page === name);
  }
  const main = document.getElementById("main");
  main.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  const pages = {
    tasks: () => (rest[0] ? taskPage(main, rest[0]) : tasksPage(main, params)),
    templates: () => (rest.length >= 2 ? templatePage(main, rest[0], rest[1], params) : templatesPage(main)),
    schedules: () => schedulesPage(main),
    workers: () => workersPage(main),
    analytics: () => analyticsPage(main, params),
  };
  (pages[name] || pages.tasks)().catch((error) => {
    if (current(page)) main.replaceChildren(h("p", { class: "error", id: "page-error" }, error.message));
  });
}

function current(page) {
  return page === app.page;
}

// ---------------------------------------------------------------------------------------
// Tasks

async function tasksPage(main, params) {
  const page = app.page;
  const filters = {
    namespace: params.get("namespace") || "",
    name: params.get("name") || "",
    status: params.get("status") || "",
    tag: params.get("tag") || "",
    created_after: params.get("created_after") || "",
    created_before: params.get("created_before") || "",
  };
  const field = (label, input) => h("label", {}, label, input);
  const text = (name) => h("input", { name, value: filters[name], id: `filter-${name}` });
  const localTime = (name) => {
    const v = filters[name] ? new Date(filters[name]) : null;
    const local = v ? new Date(v.getTime() - v.getTimezoneOffset() * 60_000).toISOString().slice(0, 16) : "";
    return h("input", { name, type: "datetime-local", value: local, id: `filter-${name}` });
  };
  const status = h(
    "select",
    { name: "status", id: "filter-status" },
    h("option", { value: "" }, "any status"),
    STATUSES.map((s) => h("option", { value: s, selected: s === filters.status }, s.replaceAll("_", " "))),
  );
  const form = h(
    "form",
    { class: "filters", id: "task-filters" },
    field("Namespace", text("namespace")),
    field("Template", text("name")),
    field("Status", status),
    field("Tag", text("tag")),
    field("Created after", localTime("created_after")),
    field("Created before", localTime("created_before")),
    h("button", { type: "submit" }, "Filter"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const next = {};
    for (const [k, v] of data.entries()) {
      if (!v) continue;
      next[k] = k.startsWith("created_") ? new Date(v).toISOString() : v;
    }
    location.hash = `#/tasks${query(next)}`;
  });
  const body = h("tbody");
  const more = h("button", { class: "link", id: "tasks-more", hidden: true }, "Older tasks…");
  const summary = h("p", { class: "muted", id: "tasks-summary" });
  main.replaceChildren(
    h("h1", {}, "Tasks"),
    form,
    summary,
    h(
      "table",
      { class: "grid", id: "tasks-table" },
      h("thead", {}, h("tr", {}, ["Task", "Template", "Status", "Created", "Duration", "Tags"].map((c) => h("th", {}, c)))),
      body,
    ),
    more,
  );
  let cursor = null;
  const row = (t) =>
    h(
      "tr",
      { "data-task-id": t.task_id, class: `status-row-${t.status}` },
      h("td", {}, h("a", { href: `#/tasks/${t.task_id}`, class: "mono" }, t.task_id.slice(0, 8) + "…" + t.task_id.slice(-4))),
      h("td", {}, `${t.namespace}/${t.name}`, h("span", { class: "muted" }, ` ${t.version}`)),
      h("td", {}, badge(t.status)),
      h("td", {}, when(t.created_at)),
      h("td", {}, ms(span(t.created_at, t.completed_at))),
      h("td", {}, (Array.isArray(t.tags) ? t.tags : []).map((tag) => h("span", { class: "tag" }, String(tag)))),
    );
  const load = async (append) => {
    // A second click queued behind the page that turned out the last has nothing to read.
    if (append && !cursor) return;
    // A live reload reads again as many rows as are shown ("Older tasks…" included).
    const limit = append ? 50 : Math.min(500, Math.max(50, body.children.length));
    const answer = await api(`/v1/tasks${query({ ...filters, limit, cursor: append ? cursor : null })}`);
    if (!current(page)) return;
    cursor = answer.next_cursor;
    if (!append) body.replaceChildren();
    answer.tasks.forEach((t) => body.append(row(t)));
    more.hidden = !cursor;
    summary.textContent = body.children.length
      ? `${body.children.length} task${body.children.length === 1 ? "" : "s"} shown, newest first${cursor ? "" : " (all that match)"}.`
      : "No task matches.";
  };
  const serially = serialized(load);
  more.addEventListener("click", () => serially(true));
  await load(false);
  if (!current(page)) return;
  const refresh = throttle(() => serially(false), 700);
  openStream({ kind: "task", namespace: filters.namespace || undefined }, refresh);
}

async function taskPage(main, taskId) {
  const page = app.page;
  let selected = null;
  // Results read on demand for steps the task's page left out, by step name: kept across
  // the page's re-renders (every event re-reads the task).
  const loadedResults = new Map();
  let data = null;
  // Until when a first click on "Cancel task" waits for the second: kept here, not on
  // the button, which every live reload draws anew.
  let cancelArmedUntil = 0;
  const header = h("div", { class: "task-head" });
  const actions = h("div", { class: "actions", id: "task-actions" });
  const graph = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  graph.id = "task-graph";
  graph.classList.add("graph");
  const stepPanel = h("section", { class: "card", id: "step-detail" }, h("p", { class: "muted" }, "Select a step."));
  const stepsBody = h("tbody");
  const historyBody = h("tbody");
  main.replaceChildren(
    header,
    actions,
    h("div", { class: "split" }, h("section", { class: "card graph-card" }, h("h2", {}, "Graph"), h("div", { class: "scroll" }, graph)), stepPanel),
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Steps"),
      h(
        "table",
        { class: "grid", id: "steps-table" },
        h("thead", {}, h("tr", {}, ["Step", "Handler", "Status", "Attempts", "Started", "Took", "Last error"].map((c) => h("th", {}, c)))),
        stepsBody,
      ),
    ),
    h(
      "section",
      { class: "card" },
      h("h2", {}, "History"),
      h("table", { class: "grid", id: "history-table" }, h("thead", {}, h("tr", {}, ["When", "Step", "From", "To", "Reason", "Details"].map((c) => h("th", {}, c)))), historyBody),
    ),
  );

  const act = async (label, path, body) => {
    try {
      await api(path, { method: "POST", body: body ?? {} });
      flash(`${label}: done.`);
      // Through the page's throttle, so it never overlaps a live reload.
      refresh();
    } catch (error) {
      flash(`${label} refused: ${error.message}`, "error");
    }
  };

  const renderHeader = (task) => {
    header.replaceChildren(
      h("h1", {}, `${task.namespace}/${task.name} `, h("span", { class: "muted" }, task.version), " ", h("span", { id: "task-status" }, badge(task.status))),
      h(
        "dl",
        { class: "facts" },
        h("dt", {}, "Task"), h("dd", { class: "mono" }, task.task_id),
        h("dt", {}, "Created"), h("dd", {}, when(task.created_at)),
        h("dt", {}, "Finished"), h("dd", {}, when(task.completed_at)),
        h("dt", {}, "Took"), h("dd", {}, ms(span(task.created_at, task.completed_at))),
        h("dt", {}, "Priority"), h("dd", {}, task.priority),
        task.deadline_at && [h("dt", {}, "Deadline"), h("dd", {}, when(task.deadline_at))],
        task.parent_task_id && [h("dt", {}, "Parent"), h("dd", {}, h("a", { href: `#/tasks/${task.parent_task_id}`, class: "mono" }, task.parent_task_id))],
        task.children?.length > 0 && [
          h("dt", {}, "Children"),
          h("dd", {}, task.children.map((c) => h("div", {}, h("a", { href: `#/tasks/${c.task_id}`, class: "mono" }, c.task_id.slice(0, 8)), ` ${c.namespace}/${c.name} (step ${c.step}) `, badge(c.status)))),
        ],
        h("dt", {}, "Context"), h("dd", {}, h("details", {}, h("summary", {}, "show"), json(task.context))),
      ),
    );
    actions.replaceChildren();
    if (!can("tasks:operate")) {
      actions.append(h("span", { class: "muted", id: "read-only" }, "Read-only: this token cannot operate tasks."));
      return;
    }
    if (task.status === "error") {
      actions.append(
        h("button", { id: "action-retry", onclick: () => act("Retry", `/v1/tasks/${taskId}/retry`, { reason: "retried from the console" }) }, "Retry failed steps"),
        h("button", { id: "action-resolve-task", class: "secondary", onclick: () => act("Resolve", `/v1/tasks/${taskId}/resolve`, { reason: "resolved from the console" }) }, "Mark resolved"),
      );
    }
    if (task.status === "pending" || task.status === "in_progress") {
      const armed = () => Date.now() < cancelArmedUntil;
      const cancel = h("button", { id: "action-cancel", class: "danger" }, armed() ? "Click again to cancel" : "Cancel task");
      cancel.addEventListener("click", () => {
        if (armed()) {
          cancelArmedUntil = 0;
          return act("Cancel", `/v1/tasks/${taskId}/cancel`, { reason: "cancelled from the console" });
        }
        cancelArmedUntil = Date.now() + 10_000;
        cancel.textContent = "Click again to cancel";
      });
      actions.append(cancel);
    }
  };

  const stepNode = (s) => ({
    id: s.name,
    deps: s.depends_on,
    label: s.name,
    sublabel: `${s.status.replaceAll("_", " ")}${s.attempts > 1 ? ` · ${s.attempts} attempts` : ""}`,
    classes: [`status-${s.status}`, s.name === selected ? "selected" : null].filter(Boolean),
    title: `${s.name} (${s.handler}): ${s.status}`,
  });

  // A for_each step's instances sit between its parents and the step, which gathers
  // them; past MAX_DRAWN_INSTANCES they are one node, coloured by their most pressing
  // status (as in the task's Mermaid diagram). Selecting it selects that instance.
  const renderGraph = (task) => {
    const groups = instanceGroups(task.steps);
    const nodes = [];
    // A folded node's id → the instance selecting it selects.
    const folded = new Map();
    for (const s of task.steps.filter((s) => !s.instance_of)) {
      const group = groups.get(s.name);
      if (!group) {
        nodes.push(stepNode(s));
        continue;
      }
      let gathered;
      if (group.length <= MAX_DRAWN_INSTANCES) {
        nodes.push(...group.map((i) => ({ ...stepNode(i), deps: s.depends_on })));
        gathered = group.map((i) => i.name);
      } else {
        const id = `${s.name}[0…${group.length - 1}]`;
        const urgent = byUrgency(group)[0];
        const counts = statusCounts(group);
        folded.set(id, urgent.name);
        nodes.push({
          id,
          deps: s.depends_on,
          label: id,
          sublabel: counts,
          classes: [`status-${urgent.status}`, "instances", group.some((i) => i.name === selected) ? "selected" : null].filter(Boolean),
          title: `${group.length} instances of ${s.name}: ${counts}`,
        });
        gathered = [id];
      }
      nodes.push({ ...stepNode(s), deps: gathered });
    }
    drawGraph(graph, nodes, {
      onSelect: (name) => {
        selected = folded.get(name) ?? name;
        render();
      },
    });
  };

  // Past MAX_DRAWN_INSTANCES, a for_each step's table shows a row of their counts and
  // the most pressing of them.
  const renderSteps = (task) => {
    const groups = instanceGroups(task.steps);
    const shown = [];
    for (const s of task.steps.filter((s) => !s.instance_of)) {
      const group = groups.get(s.name) || [];
      if (group.length <= MAX_DRAWN_INSTANCES) shown.push(...group);
      else {
        shown.push({ summary: true, name: s.name, count: group.length, counts: statusCounts(group) });
        const pressing = byUrgency(group).filter((i) => i.status !== "complete").slice(0, MAX_DRAWN_INSTANCES);
        const chosen = group.find((i) => i.name === selected);
        if (chosen && !pressing.includes(chosen)) pressing.push(chosen);
        shown.push(...pressing);
      }
      shown.push(s);
    }
    stepsBody.replaceChildren(
      ...shown.map((s) =>
        s.summary ? h("tr", { class: "instances", "data-instances": s.name }, h("td", { colspan: 7, class: "muted" }, `${s.count} instances of ${s.name}: ${s.counts} (those not complete are listed, at most ${MAX_DRAWN_INSTANCES})`)) :
        h(
          "tr",
          { "data-step": s.name, class: s.name === selected ? "selected" : null, onclick: () => { selected = s.name; render(); } },
          h("td", {}, s.name),
          h("td", { class: "mono" }, s.handler),
          h("td", {}, badge(s.status)),
          h("td", {}, `${s.attempts} / ${s.retry_limit}`),
          h("td", {}, when(s.started_at)),
          h("td", {}, FINISHED_STEP.has(s.status) ? ms(span(s.started_at, s.completed_at)) : "—"),
          h("td", { class: "error-text" }, s.last_error?.message || ""),
        ),
      ),
    );
  };

  const renderHistory = (history) => {
    const rows = [...history.task.map((t) => ({ ...t, step: null })), ...history.steps].sort((a, b) => new Date(b.created_at) - new Date(a.created_at));
    historyBody.replaceChildren(
      ...rows.slice(0, 200).map((t) =>
        h(
          "tr",
          {},
          h("td", {}, when(t.created_at)),
          h("td", {}, t.step || "(task)"),
          h("td", {}, t.from_status || "—"),
          h("td", {}, t.to_status),
          h("td", {}, t.reason),
          h("td", { class: "mono small" }, t.metadata && Object.keys(t.metadata).length ? JSON.stringify(t.metadata) : ""),
        ),
      ),
    );
  };

  const renderStep = (task, history) => {
    const step = task.steps.find((s) => s.name === selected);
    if (!step) {
      stepPanel.replaceChildren(h("h2", {}, "Step"), h("p", { class: "muted" }, "Select a step in the graph or the table."));
      return;
    }
    const transitions = history.steps.filter((t) => t.step === step.name);
    const attempts = transitions.filter((t) => t.to_status === "in_progress");
    const children = [
      h("h2", {}, step.name, " ", badge(step.status)),
      h(
        "dl",
        { class: "facts" },
        h("dt", {}, "Handler"), h("dd", { class: "mono" }, step.handler),
        h("dt", {}, "Attempts"), h("dd", { id: "step-attempts" }, `${step.attempts} of ${step.retry_limit}${step.retryable ? "" : " (not retryable)"}`),
        h("dt", {}, "Started"), h("dd", {}, when(step.started_at)),
        h("dt", {}, "Finished"), h("dd", {}, when(step.completed_at)),
        h("dt", {}, "Took"), h("dd", {}, FINISHED_STEP.has(step.status) ? ms(span(step.started_at, step.completed_at)) : "—"),
        step.next_attempt_at && [h("dt", {}, "Next attempt"), h("dd", {}, when(step.next_attempt_at))],
        step.child_task_id && [h("dt", {}, "Child task"), h("dd", {}, h("a", { href: `#/tasks/${step.child_task_id}`, class: "mono" }, step.child_task_id))],
      ),
    ];
    if (step.last_error) children.push(h("h3", {}, "Last error"), h("div", { id: "step-error" }, json(step.last_error)));
    if (step.results !== null && step.results !== undefined) children.push(h("h3", {}, "Results"), json(step.results));
    else if (step.results_omitted && loadedResults.has(step.name)) {
      children.push(h("h3", {}, "Results"), h("div", { id: "step-results" }, json(loadedResults.get(step.name))));
    } else if (step.results_omitted) {
      // The task's page carries results up to 16 MiB; this step's are read on demand.
      const held = h(
        "div",
        { id: "step-results" },
        h("p", { class: "muted" }, "Left out of the task's page: its steps' results together pass 16 MiB. "),
        h("button", {
          id: "load-results",
          class: "secondary",
          onclick: async () => {
            try {
              const whole = await api(`/v1/tasks/${taskId}/steps/${encodeURIComponent(step.name)}`);
              loadedResults.set(step.name, whole.results);
              // Drawn by the page's render, which a live update may have run meanwhile.
              render();
            } catch (error) {
              flash(`Cannot load the results: ${error.message}`, "error");
            }
          },
        }, "Load results"),
      );
      children.push(h("h3", {}, "Results"), held);
    }
    if (attempts.length) {
      children.push(
        h("h3", {}, "Attempts"),
        h(
          "ol",
          { class: "attempts" },
          attempts.map((start) => {
            const end = transitions.find((t) => new Date(t.created_at) >= new Date(start.created_at) && t.from_status === "in_progress" && t.to_status !== "in_progress");
            const code = end?.metadata?.error_code ? `, ${end.metadata.error_code}` : "";
            return h("li", {}, `${when(start.created_at)} on ${start.metadata?.worker_id || "?"}`, end ? ` → ${end.to_status.replaceAll("_", " ")} (${end.reason}${code})` : " → running");
          }),
        ),
      );
    }
    if (can("tasks:operate") && (step.status === "error" || step.status === "waiting_for_retry" || step.status === "pending")) {
      const results = h("textarea", { id: "resolve-results", rows: 3, placeholder: '{"results": "as the handler would return them"}' });
      children.push(
        h("h3", {}, "Resolve by hand"),
        results,
        h("button", {
          id: "action-resolve-step",
          class: "secondary",
          onclick: () => {
            let parsed;
            try {
              parsed = results.value.trim() ? JSON.parse(results.value) : undefined;
            } catch (error) {
              return flash(`The results are not JSON: ${error.message}`, "error");
            }
            act("Resolve step", `/v1/tasks/${taskId}/steps/${encodeURIComponent(step.name)}/resolve`, { results: parsed, reason: "resolved from the console" });
          },
        }, "Resolve step"),
      );
    }
    if (can("tasks:operate") && step.handler === "tasker.wait" && !FINISHED_STEP.has(step.status)) {
      const payload = h("textarea", { id: "signal-payload", rows: 3, placeholder: "{}" });
      const definition = definitions.get(step.instance_of || step.name);
      const signalName = h("input", { id: "signal-name", placeholder: "signal name", value: definition?.config?.signal || "" });
      children.push(
        h("h3", {}, "Send a signal"),
        signalName,
        payload,
        h("button", {
          id: "action-signal",
          onclick: () => {
            let parsed;
            try {
              parsed = payload.value.trim() ? JSON.parse(payload.value) : {};
            } catch (error) {
              return flash(`The payload is not JSON: ${error.message}`, "error");
            }
            act("Signal", `/v1/tasks/${taskId}/signals/${encodeURIComponent(signalName.value)}`, parsed);
          },
        }, "Send"),
      );
    }
    // A redraw (a live update) keeps what the user was typing for this step.
    const typed = stepPanel.dataset.step === step.name
      ? [...stepPanel.querySelectorAll("textarea, input")].map((el) => [el.id, el.value])
      : [];
    stepPanel.replaceChildren(...children);
    stepPanel.dataset.step = step.name;
    for (const [id, value] of typed) {
      const el = id && stepPanel.querySelector(`#${id}`);
      if (el) el.value = value;
    }
  };

  const render = () => {
    if (!data) return;
    renderHeader(data.task);
    renderGraph(data.task);
    renderSteps(data.task);
    renderHistory(data.history);
    renderStep(data.task, data.history);
  };

  // The template's step definitions (for a tasker.wait step's signal), read once.
  let definitions = null;
  const load = async () => {
    // The history table shows the newest 200 transitions.
    const [task, history] = await Promise.all([api(`/v1/tasks/${taskId}`), api(`/v1/tasks/${taskId}/transitions?limit=200`)]);
    if (!current(page)) return;
    if (definitions === null) {
      definitions = new Map();
      try {
        const template = await api(`/v1/templates/${encodeURIComponent(task.namespace)}/${encodeURIComponent(task.name)}${query({ version: task.version })}`);
        template.steps.forEach((s) => definitions.set(s.name, s));
      } catch {
        // Shown without: only the signal's name is not filled in.
      }
      if (!current(page)) return;
    }
    if (selected === null) {
      const failed = task.steps.find((s) => s.status === "error") || task.steps.find((s) => s.status === "waiting_for_retry");
      selected = failed ? failed.name : null;
    }
    data = { task, history };
    render();
  };
  // Every reload after the first (live ones, an action's) goes through it.
  const refresh = throttle(() => load().catch((e) => flash(e.message, "error")), 250);
  await load();
  if (!current(page)) return;
  openStream({ task_id: taskId }, refresh);
}

// ---------------------------------------------------------------------------------------
// Templates

async function templatesPage(main) {
  const page = app.page;
  const body = h("tbody");
  const more = h("button", { class: "link", id: "templates-more", hidden: true }, "More templates…");
  let cursor = null;
  const load = async (append) => {
    // A second click queued behind the page that turned out the last has nothing to read.
    if (append && !cursor) return;
    const answer = await api(`/v1/templates${query({ cursor })}`);
    if (!current(page)) return;
    cursor = answer.next_cursor;
    // A page holds every version of each of its templates, oldest first.
    const versions = new Map();
    for (const t of answer.templates) {
      const key = `${t.namespace}/${t.name}`;
      (versions.get(key) || versions.set(key, []).get(key)).push(t);
    }
    for (const [key, all] of versions) {
      const newest = all[all.length - 1];
      body.append(
        h(
          "tr",
          { "data-template": key },
          h("td", {}, h("a", { href: `#/templates/${encodeURIComponent(newest.namespace)}/${encodeURIComponent(newest.name)}` }, key)),
          h("td", {}, all.map((v) => v.version).join(", ")),
          h("td", {}, newest.step_count),
          h("td", {}, newest.description || ""),
        ),
      );
    }
    more.hidden = !cursor;
  };
  const serially = serialized(load);
  more.addEventListener("click", () => serially(true));
  await load(false);
  if (!current(page)) return;
  main.replaceChildren(
    h("h1", {}, "Templates"),
    h(
      "table",
      { class: "grid", id: "templates-table" },
      h("thead", {}, h("tr", {}, ["Template", "Versions", "Steps", "Description"].map((c) => h("th", {}, c)))),
      body,
    ),
    more,
  );
}

async function templatePage(main, namespace, name, params) {
  const page = app.page;
  const version = params.get("version");
  const [record, list] = await Promise.all([
    api(`/v1/templates/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}${query({ version })}`),
    api(`/v1/templates${query({ namespace, name })}`),
  ]);
  if (!current(page)) return;
  const definition = record;
  const versions = list.templates.map((t) => t.version);
  const select = h(
    "select",
    { id: "template-version" },
    versions.map((v) => h("option", { value: v, selected: v === definition.version }, v)),
  );
  select.addEventListener("change", () => {
    location.hash = `#/templates/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}?version=${encodeURIComponent(select.value)}`;
  });
  const graph = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  graph.id = "template-graph";
  graph.classList.add("graph");
  main.replaceChildren(
    h("h1", {}, `${namespace}/${name} `, select),
    definition.description ? h("p", {}, definition.description) : null,
    h("p", {}, h("a", { href: `#/analytics?namespace=${encodeURIComponent(namespace)}&name=${encodeURIComponent(name)}` }, "Analytics for this template"), " · ", h("a", { href: `#/tasks?namespace=${encodeURIComponent(namespace)}&name=${encodeURIComponent(name)}` }, "Its tasks")),
    h("section", { class: "card graph-card" }, h("div", { class: "scroll" }, graph)),
    h(
      "section",
      { class: "card" },
      h(
        "table",
        { class: "grid" },
        h("thead", {}, h("tr", {}, ["Step", "Handler", "Depends on", "Retries", "Timeout", "Condition"].map((c) => h("th", {}, c)))),
        h(
          "tbody",
          {},
          definition.steps.map((s) =>
            h("tr", {}, h("td", {}, s.name), h("td", { class: "mono" }, s.handler), h("td", {}, s.depends_on.join(", ")), h("td", {}, s.retryable ? s.retry_limit : "no"), h("td", {}, ms(s.timeout_ms)), h("td", { class: "mono" }, s.when || "")),
          ),
        ),
      ),
    ),
  );
  drawGraph(
    graph,
    definition.steps.map((s) => ({ id: s.name, deps: s.depends_on, label: s.name, sublabel: s.handler, classes: ["status-template"] })),
  );
}

// ---------------------------------------------------------------------------------------
// Schedules

async function schedulesPage(main) {
  const page = app.page;
  const body = h("tbody");
  const table = h(
    "table",
    { class: "grid", id: "schedules-table" },
    h("thead", {}, h("tr", {}, ["Schedule", "Template", "Cron", "Next runs", "Last runs", "Overlap", ""].map((c) => h("th", {}, c)))),
    body,
  );
  const none = h("p", { class: "muted", id: "schedules-none" }, "No schedule. Create one with `tasker schedules create` or a template's `schedules:`.");
  const more = h("button", { class: "link", id: "schedules-more", hidden: true }, "More schedules…");
  main.replaceChildren(h("h1", {}, "Schedules"), table, none, more);
  let cursor = null;
  const row = (s) =>
    h(
      "tr",
      { "data-schedule": s.name },
      h("td", {}, s.name, s.paused ? h("span", { class: "badge status-cancelled" }, "paused") : null),
      h("td", {}, `${s.namespace}/${s.template}`, s.version ? ` ${s.version}` : ""),
      h("td", { class: "mono" }, `${s.cron} ${s.timezone || "UTC"}`),
      h("td", { class: "next-runs" }, (s.next_runs || []).slice(0, 3).map((t) => h("div", {}, when(t)))),
      h("td", { class: "last-runs" }, (s.last_runs || []).slice(0, 3).map((r) => h("div", {}, when(r.time), " ", r.task_id ? h("a", { href: `#/tasks/${r.task_id}` }, badge(r.status || "pending")) : h("span", { class: "muted" }, r.outcome)))),
      h("td", {}, s.overlap),
      h(
        "td",
        {},
        can("tasks:write")
          ? h("button", {
              class: "secondary",
              onclick: async () => {
                try {
                  await api(`/v1/schedules/${encodeURIComponent(s.name)}`, { method: "PATCH", body: { paused: !s.paused } });
                  await serially(false);
                } catch (error) {
                  flash(error.message, "error");
                }
              },
            }, s.paused ? "Resume" : "Pause")
          : null,
      ),
    );
  const load = async (append) => {
    // A second click queued behind the page that turned out the last has nothing to read.
    if (append && !cursor) return;
    // A live reload reads again as many rows as are shown ("More schedules…" included).
    const limit = append ? 100 : Math.min(500, Math.max(100, body.children.length));
    const answer = await api(`/v1/schedules${query({ limit, cursor: append ? cursor : null })}`);
    if (!current(page)) return;
    cursor = answer.next_cursor;
    if (!append) body.replaceChildren();
    answer.schedules.forEach((s) => body.append(row(s)));
    more.hidden = !cursor;
    table.hidden = !body.children.length;
    none.hidden = !!body.children.length;
  };
  const serially = serialized(load);
  more.addEventListener("click", () => serially(true));
  await load(false);
  if (!current(page)) return;
  const refresh = throttle(() => serially(false), 1000);
  openStream({ kind: "schedule" }, refresh);
}

// ---------------------------------------------------------------------------------------
// Workers, queues and dead letters

async function workersPage(main) {
  const page = app.page;
  const render = async () => {
    let status;
    try {
      status = await api("/health/status");
    } catch (error) {
      // A 401 put the sign-in form up: this page is gone, and must not draw over it.
      if (!current(page)) return;
      if (error.status === 403) {
        main.replaceChildren(h("h1", {}, "Workers"), h("p", { class: "error" }, "This token cannot read /health/status (it needs metrics:read)."));
        return;
      }
      throw error;
    }
    if (!current(page)) return;
    const dead = status.queues.filter((q) => q.kind === "dead_letter").reduce((n, q) => n + q.messages, 0);
    const counts = (by) => Object.entries(by || {}).map(([k, v]) => h("span", { class: "count" }, badge(k), ` ${v}`));
    main.replaceChildren(
      h("h1", {}, "Workers ", h("span", { class: `badge ${status.status === "ok" ? "status-complete" : "status-error"}` }, status.status)),
      h(
        "div",
        { class: "tiles" },
        h("div", { class: `tile ${dead ? "alarm" : ""}` }, h("div", { class: "big", id: "dead-letter-count" }, String(dead)), "dead-lettered messages"),
        h("div", { class: "tile" }, h("div", { class: "big" }, String(status.workers.length)), "workers heard from"),
        h("div", { class: "tile" }, h("div", { class: "big" }, `${status.checks.database} / ${status.checks.broker}`), "PostgreSQL / RabbitMQ"),
      ),
      h("h2", {}, "Workers"),
      h(
        "table",
        { class: "grid", id: "workers-table" },
        h("thead", {}, h("tr", {}, ["Worker", "Namespaces", "Load", "Last seen"].map((c) => h("th", {}, c)))),
        h(
          "tbody",
          {},
          status.workers.map((w) =>
            h("tr", {}, h("td", { class: "mono" }, w.worker_id), h("td", {}, w.all_namespaces ? "all" : w.namespaces.join(", ")), h("td", {}, `${w.in_flight} / ${w.concurrency}`), h("td", {}, when(w.last_seen))),
          ),
        ),
      ),
      h("h2", {}, "Queues"),
      status.queues.length
        ? h(
            "table",
            { class: "grid", id: "queues-table" },
            h("thead", {}, h("tr", {}, ["Queue", "Kind", "Messages", "Consumers"].map((c) => h("th", {}, c)))),
            h("tbody", {}, status.queues.map((q) => h("tr", { class: q.kind === "dead_letter" && q.messages ? "alarm" : null }, h("td", { class: "mono" }, q.queue), h("td", {}, q.kind.replace("_", " ")), h("td", {}, q.messages), h("td", {}, q.consumers)))),
          )
        : h("p", { class: "muted" }, "Not read yet: the coordinator reads the queues every TASKER_GAUGE_INTERVAL_MS."),
      h("h2", {}, "Tasks by status"),
      h("p", {}, counts(status.counts?.tasks)),
      h("h2", {}, "Steps by status"),
      h("p", {}, counts(status.counts?.steps)),
    );
  };
  await render();
  // Workers report every few seconds; the page follows at that pace while open.
  const timer = setInterval(() => (current(page) ? render().catch(() => {}) : clearInterval(timer)), 5000);
}

// ---------------------------------------------------------------------------------------
// Analytics

const WINDOWS = { "1h": 3600e3, "6h": 6 * 3600e3, "24h": 24 * 3600e3, "7d": 7 * 24 * 3600e3 };

function bars(rows, keys, { unit = ms, id } = {}) {
  // rows: [{label, values: {key: number}}] → horizontal bars, one group per row
  const max = Math.max(1e-9, ...rows.flatMap((r) => keys.map((k) => r.values[k] || 0)));
  return h(
    "div",
    { class: "bars", id },
    rows.map((r) =>
      h(
        "div",
        { class: `bar-row ${r.classes || ""}`, "data-step": r.label },
        h("div", { class: "bar-label" }, r.label),
        h(
          "div",
          { class: "bar-track" },
          keys.map((k) => {
            const bar = h("div", { class: `bar bar-${k}`, title: `${k}: ${unit(r.values[k])}` }, h("span", {}, `${k} ${unit(r.values[k])}`));
            // Through the CSSOM: the console's policy refuses style attributes.
            bar.style.width = `${(100 * (r.values[k] || 0)) / max}%`;
            return bar;
          }),
        ),
      ),
    ),
  );
}

function lineChart(points, series, { unit = ms } = {}) {
  // points: [{at: Date, values: {key: number|null}}]
  const W = 640, H = 200, L = 64, B = 24, T = 10;
  const ns = "http://www.w3.org/2000/svg";
  const el = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const chart = el("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart" });
  const values = points.flatMap((p) => series.map((s) => p.values[s]).filter((v) => v !== null && v !== undefined));
  const max = Math.max(1e-9, ...values);
  const x = (i) => L + (i * (W - L - 10)) / Math.max(1, points.length - 1);
  const y = (v) => H - B - ((H - B - T) * v) / max;
  for (const f of [0, 0.5, 1]) {
    chart.append(el("line", { x1: L, x2: W - 10, y1: y(max * f), y2: y(max * f), class: "gridline" }));
    chart.append(el("text", { x: L - 6, y: y(max * f) + 4, class: "axis", "text-anchor": "end" }, unit(max * f)));
  }
  points.forEach((p, i) => {
    if (i % Math.ceil(points.length / 6) === 0) {
      chart.append(el("text", { x: x(i), y: H - 6, class: "axis", "text-anchor": "middle" }, p.at.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", hourCycle: "h23" })));
    }
  });
  for (const s of series) {
    const d = points
      .map((p, i) => (p.values[s] === null || p.values[s] === undefined ? null : `${x(i)},${y(p.values[s])}`))
      .filter(Boolean);
    if (d.length) chart.append(el("polyline", { points: d.join(" "), class: `series series-${s}` }));
    points.forEach((p, i) => {
      const v = p.values[s];
      if (v !== null && v !== undefined) chart.append(el("circle", { cx: x(i), cy: y(v), r: 3, class: `point series-${s}` }));
    });
  }
  const legend = h("div", { class: "legend" }, series.map((s) => h("span", { class: `key series-${s}` }, s)));
  return h("div", {}, chart, legend);
}

async function analyticsPage(main, params) {
  const page = app.page;
  const windowName = params.get("window") || "24h";
  const until = new Date();
  const since = new Date(until - (WINDOWS[windowName] || WINDOWS["24h"]));
  const namespace = params.get("namespace") || "";
  const name = params.get("name") || "";
  const windowSelect = h("select", { id: "analytics-window" }, Object.keys(WINDOWS).map((w) => h("option", { value: w, selected: w === windowName }, `last ${w}`)));
  const go = (extra) => {
    location.hash = `#/analytics${query({ window: windowSelect.value, namespace, name, ...extra })}`;
  };
  windowSelect.addEventListener("change", () => go({}));
  const { templates } = await api(`/v1/analytics/templates${query({ since: since.toISOString(), until: until.toISOString() })}`);
  if (!current(page)) return;
  const sections = [
    h("h1", {}, "Analytics ", windowSelect),
    h(
      "table",
      { class: "grid", id: "analytics-templates" },
      h("thead", {}, h("tr", {}, ["Template", "Tasks", "Complete", "Error", "Cancelled", "p50", "p95", "p99", "Per minute"].map((c) => h("th", {}, c)))),
      h(
        "tbody",
        {},
        templates.map((t) =>
          h(
            "tr",
            { class: t.namespace === namespace && t.name === name ? "selected" : null },
            h("td", {}, h("a", { href: `#/analytics${query({ window: windowName, namespace: t.namespace, name: t.name })}` }, `${t.namespace}/${t.name}`)),
            // The outcomes and durations come from the newest `considered` tasks.
            h("td", {}, t.tasks, t.considered < t.tasks ? h("span", { class: "muted", title: "the other figures are those of the newest tasks" }, ` (newest ${t.considered})`) : null),
            h("td", {}, t.complete),
            h("td", { class: t.error ? "error-text" : null }, t.error),
            h("td", {}, t.cancelled),
            h("td", {}, ms(t.duration_ms?.p50)),
            h("td", {}, ms(t.duration_ms?.p95)),
            h("td", {}, ms(t.duration_ms?.p99)),
            h("td", {}, t.throughput_per_min?.toFixed(2)),
          ),
        ),
      ),
    ),
  ];
  if (!templates.length) sections.push(h("p", { class: "muted" }, "No task was created in this window."));
  main.replaceChildren(...sections);
  if (!namespace || !name) {
    if (templates.length) main.append(h("p", { class: "muted" }, "Pick a template for its steps, its bottleneck path and its percentiles over time."));
    return;
  }
  const window = { namespace, name, since: since.toISOString(), until: until.toISOString() };
  const buckets = 12;
  const width = (until - since) / buckets;
  const [steps, bottlenecks, record, ...overTime] = await Promise.all([
    api(`/v1/analytics/steps${query(window)}`),
    api(`/v1/analytics/bottlenecks${query({ namespace, name, since: window.since })}`),
    api(`/v1/templates/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}`),
    ...Array.from({ length: buckets }, (_, i) =>
      api(`/v1/analytics/templates${query({ namespace, since: new Date(+since + i * width).toISOString(), until: new Date(+since + (i + 1) * width).toISOString() })}`),
    ),
  ]);
  if (!current(page)) return;
  const path = bottlenecks.path.map((p) => p.step);
  const onPath = new Set(path);
  const hot = new Set(path.slice(1).map((step, i) => `${path[i]}→${step}`));
  const slowest = [...steps.steps].sort((a, b) => (b.run_ms?.p50 || 0) - (a.run_ms?.p50 || 0))[0];
  const graph = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  graph.id = "bottleneck-graph";
  graph.classList.add("graph");
  const shareOf = new Map(bottlenecks.path.map((p) => [p.step, p.share]));
  drawGraph(
    graph,
    record.steps.map((s) => ({
      id: s.name,
      deps: s.depends_on,
      label: s.name,
      sublabel: onPath.has(s.name) ? `critical · ${pct(shareOf.get(s.name))}` : s.handler,
      classes: [onPath.has(s.name) ? "critical" : "status-template"],
    })),
    { hot },
  );
  const series = overTime.map((answer, i) => {
    const t = answer.templates.find((x) => x.namespace === namespace && x.name === name);
    return {
      at: new Date(+since + (i + 1) * width),
      values: t
        ? { p50: t.duration_ms?.p50, p95: t.duration_ms?.p95, p99: t.duration_ms?.p99, errors: t.complete + t.error ? t.error / (t.complete + t.error) : null }
        : { p50: null, p95: null, p99: null, errors: null },
    };
  });
  main.append(
    h("h2", {}, `${namespace}/${name}`),
    slowest ? h("p", {}, "Slowest step (median run): ", h("strong", { id: "slowest-step" }, slowest.step), ` at ${ms(slowest.run_ms?.p50)}.`) : null,
    h(
      "div",
      { class: "split" },
      h("section", { class: "card graph-card" }, h("h3", {}, `Bottleneck path (${ms(bottlenecks.total_ms)} mean, ready to done)`), h("ol", { id: "bottleneck-path" }, bottlenecks.path.map((p) => h("li", {}, `${p.step}: ${ms(p.mean_ms)} (${pct(p.share)})`))), h("div", { class: "scroll" }, graph)),
      h("section", { class: "card" }, h("h3", {}, "Task duration over time"), lineChart(series, ["p50", "p95", "p99"]), h("h3", {}, "Error rate over time"), lineChart(series, ["errors"], { unit: pct })),
    ),
    h(
      "section",
      { class: "card" },
      h("h3", {}, "Run time per step (p50, p95, p99)"),
      bars(steps.steps.map((s) => ({ label: s.step, values: s.run_ms || {}, classes: onPath.has(s.step) ? "critical" : "" })), ["p50", "p95", "p99"], { id: "step-run-bars" }),
      h("h3", {}, "Wait for a worker per step (ready → started)"),
      bars(steps.steps.map((s) => ({ label: s.step, values: s.wait_ms || {} })), ["p50", "p95", "p99"]),
      h("h3", {}, "Error and retry rates"),
      bars(steps.steps.map((s) => ({ label: s.step, values: { errors: s.error_rate, retries: s.retry_rate } })), ["errors", "retries"], { unit: pct }),
      h(
        "table",
        { class: "grid", id: "analytics-steps" },
        h("thead", {}, h("tr", {}, ["Step", "Runs", "Mean attempts", "Error rate", "Retry rate", "Run p50", "Run p99", "Wait p50", "Wait p99"].map((c) => h("th", {}, c)))),
        h(
          "tbody",
          {},
          steps.steps.map((s) =>
            h("tr", { "data-step": s.step, class: onPath.has(s.step) ? "critical" : null }, h("td", {}, s.step), h("td", {}, s.runs), h("td", {}, s.mean_attempts?.toFixed(2)), h("td", {}, pct(s.error_rate)), h("td", {}, pct(s.retry_rate)), h("td", {}, ms(s.run_ms?.p50)), h("td", {}, ms(s.run_ms?.p99)), h("td", {}, ms(s.wait_ms?.p50)), h("td", {}, ms(s.wait_ms?.p99))),
          ),
        ),
      ),
    ),
  );
}

// ---------------------------------------------------------------------------------------

document.getElementById("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  app.token = "";
  showSignIn("Token forgotten.");
});
window.addEventListener("hashchange", route);
start();
