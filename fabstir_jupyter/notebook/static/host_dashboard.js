// The host dashboard: the view of fabstir_jupyter/notebook/widgets.py's HostDashboard.
// A hand-written ES module (no bundler, no imports): anywidget loads it as the widget's _esm.
//
// Model (traits in widgets.py):
//   rows            [{address, url, models[], region, stake, price, price_unit, latency_ms, status,
//                     requests, tokens, errors}]
//   usage_rows      [{host, model, requests, errors, tokens, cost, cost_unit, mean_ttft_ms, tokens_per_second}]
//   auto_refresh    seconds between refresh requests; 0 is off
//   sort_by, sort_ascending   the table's order (written here when a header is clicked)
//   updated         epoch seconds of the last refresh;  error   why the last refresh failed, or ""
// Custom messages, view -> kernel: {type: "refresh"} (the kernel reads its source again; it
// answers only when idle, so a request made while a cell runs waits for it).
//
// All host-provided text goes in through textContent: no innerHTML here.

const SVG = "http://www.w3.org/2000/svg";

/** The host table's columns: [key, label, numeric]. */
export const COLUMNS = [
  ["address", "Address", false],
  ["url", "URL", false],
  ["models", "Models", false],
  ["region", "Region", false],
  ["stake", "Stake", true],
  ["price", "Price /1k tok", true],
  ["latency_ms", "Latency", true],
  ["status", "Status", false],
  ["requests", "Requests", true],
  ["tokens", "Tokens", true],
  ["errors", "Errors", true],
];

const USAGE_COLUMNS = [
  ["host", "Host"],
  ["model", "Model"],
  ["requests", "Requests"],
  ["errors", "Errors"],
  ["tokens", "Tokens"],
  ["cost", "Cost"],
  ["mean_ttft_ms", "Mean TTFT"],
  ["tokens_per_second", "Tokens/s"],
];

function sortValue(value) {
  if (Array.isArray(value)) return value.join(", ").toLowerCase();
  return typeof value === "string" ? value.toLowerCase() : value;
}

/**
 * Rows ordered by `key` (the same order as HostDashboard.sorted_rows in Python): missing values
 * last in either direction, numbers by value, text case-insensitively, lists by their joined text.
 */
export function sortRows(rows, key, ascending = true) {
  const present = rows.filter((r) => r[key] !== null && r[key] !== undefined);
  const missing = rows.filter((r) => r[key] === null || r[key] === undefined);
  const rank = (v) => (typeof v === "number" ? 0 : 1);
  present.sort((a, b) => {
    const x = sortValue(a[key]);
    const y = sortValue(b[key]);
    const order = rank(x) - rank(y) || (x < y ? -1 : x > y ? 1 : 0);
    return ascending ? order : -order;
  });
  return present.concat(missing);
}

function number(value, digits = 0) {
  return value.toLocaleString(undefined, { maximumFractionDigits: digits });
}

function shortAddress(address) {
  return address.length > 14 ? `${address.slice(0, 6)}…${address.slice(-4)}` : address;
}

function formatPrice(value, unit) {
  const text = Math.abs(value) >= 0.01 ? number(value, 4) : String(Number(value.toPrecision(3)));
  return unit ? `${text} ${unit}` : text;
}

/** The text of one host-table cell. */
export function cellText(row, key) {
  const value = row[key];
  if (value === null || value === undefined || value === "") return "—";
  if (key === "address") return shortAddress(String(value));
  if (key === "models") return Array.isArray(value) ? value.join(", ") || "—" : String(value);
  if (key === "price") return formatPrice(value, row.price_unit);
  if (key === "latency_ms") return `${number(value)} ms`;
  if (key === "stake") return number(value, 4);
  if (typeof value === "number") return number(value, 2);
  return String(value);
}

function usageCell(row, key) {
  const value = row[key];
  if (value === null || value === undefined || value === "") return "—";
  if (key === "cost") return formatPrice(value, row.cost_unit);
  if (key === "mean_ttft_ms") return `${number(value)} ms`;
  if (key === "tokens_per_second") return number(value, 1);
  if (typeof value === "number") return number(value, 2);
  return String(value);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A latency (x) / price (y) scatter chart of the hosts that have both, as an inline SVG. */
function chart(rows) {
  const points = rows.filter((r) => typeof r.latency_ms === "number" && typeof r.price === "number");
  const box = el("div", "fabstir-chart");
  box.append(el("div", "fabstir-subtitle", "Latency and price"));
  if (!points.length) {
    box.append(el("div", "fabstir-empty", "No host has both a measured latency and a price yet."));
    return box;
  }
  const width = 420;
  const height = 240;
  const pad = { left: 64, right: 16, top: 12, bottom: 40 };
  const maxX = Math.max(...points.map((p) => p.latency_ms)) * 1.1 || 1;
  const maxY = Math.max(...points.map((p) => p.price)) * 1.1 || 1;
  const x = (v) => pad.left + (v / maxX) * (width - pad.left - pad.right);
  const y = (v) => height - pad.bottom - (v / maxY) * (height - pad.top - pad.bottom);
  const plot = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
    "aria-label": "host latency against price" });
  const axis = { class: "fabstir-axis" };
  plot.append(svg("line", { ...axis, x1: pad.left, y1: height - pad.bottom, x2: width - pad.right, y2: height - pad.bottom }));
  plot.append(svg("line", { ...axis, x1: pad.left, y1: pad.top, x2: pad.left, y2: height - pad.bottom }));
  for (const frac of [0, 0.5, 1]) {
    plot.append(svg("text", { class: "fabstir-tick", x: x(frac * maxX), y: height - pad.bottom + 14, "text-anchor": "middle" },
      number(frac * maxX)));
    plot.append(svg("text", { class: "fabstir-tick", x: pad.left - 6, y: y(frac * maxY) + 4, "text-anchor": "end" },
      frac ? formatPrice(frac * maxY) : "0"));
  }
  plot.append(svg("text", { class: "fabstir-label", x: (pad.left + width - pad.right) / 2, y: height - 6, "text-anchor": "middle" },
    "latency (ms)"));
  const unit = points.find((p) => p.price_unit)?.price_unit;
  plot.append(svg("text", { class: "fabstir-label", x: 12, y: (pad.top + height - pad.bottom) / 2, "text-anchor": "middle",
    transform: `rotate(-90 12 ${(pad.top + height - pad.bottom) / 2})` }, `price /1k tok${unit ? ` (${unit})` : ""}`));
  for (const p of points) {
    const dot = svg("circle", { class: `fabstir-dot fabstir-status-${String(p.status).replace(/[^\w-]/g, "")}`,
      cx: x(p.latency_ms), cy: y(p.price), r: 5 });
    dot.append(svg("title", {}, `${p.address || p.url}\n${cellText(p, "latency_ms")}, ${cellText(p, "price")}`));
    plot.append(dot);
  }
  box.append(plot);
  const left = rows.length - points.length;
  if (left) box.append(el("div", "fabstir-empty", `${left} host${left === 1 ? "" : "s"} without a latency or price not shown.`));
  return box;
}

function initialize({ model }) {
  // Auto-refresh lives with the model (not the views), so two views do not double the requests.
  let timer = null;
  let pendingSince = 0;
  const settle = () => { pendingSince = 0; };
  const arm = () => {
    if (timer) clearInterval(timer);
    timer = null;
    const seconds = Number(model.get("auto_refresh")) || 0;
    if (seconds > 0) {
      timer = setInterval(() => {
        if (pendingSince && Date.now() - pendingSince < 60000) return;  // the kernel is busy
        pendingSince = Date.now();
        model.send({ type: "refresh" });
      }, Math.max(1, seconds) * 1000);
    }
  };
  model.on("change:auto_refresh", arm);
  model.on("change:updated", settle);
  model.on("change:error", settle);
  arm();
  return () => { if (timer) clearInterval(timer); };
}

function render({ model, el: host }) {
  const root = el("div", "fabstir-dash");
  const header = el("div", "fabstir-dash-header");
  const title = el("span", "fabstir-title");
  const refresh = el("button", "fabstir-button", "↻ Refresh");
  const updated = el("span", "fabstir-updated");
  const error = el("span", "fabstir-dash-error");
  refresh.type = "button";
  refresh.title = "Discover and measure the hosts again (runs when the kernel is idle)";
  header.append(title, refresh, updated, error);
  const content = el("div", "fabstir-dash-content");
  root.append(header, content);
  host.replaceChildren(root);
  let waiting = null;

  function hostTable(rows) {
    const key = model.get("sort_by");
    const ascending = model.get("sort_ascending");
    const table = el("table", "fabstir-table");
    const head = table.createTHead().insertRow();
    for (const [column, label, numeric] of COLUMNS) {
      const th = el("th", numeric ? "fabstir-num" : "", label);
      th.tabIndex = 0;
      th.dataset.key = column;
      th.title = `Sort by ${label.toLowerCase()}`;
      if (column === key) {
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        th.append(el("span", "fabstir-arrow", ascending ? " ▲" : " ▼"));
      }
      const sort = () => {
        model.set("sort_ascending", column === key ? !ascending : true);
        model.set("sort_by", column);
        model.save_changes();
      };
      th.addEventListener("click", sort);
      th.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") sort(); });
      head.append(th);
    }
    const body = table.createTBody();
    for (const row of sortRows(rows, key, ascending)) {
      const tr = body.insertRow();
      for (const [column, , numeric] of COLUMNS) {
        const td = tr.insertCell();
        td.textContent = cellText(row, column);
        if (numeric) td.className = "fabstir-num";
        if (column === "address" && row.address) td.title = row.address;
        if (column === "status") td.className = `fabstir-status-${String(row.status).replace(/[^\w-]/g, "")}`;
      }
    }
    return table;
  }

  function usageTable(rows) {
    const box = el("div", "fabstir-usage");
    box.append(el("div", "fabstir-subtitle", "Usage by host and model"));
    if (!rows.length) {
      box.append(el("div", "fabstir-empty", "No usage recorded yet."));
      return box;
    }
    const table = el("table", "fabstir-table");
    const head = table.createTHead().insertRow();
    for (const [, label] of USAGE_COLUMNS) head.append(el("th", "", label));
    const body = table.createTBody();
    for (const row of rows) {
      const tr = body.insertRow();
      for (const [column] of USAGE_COLUMNS) {
        const td = tr.insertCell();
        td.textContent = usageCell(row, column);
        if (!["host", "model"].includes(column)) td.className = "fabstir-num";
      }
    }
    box.append(table);
    return box;
  }

  function draw() {
    const rows = model.get("rows") || [];
    title.textContent = `Hosts (${rows.length})`;
    const when = model.get("updated");
    updated.textContent = when ? `updated ${new Date(when * 1000).toLocaleTimeString()}` : "";
    error.textContent = model.get("error") || "";
    const children = [];
    children.push(rows.length ? hostTable(rows) : el("div", "fabstir-empty", "No hosts discovered yet."));
    children.push(usageTable(model.get("usage_rows") || []));
    children.push(chart(rows));
    content.replaceChildren(...children);
  }

  function settle() {
    if (waiting) clearTimeout(waiting);
    waiting = null;
    refresh.disabled = false;
    refresh.textContent = "↻ Refresh";
  }

  refresh.addEventListener("click", () => {
    refresh.disabled = true;
    refresh.textContent = "Refreshing…";
    model.send({ type: "refresh" });
    waiting = setTimeout(settle, 60000);
  });

  const names = ["rows", "usage_rows", "sort_by", "sort_ascending", "updated", "error"];
  for (const name of names) model.on(`change:${name}`, draw);
  model.on("change:updated", settle);
  model.on("change:error", settle);
  draw();
  return () => {
    for (const name of names) model.off(`change:${name}`, draw);
    model.off("change:updated", settle);
    model.off("change:error", settle);
    if (waiting) clearTimeout(waiting);
  };
}

export default { initialize, render };
