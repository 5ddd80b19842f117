// The host table's rows as the kernel sends them (fabstir_jupyter/notebook/tables.py), their
// order and their cell texts; the same order as HostDashboard.sorted_rows in Python.

import { formatNumber, formatPrice } from "./format";

/** One host (tables.HOST_COLUMNS); `price` is per 1000 tokens of the host's cheapest model. */
export interface HostRow {
  address: string | null;
  url: string;
  models: string[];
  region: string | null;
  stake: number | null;
  price: number | null;
  price_unit: string | null;
  latency_ms: number | null;
  status: string;
  requests: number; // requests that ended at this host
  tokens: number;
  failed: number; // requests whose last attempt failed here
  retried: number | null; // failed attempts here that another attempt followed (HOST_BUSY, failover)
}

/** One host and model of the usage summary (tables.USAGE_COLUMNS). */
export interface UsageRow {
  host: string | null;
  model: string | null;
  requests: number;
  failed: number;
  retried: number;
  tokens: number;
  cost: number | null;
  cost_unit: string | null;
  mean_ttft_ms: number | null;
  tokens_per_second: number | null;
}

/**
 * One paid job of this kernel (tables.JOB_COLUMNS). Amounts are whole tokens of `unit`; a job not
 * settled yet (status open, closing, unsettled) bills an estimate and has no refund.
 */
export interface JobRow {
  job_id: number;
  host: string | null;
  model: string | null;
  kind: string | null; // "session" or "tab" (stateless requests to one host); null once settled
  deposit: number | null;
  tokens: number | null;
  billed: number | null;
  refund: number | null;
  unit: string | null;
  status: string;
}

export type HostKey = keyof HostRow;
export type UsageKey = keyof UsageRow;
export type JobKey = keyof JobRow;

/** The host table's columns: [key, label, numeric]. */
export const COLUMNS: ReadonlyArray<readonly [HostKey, string, boolean]> = [
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
  ["failed", "Failed", true],
  ["retried", "Retried", true],
];

/** The usage table's columns: [key, label]. */
export const USAGE_COLUMNS: ReadonlyArray<readonly [UsageKey, string]> = [
  ["host", "Host"],
  ["model", "Model"],
  ["requests", "Requests"],
  ["failed", "Failed"],
  ["retried", "Retried"],
  ["tokens", "Tokens"],
  ["cost", "Cost"],
  ["mean_ttft_ms", "Mean TTFT"],
  ["tokens_per_second", "Tokens/s"],
];

/** The jobs table's columns: [key, label, numeric]. */
export const JOB_COLUMNS: ReadonlyArray<readonly [JobKey, string, boolean]> = [
  ["job_id", "Job", true],
  ["host", "Host", false],
  ["model", "Model", false],
  ["deposit", "Deposit", true],
  ["tokens", "Tokens billed", true],
  ["billed", "Billed", true],
  ["refund", "Refund", true],
  ["status", "Status", false],
];

/** Whether a job's bill is final (the chain settled it). */
export function jobSettled(row: JobRow): boolean {
  return row.status === "completed" || row.status === "timed_out";
}

type Cell = string | number | string[] | null | undefined;

function sortValue(value: Cell): string | number {
  if (Array.isArray(value)) return value.join(", ").toLowerCase();
  return typeof value === "string" ? value.toLowerCase() : (value as number);
}

function missing(value: Cell): boolean {
  return value === null || value === undefined;
}

/**
 * Rows ordered by `key`: missing values last in either direction, numbers by value, text
 * case-insensitively, lists by their joined text.
 */
export function sortRows(rows: readonly HostRow[], key: HostKey, ascending = true): HostRow[] {
  const present = rows.filter((row) => !missing(row[key]));
  const absent = rows.filter((row) => missing(row[key]));
  const rank = (value: string | number) => (typeof value === "number" ? 0 : 1);
  present.sort((a, b) => {
    const x = sortValue(a[key]);
    const y = sortValue(b[key]);
    const order = rank(x) - rank(y) || (x < y ? -1 : x > y ? 1 : 0);
    return ascending ? order : -order;
  });
  return present.concat(absent);
}

/** "0x1234…abcd" for a long address. */
export function shortAddress(address: string): string {
  return address.length > 14 ? `${address.slice(0, 6)}…${address.slice(-4)}` : address;
}

/**
 * A host's short name for labels: its URL's host and port ("node1.example.org", "127.0.0.1:8081"),
 * else its short address; at most 24 characters.
 */
export function shortName(row: Pick<HostRow, "url" | "address">): string {
  let name = "";
  try {
    const url = new URL(row.url);
    name = url.host.replace(/^www\./, "");
  } catch {
    name = String(row.url || "").replace(/^[a-z][\w+.-]*:\/\//i, "").split("/")[0];
  }
  if (!name && row.address) name = shortAddress(row.address);
  return name.length > 24 ? `${name.slice(0, 23)}…` : name || "?";
}

/** The text of one host-table cell. */
export function cellText(row: HostRow, key: HostKey): string {
  const value = row[key];
  if (value === null || value === undefined || value === "") return "—";
  if (key === "address") return shortAddress(String(value));
  if (key === "models") return Array.isArray(value) ? value.join(", ") || "—" : String(value);
  if (key === "price") return formatPrice(value as number, row.price_unit);
  if (key === "latency_ms") return `${formatNumber(value as number)} ms`;
  if (key === "stake") return formatNumber(value as number, 4);
  if (typeof value === "number") return formatNumber(value, 2);
  return String(value);
}

/** The text of one usage-table cell. */
export function usageCellText(row: UsageRow, key: UsageKey): string {
  const value = row[key];
  if (value === null || value === undefined || value === "") return "—";
  if (key === "cost") return formatPrice(value as number, row.cost_unit);
  if (key === "mean_ttft_ms") return `${formatNumber(value as number)} ms`;
  if (key === "tokens_per_second") return formatNumber(value as number, 1);
  if (typeof value === "number") return formatNumber(value, 2);
  return String(value);
}

/** The text of one jobs-table cell ("≈" marks what a job not settled yet has billed so far). */
export function jobCellText(row: JobRow, key: JobKey): string {
  const value = row[key];
  if (value === null || value === undefined || value === "") return "—";
  if (key === "job_id") return String(value);
  if (key === "deposit" || key === "refund") return formatPrice(value as number, row.unit);
  const estimate = jobSettled(row) ? "" : "≈"; // what settling now would bill: the chain fixes it then
  if (key === "billed") return `${estimate}${formatPrice(value as number, row.unit)}`;
  if (key === "tokens") return `${estimate}${formatNumber(value as number)}`;
  if (key === "status") return String(value).replace("_", " ");
  if (typeof value === "number") return formatNumber(value);
  return String(value);
}
