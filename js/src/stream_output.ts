// The live answer of %%fabstir: the view of StreamOutput (fabstir_jupyter/notebook/widgets.py).
//
// initialize() registers the custom-message handler once per model, so messages that arrive
// before any view exists still reach the live text; render() only draws. The messages and how the
// live text follows them: live_text.ts. When the stream ends the kernel sets the `text` trait and
// the view shows its final rendering (markdown.ts).

import type { AnyModel, Initialize, Render } from "@anywidget/types";

import { el } from "./dom";
import { formatCost } from "./format";
import { applyMessage, newLiveText, type LiveText } from "./live_text";
import { renderFinal, type Format } from "./markdown";

export { applyMessage, newLiveText } from "./live_text";
export { markdownToHtml, renderFinal } from "./markdown";

/** `status.error` of a failed stream. */
export interface StreamError {
  code?: string | null;
  message?: string | null;
  hint?: string | null;
}

/** One host of a request that went through several (failover), with the tokens it delivered. */
export interface RouteStep {
  host: string;
  tokens: number;
}

/** The `status` trait: the stream's state and figures (an empty object before start()). */
export interface StreamStatus {
  state?: "running" | "done" | "cancelled" | "error";
  host?: string | null;
  model?: string | null;
  step?: string | null; // what the network the cell waits for is doing (before any text)
  network?: number | null; // seconds the cell waited for its network to start
  ttft?: number | null; // seconds from the cell's start
  tokens_per_second?: number | null;
  tokens?: number | null;
  cost?: number | null;
  cost_unit?: string | null;
  finish_reason?: string | null;
  note?: string | null;
  error?: StreamError | null;
  route?: RouteStep[] | null; // set when the request switched hosts
  job_ids?: number[] | null; // the paid jobs the answer is billed to (unpaid: null)
  cost_estimate?: boolean | null; // the cost is the tokens so far at the jobs' prices, until they settle
  encrypted?: boolean | null; // end-to-end encrypted (true), sent in clear (false), unknown (null)
}

/** The synced traits of StreamOutput in fabstir_jupyter/notebook/widgets.py. */
export interface StreamOutputModel {
  text: string; // the final text, set once when the stream ends
  status: StreamStatus;
  format: Format; // the final rendering
  background: boolean; // show a stop button while running
  _key: string; // keys the per-model live text (initialize and render get different model proxies)
}

type Model = AnyModel<StreamOutputModel>;

/** What the model's handler (initialize) shares with its views (render). */
interface LiveState {
  live: LiveText;
  handled: boolean;
  views: Set<() => void>;
}

const STATES = new Map<string, LiveState>();
const TRAITS = ["text", "status", "format", "background"] as const;
const COPY_RESET_MS = 1500;

function stateFor(model: Model): LiveState {
  const key = model.get("_key") || "";
  let state = STATES.get(key);
  if (!state) {
    state = { live: newLiveText(), handled: false, views: new Set() };
    if (key) STATES.set(key, state);
  }
  return state;
}

function listen(model: Model, state: LiveState): () => void {
  const onCustom = (msg: unknown) => {
    if (applyMessage(state.live, msg)) for (const view of state.views) view();
  };
  model.on("msg:custom", onCustom);
  state.handled = true;
  return () => {
    model.off("msg:custom", onCustom);
    state.handled = false;
  };
}

/** "A → B after 37 tokens": the hosts of a route, with the tokens delivered before each switch. */
export function routeText(route: readonly RouteStep[]): string {
  let delivered = 0;
  return route
    .map((step, index) => {
      const text = index === 0 ? step.host : `→ ${step.host}${delivered ? ` after ${delivered} tokens` : ""}`;
      delivered += Number(step.tokens) || 0;
      return text;
    })
    .join(" ");
}

/** "job 3", or "jobs 3, 4" for an answer that went on on a new job (rendering.job_text in Python). */
export function jobText(jobIds: readonly number[] | null | undefined): string | null {
  if (!jobIds || !jobIds.length) return null;
  return jobIds.length === 1 ? `job ${jobIds[0]}` : `jobs ${jobIds.join(", ")}`;
}

/** The encryption lock (rendering.lock_text in Python): 🔒 encrypted, 🔓 plaintext, nothing when unknown. */
export function lockText(encrypted: boolean | null | undefined): string | null {
  if (encrypted === true) return "🔒";
  if (encrypted === false) return "🔓 plaintext";
  return null;
}

/** The status line's tooltip: what its lock and its estimated cost mean. */
export function statusTitle(status: StreamStatus | null | undefined): string {
  const s = status || {};
  const notes: string[] = [];
  if (s.encrypted === true) notes.push("🔒 end-to-end encrypted: only the host's key opens the prompt and the answer");
  if (s.encrypted === false) notes.push("🔓 sent in plaintext (the host has no published key, or encryption is off)");
  if (s.cost_estimate) notes.push("est.: the tokens so far at the job's price; the chain fixes the bill when the job is settled");
  return notes.join("\n");
}

/** "140 ms" under a second, else "2.3 s" (widgets._seconds_text in Python). */
export function durationText(seconds: number): string {
  return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(1)} s`;
}

/**
 * The parts of the status line: host (both hosts and where it switched, after a failover), model,
 * the wait for the network, TTFT, tokens/s, tokens, cost ("est." for a paid answer, whose job
 * settles later), the paid job, the encryption lock, finish reason, note. The same text as
 * widgets.status_text in Python.
 */
export function statusParts(status: StreamStatus | null | undefined): string[] {
  const s = status || {};
  const parts: string[] = [];
  if (s.route && s.route.length > 1) parts.push(routeText(s.route));
  else if (s.host) parts.push(String(s.host));
  if (s.model) parts.push(String(s.model));
  if (typeof s.network === "number") parts.push(`network ready in ${s.network.toFixed(1)} s`);
  if (typeof s.ttft === "number") parts.push(`TTFT ${durationText(s.ttft)}`);
  if (typeof s.tokens_per_second === "number") parts.push(`${s.tokens_per_second.toFixed(1)} tok/s`);
  if (typeof s.tokens === "number") parts.push(`${s.tokens} token${s.tokens === 1 ? "" : "s"}`);
  if (typeof s.cost === "number") {
    const cost = `${formatCost(s.cost)} ${s.cost_unit || ""}`.trim();
    parts.push(s.cost_estimate ? `${cost} est.` : cost);
  }
  for (const part of [jobText(s.job_ids), lockText(s.encrypted)]) if (part) parts.push(part);
  if (s.finish_reason && s.finish_reason !== "stop") parts.push(`finish: ${s.finish_reason}`);
  if (s.note) parts.push(String(s.note));
  return parts;
}

const initialize: Initialize<StreamOutputModel> = ({ model }) => {
  const unlisten = listen(model, stateFor(model));
  return () => {
    unlisten();
    STATES.delete(model.get("_key") || "");
  };
};

const render: Render<StreamOutputModel> = ({ model, el: host }) => {
  const state = stateFor(model);
  const live = state.live;
  const unlisten = state.handled ? null : listen(model, state); // a front end that skipped initialize

  const root = el("div", "fabstir-stream");
  const body = el("div", "fabstir-body");
  const liveText = el("div", "fabstir-live");
  const cursor = el("span", "fabstir-cursor");
  const problem = el("div", "fabstir-problem");
  const footer = el("div", "fabstir-footer");
  const badge = el("span", "fabstir-badge");
  const statusLine = el("span", "fabstir-status");
  const stop = el("button", "fabstir-button fabstir-stop", "■ Stop");
  const copy = el("button", "fabstir-button fabstir-copy", "Copy");
  stop.type = copy.type = "button";
  stop.title = "Stop this background stream";
  copy.title = "Copy the answer";
  footer.append(badge, statusLine, stop, copy);
  root.append(body, problem, footer);
  host.replaceChildren(root);

  let shownEpoch = -1;
  let shownLength = 0;
  let finalKey: string | null = null;
  let cancelFrame: (() => void) | null = null;
  let copyReset: ReturnType<typeof setTimeout> | null = null;
  let disposed = false;

  function drawLive(): void {
    if (live.epoch !== shownEpoch || live.text.length < shownLength) {
      liveText.textContent = live.text;
    } else if (live.text.length > shownLength) {
      liveText.append(document.createTextNode(live.text.slice(shownLength)));
    }
    shownEpoch = live.epoch;
    shownLength = live.text.length;
    if (body.firstChild !== liveText || body.childNodes.length !== 2) body.replaceChildren(liveText, cursor);
    finalKey = null;
  }

  function draw(): void {
    cancelFrame = null;
    const status = model.get("status") || {};
    const phase = status.state || "new"; // "new": displayed before the stream started
    root.dataset.state = phase;
    if (phase === "running" || phase === "new") {
      drawLive();
      // Before the first text, a cell may wait for its network to start: say what it is doing.
      const starting = phase === "running" && !!status.step && !live.text;
      const parts = statusParts({
        host: status.host, model: status.model, network: status.network, ttft: status.ttft, note: status.note,
        cost: status.cost, cost_unit: status.cost_unit, cost_estimate: status.cost_estimate,
        job_ids: status.job_ids, encrypted: status.encrypted,
      });
      if (starting) parts.unshift(`${status.step}…`);
      else if (phase === "running") parts.push(`${live.chars.toLocaleString()} chars`);
      statusLine.textContent = parts.join(" · ");
      statusLine.title = statusTitle(status);
      root.dataset.starting = starting ? "true" : "false";
      badge.textContent = starting ? "starting" : phase === "running" ? "streaming" : "";
    } else {
      root.dataset.starting = "false";
      const text = model.get("text") || "";
      const format = model.get("format") || "markdown";
      const key = `${phase}\u0000${format}\u0000${text}`;
      if (key !== finalKey) {
        // renderFinal escapes the model's text; only its own tags are HTML.
        body.innerHTML = text ? renderFinal(text, format) : "";
        finalKey = key;
        shownEpoch = -1;
        shownLength = 0;
        liveText.textContent = "";
      }
      statusLine.textContent = statusParts(status).join(" · ");
      statusLine.title = statusTitle(status);
      badge.textContent = phase === "done" ? "" : phase === "cancelled" ? "cancelled" : "error";
    }
    const error = phase === "error" ? status.error || {} : null;
    problem.replaceChildren();
    if (error) {
      problem.append(el("div", "fabstir-error-line", `[${error.code || "ERROR"}] ${error.message || ""}`));
      if (error.hint) problem.append(el("div", "fabstir-hint", `hint: ${error.hint}`));
    } else if (phase === "cancelled") {
      problem.append(el("div", "fabstir-cancel-line", "Cancelled: the text above is what arrived before the stop."));
    }
    problem.hidden = !problem.firstChild;
    badge.hidden = !badge.textContent;
    stop.hidden = !(model.get("background") && phase === "running");
    if (stop.hidden) {
      stop.disabled = false;
      stop.textContent = "■ Stop";
    }
    copy.hidden = phase === "running" || phase === "new" || !(model.get("text") || "");
  }

  function schedule(): void {
    if (cancelFrame) return;
    if (typeof requestAnimationFrame === "function") {
      const id = requestAnimationFrame(draw);
      cancelFrame = () => cancelAnimationFrame(id);
    } else {
      const id = setTimeout(draw, 16);
      cancelFrame = () => clearTimeout(id);
    }
  }

  function resetCopyLater(): void {
    if (copyReset) clearTimeout(copyReset);
    copyReset = setTimeout(() => {
      copyReset = null;
      copy.textContent = "Copy";
    }, COPY_RESET_MS);
  }

  stop.addEventListener("click", () => {
    stop.disabled = true;
    stop.textContent = "stopping…";
    model.send({ type: "stop" });
  });
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(model.get("text") || "");
      copy.textContent = "Copied";
    } catch {
      copy.textContent = "Copy failed";
    }
    if (!disposed) resetCopyLater(); // the view may have gone while the clipboard answered
  });

  state.views.add(schedule);
  for (const name of TRAITS) model.on(`change:${name}`, schedule);
  draw();
  return () => {
    disposed = true;
    state.views.delete(schedule);
    for (const name of TRAITS) model.off(`change:${name}`, schedule);
    if (unlisten) unlisten();
    if (cancelFrame) cancelFrame();
    if (copyReset) clearTimeout(copyReset);
    copyReset = null;
  };
};

export default { initialize, render };
