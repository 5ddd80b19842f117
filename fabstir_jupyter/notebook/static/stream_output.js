// The live answer of %%fabstir: the view of fabstir_jupyter/notebook/widgets.py's StreamOutput.
// A hand-written ES module (no bundler, no imports): anywidget loads it as the widget's _esm.
//
// Model (traits in widgets.py):
//   text        the final text, set once when the stream ends
//   status      {state: running|done|cancelled|error (empty before the start), host, model, ttft (s), tokens_per_second,
//                tokens, cost, cost_unit, finish_reason, note, error: {code, message, hint}}
//   format      markdown | text | code | json (the final rendering)
//   background  show a stop button while running
//   _key        keys this module's per-model live buffer (initialize and render get different proxies)
// Custom messages, kernel -> view: {type: "delta", offset, text}, {type: "snapshot", text},
// {type: "reset"}; view -> kernel: {type: "stop"}.
//
// initialize() registers the message handler per model, so messages that arrive before a view
// exists still land in the live buffer; render() only draws. A message sent before this module
// loaded is lost: deltas then no longer fit (offset != our length) and are ignored until a
// snapshot (sent each time the text doubles) or the final `text` trait catches up.

/** @typedef {{text: string, points: number, epoch: number, handled: boolean, views: Set<() => void>}} Live */

/** @type {Map<string, Live>} */
const LIVE = new Map();

/** Count code points (Python's len) of a JS string (UTF-16 code units). */
export function codePoints(s) {
  let n = s.length;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) {
      const d = s.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) { n--; i++; }
    }
  }
  return n;
}

/** A fresh live buffer. */
export function newLive() {
  return { text: "", points: 0, epoch: 0, handled: false, views: new Set() };
}

/**
 * Apply one kernel message to a live buffer; return whether the text changed.
 * A delta applies only where it starts at our length (offsets count code points, like Python);
 * a snapshot only if it is longer than what we have.
 */
export function applyMessage(live, msg) {
  if (!msg || typeof msg !== "object") return false;
  if (msg.type === "delta") {
    if (typeof msg.text !== "string" || msg.offset !== live.points) return false;
    live.text += msg.text;
    live.points += codePoints(msg.text);
    return msg.text.length > 0;
  }
  if (msg.type === "snapshot") {
    if (typeof msg.text !== "string") return false;
    const points = codePoints(msg.text);
    if (points <= live.points) return false;
    live.text = msg.text;
    live.points = points;
    live.epoch++;
    return true;
  }
  if (msg.type === "reset") {
    live.text = "";
    live.points = 0;
    live.epoch++;
    return true;
  }
  return false;
}

function liveFor(model) {
  const key = model.get("_key") || "";
  let live = LIVE.get(key);
  if (!live) {
    live = newLive();
    if (key) LIVE.set(key, live);
  }
  return live;
}

function listen(model, live) {
  const onCustom = (msg) => {
    if (applyMessage(live, msg)) for (const view of live.views) view();
  };
  model.on("msg:custom", onCustom);
  live.handled = true;
  return () => {
    model.off("msg:custom", onCustom);
    live.handled = false;
  };
}

// --------------------------------------------------------------------------- markdown

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

/** Escape text for HTML (element content and quoted attribute values). */
export function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

/** Bold and italic in escaped text (`**x**`, `__x__`, `*x*`, `_x_`; not inside words for `_`). */
function emphasis(s) {
  s = s.replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>");
  s = s.replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>");
  s = s.replace(/(^|[^*\w])\*(?=[^\s*])([^*\n]*?[^\s*])?\*(?!\*)/g,
    (m, pre, body) => (body === undefined ? m : `${pre}<em>${body}</em>`));
  return s.replace(/(^|[^\w])_(?=[^\s_])([^_\n]*?[^\s_])?_(?!\w)/g,
    (m, pre, body) => (body === undefined ? m : `${pre}<em>${body}</em>`));
}

/** Inline markdown of raw text: code spans, links (http/https only), bold, italic, line breaks. */
function inline(raw) {
  const kept = [];
  const keep = (html) => `\u0000${kept.push(html) - 1}\u0000`;
  let s = escapeHtml(String(raw).replace(/\u0000/g, "\ufffd"));
  s = s.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, _ticks, body) => keep(`<code>${body.trim() || body}</code>`));
  s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
    (_, label, url) => keep(`<a href="${url}" target="_blank" rel="noopener noreferrer">${emphasis(label)}</a>`));
  s = emphasis(s).replace(/\n/g, "<br>");
  for (let pass = 0; pass < 3 && s.includes("\u0000"); pass++) {
    s = s.replace(/\u0000(\d+)\u0000/g, (_, i) => kept[Number(i)]);
  }
  return s;
}

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
    BULLET.test(line) || NUMBERED.test(line);
}

/**
 * Render markdown to an HTML string. Safe for untrusted text: everything is escaped first and only
 * this function's own tags are added (no raw HTML passes through, links only for http/https).
 * Handles code fences, headings, rules, block quotes, bullet and numbered lists, paragraphs, and
 * inline code, links, bold and italic.
 */
export function markdownToHtml(src, depth = 0) {
  const lines = String(src).replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) { i++; continue; }
    if ((m = FENCE.exec(line))) {
      const close = new RegExp(`^ {0,3}${m[1][0] === "`" ? "`" : "~"}{${m[1].length},}\\s*$`);
      const body = [];
      for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
      i++;
      const lang = m[2] ? ` class="language-${escapeHtml(m[2])}"` : "";
      out.push(`<pre><code${lang}>${escapeHtml(body.join("\n"))}</code></pre>`);
    } else if ((m = HEADING.exec(line))) {
      const level = m[1].length;
      out.push(`<h${level}>${inline(m[2])}</h${level}>`);
      i++;
    } else if (RULE.test(line)) {
      out.push("<hr>");
      i++;
    } else if (QUOTE.test(line)) {
      const body = [];
      for (; i < lines.length && (m = QUOTE.exec(lines[i])); i++) body.push(m[1]);
      out.push(depth < 8
        ? `<blockquote>${markdownToHtml(body.join("\n"), depth + 1)}</blockquote>`
        : `<blockquote><p>${inline(body.join("\n"))}</p></blockquote>`);
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      const ordered = !BULLET.test(line);
      const pattern = ordered ? NUMBERED : BULLET;
      const items = [];
      const first = ordered ? Number(NUMBERED.exec(line)[1]) : 1;
      while (i < lines.length) {
        const item = pattern.exec(lines[i]);
        if (item) {
          items.push([ordered ? item[2] : item[1]]);
        } else if (lines[i].trim() && /^\s+/.test(lines[i]) && !startsBlock(lines[i])) {
          items[items.length - 1].push(lines[i].trim());  // an indented continuation line
        } else {
          break;
        }
        i++;
      }
      const tag = ordered ? "ol" : "ul";
      const start = ordered && first !== 1 ? ` start="${first}"` : "";
      out.push(`<${tag}${start}>${items.map((it) => `<li>${inline(it.join("\n"))}</li>`).join("")}</${tag}>`);
    } else {
      const body = [];
      for (; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i++) body.push(lines[i]);
      out.push(`<p>${inline(body.join("\n"))}</p>`);
    }
  }
  return out.join("\n");
}

// --------------------------------------------------------------------------- final renderings

const FENCED = /^\s*```[ \t]*([\w+#.-]*)[^\n]*\n([\s\S]*?)\n?```\s*$/;

/** The body of text wrapped in one code fence, else the text. */
export function unfence(text) {
  const m = FENCED.exec(text);
  return m ? m[2] : text;
}

/** The final rendering of `text` per `format`, as an HTML string (escaped). */
export function renderFinal(text, format) {
  if (format === "markdown") return `<div class="fabstir-md">${markdownToHtml(text)}</div>`;
  if (format === "code") return `<pre class="fabstir-code"><code>${escapeHtml(unfence(text))}</code></pre>`;
  if (format === "json") {
    let shown = text;
    try {
      shown = JSON.stringify(JSON.parse(unfence(text)), null, 2);
    } catch (_err) {
      // not JSON: show it as it came
    }
    return `<pre class="fabstir-code"><code>${escapeHtml(shown)}</code></pre>`;
  }
  return `<div class="fabstir-plain">${escapeHtml(text)}</div>`;
}

/** A cost or price with a few significant digits and no trailing zeros (0.000021, 0.0125). */
export function formatCost(cost) {
  if (cost === 0) return "0";
  return String(Number(Math.abs(cost) >= 0.01 ? cost.toFixed(4) : cost.toPrecision(3)));
}

/** The parts of the status line: host, model, TTFT, tokens/s, tokens, cost, finish reason, note. */
export function statusParts(status) {
  const s = status || {};
  const parts = [];
  if (s.host) parts.push(String(s.host));
  if (s.model) parts.push(String(s.model));
  if (typeof s.ttft === "number") parts.push(`TTFT ${Math.round(s.ttft * 1000)} ms`);
  if (typeof s.tokens_per_second === "number") parts.push(`${s.tokens_per_second.toFixed(1)} tok/s`);
  if (typeof s.tokens === "number") parts.push(`${s.tokens} tokens`);
  if (typeof s.cost === "number") parts.push(`${formatCost(s.cost)} ${s.cost_unit || ""}`.trim());
  if (s.finish_reason && s.finish_reason !== "stop") parts.push(`finish: ${s.finish_reason}`);
  if (s.note) parts.push(String(s.note));
  return parts;
}

// --------------------------------------------------------------------------- the widget

function initialize({ model }) {
  const live = liveFor(model);
  const unlisten = listen(model, live);
  return () => {
    unlisten();
    LIVE.delete(model.get("_key") || "");
  };
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function render({ model, el: host }) {
  const live = liveFor(model);
  const unlisten = live.handled ? null : listen(model, live);  // initialize did not run

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
  let finalKey = null;
  let cancelFrame = null;

  function drawLive() {
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

  function draw() {
    cancelFrame = null;
    const status = model.get("status") || {};
    const state = status.state || "new";  // "new": displayed before the stream started
    root.dataset.state = state;
    if (state === "running" || state === "new") {
      drawLive();
      const parts = statusParts({ host: status.host, model: status.model, ttft: status.ttft, note: status.note });
      if (state === "running") parts.push(`${live.points.toLocaleString()} chars`);
      statusLine.textContent = parts.join(" · ");
      badge.textContent = state === "running" ? "streaming" : "";
    } else {
      const text = model.get("text") || "";
      const format = model.get("format") || "markdown";
      const key = `${state}\u0000${format}\u0000${text}`;
      if (key !== finalKey) {
        // renderFinal escapes the host's text before adding its own tags.
        body.innerHTML = text ? renderFinal(text, format) : "";
        finalKey = key;
        shownEpoch = -1;
        shownLength = 0;
        liveText.textContent = "";
      }
      statusLine.textContent = statusParts(status).join(" · ");
      badge.textContent = state === "done" ? "" : state === "cancelled" ? "cancelled" : "error";
    }
    const error = state === "error" ? status.error || {} : null;
    problem.replaceChildren();
    if (error) {
      problem.append(el("div", "fabstir-error-line", `[${error.code || "ERROR"}] ${error.message || ""}`));
      if (error.hint) problem.append(el("div", "fabstir-hint", `hint: ${error.hint}`));
    } else if (state === "cancelled") {
      problem.append(el("div", "fabstir-cancel-line", "Cancelled: the text above is what arrived before the stop."));
    }
    problem.hidden = !problem.firstChild;
    badge.hidden = !badge.textContent;
    stop.hidden = !(model.get("background") && state === "running");
    if (stop.hidden) { stop.disabled = false; stop.textContent = "■ Stop"; }
    copy.hidden = state === "running" || state === "new" || !(model.get("text") || "");
  }

  function schedule() {
    if (cancelFrame) return;
    if (typeof requestAnimationFrame === "function") {
      const id = requestAnimationFrame(draw);
      cancelFrame = () => cancelAnimationFrame(id);
    } else {
      const id = setTimeout(draw, 16);
      cancelFrame = () => clearTimeout(id);
    }
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
    } catch (_err) {
      copy.textContent = "Copy failed";
    }
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  });

  live.views.add(schedule);
  for (const name of ["text", "status", "format", "background"]) model.on(`change:${name}`, schedule);
  draw();
  return () => {
    live.views.delete(schedule);
    for (const name of ["text", "status", "format", "background"]) model.off(`change:${name}`, schedule);
    if (unlisten) unlisten();
    if (cancelFrame) cancelFrame();
  };
}

export default { initialize, render };
