// The dashboard's latency/price chart, drawn by Observable Plot as an SVG.
//
// One dot per host that has both a measured latency and a price in the chart's unit, labelled with
// the host's short name; nice ticks on both axes, which start at zero. Colours come from
// JupyterLab's theme variables (text and axes use currentColor), so light and dark themes both read.

import * as Plot from "@observablehq/plot";

import { el } from "./dom";
import { formatNumber, formatPrice } from "./format";
import { shortName, type HostRow } from "./host_rows";

/** A host on the chart. */
export interface ChartPoint {
  name: string;
  latency: number;
  price: number;
  status: string;
  tip: string;
}

/** What the chart shows: its points, the price unit of the y axis, and which hosts are left out why. */
export interface ChartData {
  points: ChartPoint[];
  unit: string | null;
  unmeasured: number; // hosts without a latency or a price
  otherUnits: Map<string, number>; // hosts priced in another unit: unit -> count
}

const STATUS_COLORS: Record<string, string> = {
  ok: "var(--jp-brand-color1, #2f6fd0)",
  unreachable: "var(--jp-error-color1, #d32f2f)",
  unknown: "var(--jp-ui-font-color2, #8c959f)",
};
const OTHER_STATUS_COLOR = "var(--jp-warn-color1, #c77c02)";
const WIDTH = 480;
const HEIGHT = 280;
const TICKS = 5;
const MARGIN_LEFT = 40;
const LABEL_CHAR_PX = 6.5; // an estimate of a point label's character width at 11px
const TICK_CHAR_PX = 6.2; // and of a tick label's (tabular digits)

/**
 * The chart's data from the host rows: the price unit is the table's (USDC when any host has a
 * USDC price, else the most common unit); hosts in another unit or without latency or price are
 * counted, not drawn.
 */
export function chartData(rows: readonly HostRow[]): ChartData {
  const measured = rows.filter(
    (row) => typeof row.latency_ms === "number" && typeof row.price === "number" && Number.isFinite(row.price),
  );
  const counts = new Map<string, number>();
  for (const row of measured) counts.set(row.price_unit || "", (counts.get(row.price_unit || "") || 0) + 1);
  let unit: string | null = null;
  if (counts.has("USDC")) unit = "USDC";
  else if (counts.size) unit = [...counts].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1))[0][0];
  const otherUnits = new Map<string, number>();
  const points: ChartPoint[] = [];
  for (const row of measured) {
    const rowUnit = row.price_unit || "";
    if (rowUnit !== unit) {
      otherUnits.set(rowUnit || "no unit", (otherUnits.get(rowUnit || "no unit") || 0) + 1);
      continue;
    }
    const name = shortName(row);
    const latency = row.latency_ms as number;
    const price = row.price as number;
    const tip = `${row.url}\n${formatNumber(latency)} ms, ${formatPrice(price, row.price_unit)} per 1k tokens, ${row.status}`;
    points.push({ name, latency, price, status: String(row.status || "unknown"), tip });
  }
  return { points, unit: unit || null, unmeasured: rows.length - measured.length, otherUnits };
}

/** A price-axis tick without float noise, trailing zeros or exponent (0, 0.0005, 0.0015, 0.0000002). */
export function priceTick(value: number): string {
  const clean = Number(value.toPrecision(12));
  if (clean === 0) return "0";
  const text = String(clean);
  if (!text.includes("e")) return text;
  const decimals = Math.min(100, Math.ceil(-Math.log10(Math.abs(clean))) + 12);
  return clean.toFixed(decimals).replace(/0+$/, "").replace(/\.$/, "");
}

function notes(data: ChartData): string[] {
  const lines: string[] = [];
  const plural = (n: number) => (n === 1 ? "host" : "hosts");
  if (data.unmeasured) lines.push(`${data.unmeasured} ${plural(data.unmeasured)} without a latency or price not shown.`);
  for (const [unit, count] of data.otherUnits) lines.push(`${count} ${plural(count)} priced in ${unit} not shown.`);
  return lines;
}

/** The chart's box: a title, the plot (or why there is none) and notes on the hosts left out. */
export function hostChart(rows: readonly HostRow[]): HTMLElement {
  const data = chartData(rows);
  const box = el("div", "fabstir-chart");
  box.append(el("div", "fabstir-subtitle", "Latency and price"));
  if (!data.points.length) {
    box.append(el("div", "fabstir-empty", "No host has both a measured latency and a price yet."));
  } else {
    box.append(plotPoints(data));
  }
  for (const line of notes(data)) box.append(el("div", "fabstir-empty", line));
  return box;
}

function plotPoints(data: ChartData): SVGSVGElement | HTMLElement {
  const longest = Math.max(...data.points.map((p) => p.name.length));
  const marginRight = Math.min(170, 12 + Math.ceil(longest * LABEL_CHAR_PX));
  // Plot does not size the left margin to the tick labels: draw, measure the labels, redraw if short.
  let chart = draw(data, marginRight, MARGIN_LEFT);
  const labels = Array.from(chart.querySelectorAll('[aria-label="y-axis tick label"] text'), (t) => t.textContent || "");
  const needed = 14 + Math.ceil(Math.max(0, ...labels.map((label) => label.length)) * TICK_CHAR_PX);
  if (needed > MARGIN_LEFT) chart = draw(data, marginRight, needed);
  chart.setAttribute("aria-label", "host latency against price per 1k tokens");
  return chart;
}

function draw(data: ChartData, marginRight: number, marginLeft: number): SVGSVGElement | HTMLElement {
  const statuses = [...new Set(data.points.map((p) => p.status))].sort();
  return Plot.plot({
    document,
    className: "fabstir-plot",
    width: WIDTH,
    height: HEIGHT,
    marginLeft,
    marginRight,
    marginBottom: 40,
    style: { background: "transparent", fontSize: "11px", overflow: "visible" },
    // nice: the domains end on a tick of a 1-2-5 step series (as many ticks as `ticks` asks)
    x: { label: "latency (ms) →", zero: true, nice: TICKS, ticks: TICKS, grid: true, insetRight: 6,
      tickFormat: (value: number) => formatNumber(value) },
    y: { label: `↑ price per 1k tokens${data.unit ? ` (${data.unit})` : ""}`, zero: true, nice: TICKS,
      ticks: TICKS, grid: true, insetTop: 6, tickFormat: priceTick },
    color: {
      type: "ordinal",
      domain: statuses,
      range: statuses.map((status) => STATUS_COLORS[status] || OTHER_STATUS_COLOR),
      legend: statuses.length > 1,
    },
    marks: [
      Plot.dot(data.points, { x: "latency", y: "price", fill: "status", r: 5, title: "tip",
        stroke: "var(--jp-layout-color1, #fff)" }),
      Plot.text(data.points, { x: "latency", y: "price", text: "name", dx: 8, textAnchor: "start",
        fill: "currentColor", className: "fabstir-point-label" }),
    ],
  });
}
