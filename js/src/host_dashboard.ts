// The host dashboard: the view of HostDashboard (fabstir_jupyter/notebook/widgets.py): a sortable
// host table, a usage summary, this kernel's paid jobs (on a paid network) and the latency/price
// chart (host_chart.ts).
//
// Custom messages, view -> kernel: {type: "refresh"} (the kernel reads its source again; it
// answers only when idle, so a request made while a cell runs waits for it). The "all kernels"
// checkbox sets the `all_kernels` trait: the kernel recounts the usage over the whole shared ledger
// instead of this kernel's records. All host-provided text goes in through textContent (the
// chart's through Plot's text marks): no innerHTML here.

import type { AnyModel, Initialize, Render } from "@anywidget/types";

import { classToken, el } from "./dom";
import { hostChart } from "./host_chart";
import {
  cellText,
  COLUMNS,
  JOB_COLUMNS,
  jobCellText,
  jobSettled,
  sortRows,
  USAGE_COLUMNS,
  usageCellText,
  type HostKey,
  type HostRow,
  type JobRow,
  type UsageRow,
} from "./host_rows";

export { chartData, priceTick } from "./host_chart";
export { cellText, jobCellText, shortName, sortRows } from "./host_rows";

/** The synced traits of HostDashboard in fabstir_jupyter/notebook/widgets.py. */
export interface HostDashboardModel {
  rows: HostRow[];
  usage_rows: UsageRow[];
  job_rows: JobRow[]; // this kernel's paid jobs, by job id
  paid: boolean; // the network pays: show the jobs table, even empty
  auto_refresh: number; // seconds between refresh requests; 0 is off
  sort_by: HostKey; // the table's order, written here when a header is clicked
  sort_ascending: boolean;
  all_kernels: boolean; // usage of every kernel sharing the ledger, not only this one's
  updated: number; // epoch seconds of the last refresh
  error: string; // why the last refresh failed, or ""
}

type Model = AnyModel<HostDashboardModel>;

/** How long a refresh request may stay unanswered before the view asks again (the kernel is busy). */
const REFRESH_PATIENCE_MS = 60_000;
const DRAWN = [
  "rows", "usage_rows", "job_rows", "paid", "sort_by", "sort_ascending", "all_kernels", "updated", "error",
] as const;

// Auto-refresh lives with the model (not the views), so two views do not double the requests.
const initialize: Initialize<HostDashboardModel> = ({ model }) => {
  let timer: ReturnType<typeof setInterval> | null = null;
  let pendingSince = 0;
  const settle = () => {
    pendingSince = 0;
  };
  const arm = () => {
    if (timer) clearInterval(timer);
    timer = null;
    const seconds = Number(model.get("auto_refresh")) || 0;
    if (seconds > 0) {
      timer = setInterval(() => {
        if (pendingSince && Date.now() - pendingSince < REFRESH_PATIENCE_MS) return;
        pendingSince = Date.now();
        model.send({ type: "refresh" });
      }, Math.max(1, seconds) * 1000);
    }
  };
  model.on("change:auto_refresh", arm);
  model.on("change:updated", settle);
  model.on("change:error", settle);
  arm();
  return () => {
    if (timer) clearInterval(timer);
    model.off("change:auto_refresh", arm);
    model.off("change:updated", settle);
    model.off("change:error", settle);
  };
};

function hostTable(model: Model, rows: HostRow[]): HTMLTableElement {
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
    th.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") sort();
    });
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
      if (column === "status") td.className = `fabstir-status-${classToken(row.status)}`;
    }
  }
  return table;
}

function scopeToggle(model: Model): HTMLElement {
  const label = el("label", "fabstir-scope");
  const box = el("input", "fabstir-all-kernels");
  box.type = "checkbox";
  box.checked = !!model.get("all_kernels");
  label.title = "The usage ledger is shared by every kernel: count all of them, not only this one";
  box.addEventListener("change", () => {
    model.set("all_kernels", box.checked);
    model.save_changes();
  });
  label.append(box, document.createTextNode(" all kernels"));
  return label;
}

function usageTable(model: Model, rows: UsageRow[]): HTMLElement {
  const box = el("div", "fabstir-usage");
  const subtitle = el("div", "fabstir-subtitle",
    `Usage by host and model (${model.get("all_kernels") ? "all kernels" : "this kernel"}) `);
  subtitle.append(scopeToggle(model));
  box.append(subtitle);
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
      td.textContent = usageCellText(row, column);
      if (column !== "host" && column !== "model") td.className = "fabstir-num";
    }
  }
  box.append(table);
  return box;
}

function jobsTable(rows: JobRow[]): HTMLElement {
  const box = el("div", "fabstir-jobs");
  box.append(el("div", "fabstir-subtitle", "Paid jobs (this kernel; ≈ billed so far, until settled)"));
  if (!rows.length) {
    box.append(el("div", "fabstir-empty", "No paid jobs yet."));
    return box;
  }
  const table = el("table", "fabstir-table");
  const head = table.createTHead().insertRow();
  for (const [, label, numeric] of JOB_COLUMNS) head.append(el("th", numeric ? "fabstir-num" : "", label));
  const body = table.createTBody();
  for (const row of rows) {
    const tr = body.insertRow();
    tr.dataset.settled = jobSettled(row) ? "true" : "false";
    for (const [column, , numeric] of JOB_COLUMNS) {
      const td = tr.insertCell();
      td.textContent = jobCellText(row, column);
      if (numeric) td.className = "fabstir-num";
      if (column === "status") td.className = `fabstir-job-${classToken(row.status)}`;
      if ((column === "billed" || column === "tokens") && !jobSettled(row)) {
        td.title = "an estimate until the job is settled";
      }
    }
  }
  box.append(table);
  return box;
}

const render: Render<HostDashboardModel> = ({ model, el: host }) => {
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
  let waiting: ReturnType<typeof setTimeout> | null = null;

  function draw(): void {
    const rows = model.get("rows") || [];
    title.textContent = `Hosts (${rows.length})`;
    const when = model.get("updated");
    updated.textContent = when ? `updated ${new Date(when * 1000).toLocaleTimeString()}` : "";
    error.textContent = model.get("error") || "";
    const parts: Node[] = [
      rows.length ? hostTable(model, rows) : el("div", "fabstir-empty", "No hosts discovered yet."),
      usageTable(model, model.get("usage_rows") || []),
    ];
    const jobs = model.get("job_rows") || [];
    if (model.get("paid") || jobs.length) parts.push(jobsTable(jobs));
    parts.push(hostChart(rows));
    content.replaceChildren(...parts);
  }

  function settle(): void {
    if (waiting) clearTimeout(waiting);
    waiting = null;
    refresh.disabled = false;
    refresh.textContent = "↻ Refresh";
  }

  refresh.addEventListener("click", () => {
    refresh.disabled = true;
    refresh.textContent = "Refreshing…";
    model.send({ type: "refresh" });
    if (waiting) clearTimeout(waiting);
    waiting = setTimeout(settle, REFRESH_PATIENCE_MS);
  });

  for (const name of DRAWN) model.on(`change:${name}`, draw);
  model.on("change:updated", settle);
  model.on("change:error", settle);
  draw();
  return () => {
    for (const name of DRAWN) model.off(`change:${name}`, draw);
    model.off("change:updated", settle);
    model.off("change:error", settle);
    if (waiting) clearTimeout(waiting);
  };
};

export default { initialize, render };
