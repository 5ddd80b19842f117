// The host dashboard (host_dashboard.ts, host_chart.ts): table, usage, chart, refresh.

import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { FakeModel, hostElement, loadWidget, watchTimers } from "./support.mjs";

const { default: widget, chartData, priceTick, shortName, jobCellText } = await loadWidget("host_dashboard");

function row(fields) {
  return {
    address: null, url: "http://h:1", models: ["smol"], region: null, stake: null, price: null, price_unit: null,
    latency_ms: null, status: "ok", requests: 0, tokens: 0, failed: 0, retried: 0, ...fields,
  };
}

const ROWS = [
  row({ address: "0x1111111111111111111111111111111111111111", url: "http://fast:1", price: 0.00175,
    price_unit: "USDC", latency_ms: 12, stake: 1000 }),
  row({ address: "0x2222222222222222222222222222222222222222", url: "https://node2.example.org/v1", price: 0.0035,
    price_unit: "USDC", latency_ms: 180, status: "unreachable" }),
  row({ url: "http://native:3", price: 0.000002, price_unit: "ETH", latency_ms: 40 }),
  row({ url: "http://new:4", status: "unknown" }),
];

function dashboardModel(state = {}) {
  return new FakeModel({ rows: ROWS, usage_rows: [], auto_refresh: 0, sort_by: "latency_ms", sort_ascending: true,
    all_kernels: false, updated: 0, error: "", ...state });
}

function rendered(model = dashboardModel()) {
  const el = hostElement();
  const cleanup = widget.render({ model, el });
  return { el, cleanup, model };
}

const texts = (nodes) => Array.from(nodes, (node) => node.textContent);
const text = (el, selector) => el.querySelector(selector)?.textContent ?? null;

/** Whether `value` is a multiple of a 1, 2 or 5 × 10^k step (nice ticks), within float noise. */
function isNiceStep(step) {
  const scaled = step / 10 ** Math.floor(Math.log10(step) + 1e-9);
  return [1, 2, 5].some((nice) => Math.abs(scaled - nice) < 1e-6);
}

describe("the chart", () => {
  it("has nice ticks starting at zero on both axes", () => {
    const { el, cleanup } = rendered();
    for (const axis of ["x", "y"]) {
      const ticks = texts(el.querySelectorAll(`.fabstir-chart [aria-label="${axis}-axis tick label"] text`)).map(Number);
      assert.ok(ticks.length >= 3, `${axis}: ${ticks}`);
      assert.equal(ticks[0], 0);
      const step = ticks[1] - ticks[0];
      assert.ok(isNiceStep(step), `${axis} step ${step}`);
      ticks.forEach((tick, i) => assert.ok(Math.abs(tick - i * step) < step * 1e-6, `${axis} tick ${tick}`));
    }
    const y = texts(el.querySelectorAll('.fabstir-chart [aria-label="y-axis tick label"] text'));
    assert.deepEqual(y.slice(0, 4), ["0", "0.0005", "0.001", "0.0015"]);
    cleanup();
  });

  it("labels each point with the host's short name and titles the axes in the table's unit", () => {
    const { el, cleanup } = rendered();
    const labels = texts(el.querySelectorAll(".fabstir-chart .fabstir-point-label text"));
    assert.deepEqual(labels, ["fast:1", "node2.example.org"]);
    assert.equal(el.querySelector('.fabstir-chart [aria-label="y-axis label"]').textContent,
      "↑ price per 1k tokens (USDC)");
    assert.equal(el.querySelector('.fabstir-chart [aria-label="x-axis label"]').textContent, "latency (ms) →");
    const tips = texts(el.querySelectorAll(".fabstir-chart circle title"));
    assert.equal(tips[0], "http://fast:1\n12 ms, 0.00175 USDC per 1k tokens, ok");
    const notes = texts(el.querySelectorAll(".fabstir-chart .fabstir-empty"));
    assert.deepEqual(notes, ["1 host without a latency or price not shown.", "1 host priced in ETH not shown."]);
    cleanup();
  });

  it("colours from the theme's variables and currentColor only", () => {
    const { el, cleanup } = rendered();
    const paints = new Set();
    for (const node of el.querySelectorAll(".fabstir-chart [fill], .fabstir-chart [stroke]")) {
      for (const name of ["fill", "stroke"]) if (node.hasAttribute(name)) paints.add(node.getAttribute(name));
    }
    for (const paint of paints) assert.match(paint, /^(currentColor|none|var\(--jp-[\w-]+, #[0-9a-f]+\))$/, paint);
    cleanup();
  });

  it("says why there is no chart", () => {
    const { el, cleanup } = rendered(dashboardModel({ rows: [row({ url: "http://new:4" })] }));
    assert.equal(el.querySelector(".fabstir-chart svg"), null);
    assert.match(el.querySelector(".fabstir-chart").textContent, /No host has both a measured latency and a price yet/);
    cleanup();
  });

  it("picks USDC like the table, else the most common unit", () => {
    assert.equal(chartData(ROWS).unit, "USDC");
    const native = chartData([row({ price: 1, price_unit: "ETH", latency_ms: 1 }), row({ price: 2, price_unit: "ETH",
      latency_ms: 2 }), row({ price: 3, price_unit: "POL", latency_ms: 3 })]);
    assert.equal(native.unit, "ETH");
    assert.deepEqual([...native.otherUnits], [["POL", 1]]);
  });

  it("formats price ticks without float noise or exponents", () => {
    assert.deepEqual([0, 0.0005, 0.0015000000000000002, 2e-7, 1.5].map(priceTick), ["0", "0.0005", "0.0015", "0.0000002", "1.5"]);
  });

  it("names hosts by host and port, else by short address", () => {
    assert.equal(shortName({ url: "http://127.0.0.1:8081", address: null }), "127.0.0.1:8081");
    assert.equal(shortName({ url: "https://www.example.org/v1/ws", address: null }), "example.org");
    assert.equal(shortName({ url: "", address: "0x1234567890abcdef1234" }), "0x1234…1234");
  });
});

describe("the tables", () => {
  it("sorts by a clicked header and writes the order back to the kernel", () => {
    const { el, cleanup, model } = rendered();
    const urls = () => texts(el.querySelectorAll(".fabstir-dash-content > table tbody tr td:nth-child(2)"));
    assert.deepEqual(urls(), ["http://fast:1", "http://native:3", "https://node2.example.org/v1", "http://new:4"]);
    el.querySelector('th[data-key="latency_ms"]').click();
    assert.deepEqual([model.get("sort_by"), model.get("sort_ascending"), model.saves], ["latency_ms", false, 1]);
    assert.deepEqual(urls(), ["https://node2.example.org/v1", "http://native:3", "http://fast:1", "http://new:4"]);
    cleanup();
  });

  it("shows host-provided text as text", () => {
    const hostile = row({ url: "http://evil:1", region: "<img src=x onerror=alert(1)>", price: 0.001, price_unit: "USDC",
      latency_ms: 5, models: ["<script>alert(1)</script>"] });
    const { el, cleanup } = rendered(dashboardModel({ rows: [hostile] }));
    assert.equal(el.querySelectorAll("img, script, [onerror]").length, 0);
    assert.match(el.querySelector(".fabstir-dash-content > table tbody").textContent, /<img src=x onerror=alert\(1\)>/);
    cleanup();
  });

  it("lists usage per host and model", () => {
    const usage = [{ host: "http://fast:1", model: "smol", requests: 2, failed: 0, retried: 3, tokens: 40, cost: 0.00008,
      cost_unit: "USDC", mean_ttft_ms: 200, tokens_per_second: 19 }];
    const { el, cleanup } = rendered(dashboardModel({ usage_rows: usage }));
    const heads = texts(el.querySelectorAll(".fabstir-usage thead th"));
    assert.deepEqual(heads.slice(2, 5), ["Requests", "Failed", "Retried"]);
    const cells = texts(el.querySelectorAll(".fabstir-usage tbody td"));
    assert.deepEqual(cells, ["http://fast:1", "smol", "2", "0", "3", "40", "0.00008 USDC", "200 ms", "19"]);
    cleanup();
  });

  it("has failed and retried columns, not errors", () => {
    const { el, cleanup } = rendered(dashboardModel({ rows: [row({ url: "http://a:1", requests: 5, failed: 1, retried: 4 })] }));
    const heads = texts(el.querySelectorAll(".fabstir-dash-content > table thead th"));
    assert.deepEqual(heads.slice(-4), ["Requests", "Tokens", "Failed", "Retried"]);
    assert.deepEqual(texts(el.querySelectorAll(".fabstir-dash-content > table tbody td")).slice(-4), ["5", "0", "1", "4"]);
    cleanup();
  });

  it("counts this kernel's usage until the all-kernels box is ticked", () => {
    const { el, cleanup, model } = rendered();
    assert.match(el.querySelector(".fabstir-usage .fabstir-subtitle").textContent, /\(this kernel\)/);
    const box = el.querySelector(".fabstir-usage input.fabstir-all-kernels");
    assert.equal(box.checked, false);
    box.checked = true;
    box.dispatchEvent(new window.Event("change"));
    assert.deepEqual([model.get("all_kernels"), model.saves], [true, 1]);
    assert.match(el.querySelector(".fabstir-usage .fabstir-subtitle").textContent, /\(all kernels\)/);
    assert.equal(el.querySelector(".fabstir-usage input.fabstir-all-kernels").checked, true);
    cleanup();
  });
});

describe("refreshing", () => {
  it("sends a refresh from the button and settles when the kernel answers", async () => {
    const { timers, cleared } = await watchTimers(() => {
      const { el, cleanup, model } = rendered();
      const button = el.querySelector(".fabstir-dash-header .fabstir-button");
      button.click();
      assert.deepEqual(model.sent, [{ type: "refresh" }]);
      assert.equal(button.disabled, true);
      model.set("updated", 1_700_000_000);
      assert.equal(button.disabled, false);
      cleanup();
    });
    assert.equal(timers.size, 1);
    assert.ok(cleared.has([...timers.keys()][0]));
  });

  it("auto-refreshes from initialize, once per period, and stops on cleanup", async () => {
    const model = dashboardModel({ auto_refresh: 30 });
    const { timers, cleared } = await watchTimers(({ timers: set }) => {
      const cleanup = widget.initialize({ model });
      const [[, timer]] = [...set];
      assert.deepEqual([timer.kind, timer.delay], ["setInterval", 30_000]);
      timer.callback();
      timer.callback(); // the kernel has not answered: no second request
      assert.deepEqual(model.sent, [{ type: "refresh" }]);
      model.set("updated", 1);
      timer.callback();
      assert.equal(model.sent.length, 2);
      cleanup();
      return null;
    });
    assert.ok([...timers.keys()].every((id) => cleared.has(id)));
    assert.equal(model.listeners("change:auto_refresh"), 0);
  });
});

describe("the jobs table", () => {
  const JOBS = [
    { job_id: 3, host: "http://fast:1", model: "smol", kind: "session", deposit: 0.5, tokens: 100, billed: 0.0002,
      refund: 0.4998, unit: "USDC", status: "completed" },
    { job_id: 4, host: "http://fast:1", model: "smol", kind: "tab", deposit: 4.096, tokens: 120, billed: 0.00024,
      refund: null, unit: "USDC", status: "open" },
  ];

  it("lists each paid job with its deposit, bill and refund; an open job's bill marked as an estimate", () => {
    const { el, cleanup } = rendered(dashboardModel({ job_rows: JOBS, paid: true }));
    const box = el.querySelector(".fabstir-jobs");
    assert.ok(box, "no jobs table");
    assert.deepEqual(texts(box.querySelectorAll("thead th")),
      ["Job", "Host", "Model", "Deposit", "Tokens billed", "Billed", "Refund", "Status"]);
    const rows = Array.from(box.querySelectorAll("tbody tr"), (tr) => texts(tr.querySelectorAll("td")));
    assert.deepEqual(rows, [
      ["3", "http://fast:1", "smol", "0.5 USDC", "100", "0.0002 USDC", "0.4998 USDC", "completed"],
      ["4", "http://fast:1", "smol", "4.096 USDC", "≈120", "≈0.00024 USDC", "—", "open"],
    ]);
    assert.equal(box.querySelectorAll('tr[data-settled="false"] td[title]').length, 2);
    cleanup();
  });

  it("says there are no jobs yet on a paid network and shows no table on an unpaid one", () => {
    const paid = rendered(dashboardModel({ job_rows: [], paid: true }));
    assert.equal(text(paid.el, ".fabstir-jobs .fabstir-empty"), "No paid jobs yet.");
    paid.cleanup();
    const free = rendered(dashboardModel({ job_rows: [], paid: false }));
    assert.equal(free.el.querySelector(".fabstir-jobs"), null);
    free.cleanup();
  });

  it("keeps a host's text out of the markup", () => {
    const hostile = { ...JOBS[1], host: "<img src=x onerror=alert(1)>", status: "<b>open</b>" };
    const { el, cleanup } = rendered(dashboardModel({ job_rows: [hostile], paid: true }));
    assert.equal(el.querySelectorAll(".fabstir-jobs img, .fabstir-jobs b").length, 0);
    assert.equal(jobCellText(hostile, "host"), "<img src=x onerror=alert(1)>");
    cleanup();
  });
});
