// Draws a workflow's steps as a layered graph in SVG: each step on the row below the
// deepest step it depends on, rows ordered to keep edges short (parents' mean position).
// No library: the console ships as plain files inside the coordinator.

const SVG = "http://www.w3.org/2000/svg";
const NODE_W = 168;
const NODE_H = 46;
const GAP_X = 28;
const GAP_Y = 44;
const PAD = 16;

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  }
  for (const child of children) {
    el.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return el;
}

// nodes: [{id, deps: [id]}] → Map id → {level, order, x, y}
export function layout(nodes) {
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const level = new Map();
  const visiting = new Set();
  const depth = (id) => {
    if (level.has(id)) return level.get(id);
    if (visiting.has(id)) return 0; // a cycle cannot be registered; stay safe anyway
    visiting.add(id);
    const deps = (byId.get(id)?.deps || []).filter((d) => byId.has(d));
    const l = deps.length ? Math.max(...deps.map(depth)) + 1 : 0;
    visiting.delete(id);
    level.set(id, l);
    return l;
  };
  nodes.forEach((n) => depth(n.id));
  const rows = [];
  for (const n of nodes) {
    const l = level.get(n.id);
    (rows[l] ||= []).push(n.id);
  }
  const order = new Map();
  rows.forEach((row) => row.forEach((id, i) => order.set(id, i)));
  // Two sweeps of the barycenter heuristic: each step under the mean of its parents.
  for (let sweep = 0; sweep < 2; sweep++) {
    for (let l = 1; l < rows.length; l++) {
      const key = (id) => {
        const deps = (byId.get(id).deps || []).filter((d) => order.has(d));
        return deps.length ? deps.reduce((s, d) => s + order.get(d), 0) / deps.length : order.get(id);
      };
      rows[l].sort((a, b) => key(a) - key(b) || order.get(a) - order.get(b));
      rows[l].forEach((id, i) => order.set(id, i));
    }
  }
  const widest = Math.max(1, ...rows.map((r) => r.length));
  const width = widest * NODE_W + (widest - 1) * GAP_X + 2 * PAD;
  const height = rows.length * NODE_H + Math.max(0, rows.length - 1) * GAP_Y + 2 * PAD;
  const at = new Map();
  rows.forEach((row, l) => {
    const rowWidth = row.length * NODE_W + (row.length - 1) * GAP_X;
    const start = (width - rowWidth) / 2;
    row.forEach((id, i) => {
      at.set(id, { level: l, x: start + i * (NODE_W + GAP_X), y: PAD + l * (NODE_H + GAP_Y) });
    });
  });
  return { at, width, height };
}

// Draw `nodes` ([{id, deps, label, sublabel, classes: [..]}]) into the <svg> `target`.
// options.onSelect(id) is called when a step is clicked; options.hot is a Set of
// "from→to" edges to draw highlighted (the bottleneck path).
export function drawGraph(target, nodes, options = {}) {
  const { at, width, height } = layout(nodes);
  target.replaceChildren();
  target.setAttribute("viewBox", `0 0 ${width} ${height}`);
  target.setAttribute("width", String(width));
  target.setAttribute("height", String(height));
  target.append(
    svg(
      "defs",
      {},
      svg(
        "marker",
        { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 8, markerHeight: 8, markerUnits: "userSpaceOnUse", orient: "auto-start-reverse" },
        svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead" }),
      ),
    ),
  );
  const hot = options.hot || new Set();
  const edges = svg("g", { class: "edges" });
  for (const n of nodes) {
    const to = at.get(n.id);
    for (const dep of n.deps || []) {
      const from = at.get(dep);
      if (!from) continue;
      const x1 = from.x + NODE_W / 2, y1 = from.y + NODE_H;
      const x2 = to.x + NODE_W / 2, y2 = to.y;
      const mid = (y1 + y2) / 2;
      edges.append(
        svg("path", {
          d: `M ${x1} ${y1} C ${x1} ${mid}, ${x2} ${mid}, ${x2} ${y2 - 2}`,
          class: hot.has(`${dep}→${n.id}`) ? "edge hot" : "edge",
          "marker-end": "url(#arrow)",
        }),
      );
    }
  }
  target.append(edges);
  const group = svg("g", { class: "nodes" });
  for (const n of nodes) {
    const p = at.get(n.id);
    const node = svg(
      "g",
      {
        class: ["node", ...(n.classes || [])].join(" "),
        transform: `translate(${p.x} ${p.y})`,
        "data-step": n.id,
        tabindex: 0,
        role: "button",
      },
      svg("title", {}, n.title || n.label || n.id),
      svg("rect", { width: NODE_W, height: NODE_H, rx: 7, ry: 7 }),
      svg("text", { x: NODE_W / 2, y: 19, class: "label" }, clip(n.label || n.id, 22)),
      svg("text", { x: NODE_W / 2, y: 36, class: "sublabel" }, clip(n.sublabel || "", 28)),
    );
    if (options.onSelect) {
      node.addEventListener("click", () => options.onSelect(n.id));
      node.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") options.onSelect(n.id);
      });
    }
    group.append(node);
  }
  target.append(group);
}

function clip(text, max) {
  return text.length > max ? text.slice(0, max - 1) + "…" : text;
}
