// The live answer (stream_output.ts): the kernel's messages, the final renderings, the buttons.

import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { FakeModel, flushFrames, hostElement, loadWidget, watchTimers } from "./support.mjs";

const { default: widget, applyMessage, newLiveText, markdownToHtml } = await loadWidget("stream_output");

let keys = 0;
function streamModel(state = {}) {
  return new FakeModel({ text: "", status: {}, format: "markdown", background: false, _key: `k${++keys}`, ...state });
}

/** initialize + render, as anywidget does; returns the host element and both cleanups. */
function mount(model) {
  const stopModel = widget.initialize({ model });
  const el = hostElement();
  const stopView = widget.render({ model, el });
  return { el, cleanup: () => { stopView(); stopModel(); } };
}

const text = (el, selector) => el.querySelector(selector)?.textContent ?? null;

describe("the live text", () => {
  it("appends deltas after a snapshot and follows a reset", () => {
    const live = newLiveText();
    assert.equal(applyMessage(live, { type: "snapshot", text: "Hello" }), true);
    assert.equal(applyMessage(live, " world"), true);
    assert.equal(applyMessage(live, "😀!"), true);
    assert.deepEqual([live.text, live.chars], ["Hello world😀!", 13]);
    applyMessage(live, { type: "reset" });
    applyMessage(live, "again");
    assert.equal(live.text, "again");
  });

  it("ignores deltas until a snapshot when it missed the start", () => {
    const live = newLiveText();
    assert.equal(applyMessage(live, " lost"), false);
    assert.equal(live.text, "");
    applyMessage(live, { type: "snapshot", text: "the start and more" });
    applyMessage(live, ", then this");
    assert.equal(live.text, "the start and more, then this");
  });

  it("ignores messages it does not know", () => {
    const live = newLiveText();
    for (const msg of [null, 3, { type: "delta", offset: 0, text: "x" }, { type: "snapshot" }]) {
      assert.equal(applyMessage(live, msg), false);
    }
    assert.equal(live.text, "");
  });
});

describe("the view", () => {
  it("shows text that arrived before it rendered, then grows", () => {
    const model = streamModel({ status: { state: "running", host: "http://h1:8080", model: "smol" } });
    const stopModel = widget.initialize({ model });
    model.receive({ type: "snapshot", text: "Once upon" });
    model.receive(" a time");
    const el = hostElement();
    const stopView = widget.render({ model, el });
    assert.equal(text(el, ".fabstir-live"), "Once upon a time");
    assert.equal(el.querySelector(".fabstir-stream").dataset.state, "running");
    model.receive(" there was");
    assert.equal(text(el, ".fabstir-live"), "Once upon a time"); // drawn in the next frame
    flushFrames();
    assert.equal(text(el, ".fabstir-live"), "Once upon a time there was");
    assert.match(text(el, ".fabstir-status"), /http:\/\/h1:8080 · smol · 26 chars/);
    stopView();
    stopModel();
    assert.equal(model.listeners("msg:custom"), 0);
    assert.equal(model.listeners("change:status"), 0);
  });

  it("says what the network is doing while the cell waits for it, then streams", () => {
    const model = streamModel({ status: { state: "running", model: "smol", step: "starting host 1/1 (loading SmolLM2)" } });
    const { el, cleanup } = mount(model);
    const root = el.querySelector(".fabstir-stream");
    assert.equal(text(el, ".fabstir-badge"), "starting");
    assert.equal(text(el, ".fabstir-status"), "starting host 1/1 (loading SmolLM2)… · smol");
    assert.equal(root.dataset.starting, "true");
    model.set("status", { state: "running", model: "smol", step: "discovering hosts" });
    flushFrames();
    assert.equal(text(el, ".fabstir-status"), "discovering hosts… · smol");
    model.set("status", { state: "running", model: "smol", step: null, network: 2.14 });
    model.receive({ type: "snapshot", text: "Rivers" });
    flushFrames();
    assert.equal(text(el, ".fabstir-badge"), "streaming");
    assert.equal(text(el, ".fabstir-status"), "smol · network ready in 2.1 s · 6 chars");
    assert.equal(root.dataset.starting, "false");
    model.set("text", "Rivers flow.");
    model.set("status", { state: "done", model: "smol", network: 2.14, ttft: 2.36, tokens: 3 });
    flushFrames();
    assert.equal(text(el, ".fabstir-status"), "smol · network ready in 2.1 s · TTFT 2.4 s · 3 tokens");
    cleanup();
  });

  it("renders the final Markdown with the model's HTML escaped and unsafe links dropped", () => {
    const hostile = [
      "# Result <img src=x onerror=alert(1)>",
      "",
      "Click [here](javascript:alert(1)) or [there](https://example.org/a?b=1&c=2).",
      "<script>alert(2)</script>",
      "<a href=\"javascript:alert(3)\">raw</a> ![pic](javascript:alert(4))",
      "",
      "```js",
      "console.log('<b>')",
      "```",
    ].join("\n");
    const model = streamModel();
    const { el, cleanup } = mount(model);
    model.set("text", hostile);
    model.set("status", { state: "done", tokens: 30 });
    flushFrames();
    const body = el.querySelector(".fabstir-body");
    assert.equal(body.querySelectorAll("img, script, iframe, [onerror]").length, 0);
    for (const link of body.querySelectorAll("a")) assert.match(link.getAttribute("href"), /^https:/);
    assert.equal(body.querySelector("a").getAttribute("rel"), "noopener noreferrer");
    assert.equal(body.querySelector("h1").textContent, "Result <img src=x onerror=alert(1)>");
    assert.match(body.textContent, /<script>alert\(2\)<\/script>/);
    assert.equal(body.querySelector("pre code.language-js").textContent, "console.log('<b>')\n");
    assert.equal(text(el, ".fabstir-status"), "30 tokens");
    cleanup();
  });

  it("renders code and JSON formats as escaped preformatted text", () => {
    const model = streamModel({ format: "json" });
    const { el, cleanup } = mount(model);
    model.set("text", '```json\n{"a": "<b>", "n": [1, 2]}\n```');
    model.set("status", { state: "done" });
    flushFrames();
    assert.equal(text(el, "pre.fabstir-code code"), '{\n  "a": "<b>",\n  "n": [\n    1,\n    2\n  ]\n}');
    model.set("format", "code");
    flushFrames();
    assert.equal(text(el, "pre.fabstir-code code"), '{"a": "<b>", "n": [1, 2]}');
    cleanup();
  });

  it("names both hosts of a failover and where it switched", () => {
    const model = streamModel();
    const { el, cleanup } = mount(model);
    model.set("text", "the answer");
    model.set("status", { state: "done", host: "http://b:2", model: "smol", tokens: 57,
      route: [{ host: "http://a:1", tokens: 37 }, { host: "http://b:2", tokens: 20 }] });
    flushFrames();
    assert.equal(text(el, ".fabstir-status"), "http://a:1 → http://b:2 after 37 tokens · smol · 57 tokens");
    cleanup();
  });

  it("keeps host, tokens and cost in a cancelled stream's status line", () => {
    const model = streamModel();
    const { el, cleanup } = mount(model);
    model.set("text", "half");
    model.set("status", { state: "cancelled", host: "http://h1:8080", model: "smol", ttft: 0.032, tokens: 12,
      cost: 0.000024, cost_unit: "USDC" });
    flushFrames();
    assert.equal(text(el, ".fabstir-status"), "http://h1:8080 · smol · TTFT 32 ms · 12 tokens · 0.000024 USDC");
    cleanup();
  });

  it("shows a paid stream's job, its cost so far as an estimate and the lock while running and when done", () => {
    const model = streamModel({ status: { state: "running", host: "http://h1:8080", model: "smol" } });
    const { el, cleanup } = mount(model);
    model.receive({ type: "snapshot", text: "Rivers" });
    model.set("status", { state: "running", host: "http://h1:8080", model: "smol", job_ids: [7], cost: 0.00012,
      cost_unit: "USDC", cost_estimate: true, encrypted: true });
    flushFrames();
    assert.equal(text(el, ".fabstir-status"), "http://h1:8080 · smol · 0.00012 USDC est. · job 7 · 🔒 · 6 chars");
    assert.match(el.querySelector(".fabstir-status").title, /end-to-end encrypted[\s\S]*est\./);
    model.set("text", "Rivers flow.");
    model.set("status", { state: "done", host: "http://h1:8080", model: "smol", tokens: 3, job_ids: [7, 8],
      cost: 0.0003, cost_unit: "USDC", cost_estimate: true, encrypted: true });
    flushFrames();
    assert.equal(text(el, ".fabstir-status"), "http://h1:8080 · smol · 3 tokens · 0.0003 USDC est. · jobs 7, 8 · 🔒");
    cleanup();
  });

  it("says plaintext when the stream was sent in clear and nothing when it is not known", () => {
    const model = streamModel({ status: { state: "running", host: "http://h", encrypted: false } });
    const { el, cleanup } = mount(model);
    assert.equal(text(el, ".fabstir-status"), "http://h · 🔓 plaintext · 0 chars");
    model.set("status", { state: "done", host: "http://h", tokens: 2, encrypted: null });
    model.set("text", "hi");
    flushFrames();
    assert.equal(text(el, ".fabstir-status"), "http://h · 2 tokens");
    assert.equal(el.querySelector(".fabstir-status").title, "");
    cleanup();
  });

  it("shows an error's code, message and hint, and a cancel note", () => {
    const model = streamModel();
    const { el, cleanup } = mount(model);
    model.set("text", "partial");
    model.set("status", { state: "error", error: { code: "HOST_BUSY", message: "host h1 is busy", hint: "retry" } });
    flushFrames();
    assert.equal(text(el, ".fabstir-error-line"), "[HOST_BUSY] host h1 is busy");
    assert.equal(text(el, ".fabstir-hint"), "hint: retry");
    model.set("status", { state: "cancelled" });
    flushFrames();
    assert.match(text(el, ".fabstir-cancel-line"), /^Cancelled/);
    cleanup();
  });

  it("sends a stop message from the stop button of a background stream", () => {
    const model = streamModel({ background: true, status: { state: "running" } });
    const { el, cleanup } = mount(model);
    const stop = el.querySelector(".fabstir-stop");
    assert.equal(stop.hidden, false);
    stop.click();
    assert.deepEqual(model.sent, [{ type: "stop" }]);
    assert.equal(stop.disabled, true);
    cleanup();
  });

  it("copies the answer and clears the copy button's timer on cleanup", async () => {
    const copied = [];
    navigator.clipboard.writeText = async (value) => { copied.push(value); };
    const model = streamModel({ text: "the answer", status: { state: "done" } });
    let copy;
    const { timers, cleared } = await watchTimers(async () => {
      const { el, cleanup } = mount(model);
      copy = el.querySelector(".fabstir-copy");
      assert.equal(copy.hidden, false);
      copy.click();
      await new Promise((resolve) => queueMicrotask(resolve)); // the clipboard's promise
      await Promise.resolve();
      assert.equal(copy.textContent, "Copied");
      cleanup();
    });
    assert.deepEqual(copied, ["the answer"]);
    const reset = [...timers].filter(([, t]) => t.kind === "setTimeout" && t.delay === 1500);
    assert.equal(reset.length, 1, "one timer puts the label back");
    assert.ok(cleared.has(reset[0][0]), "cleanup cleared the copy timer");
  });
});

describe("markdownToHtml", () => {
  it("renders lists, emphasis and code spans", () => {
    const html = markdownToHtml("Some **bold**, *it*, snake_case and `<code>`.\n\n- one\n- two\n\n1. first\n2. second");
    assert.match(html, /<strong>bold<\/strong>/);
    assert.match(html, /<em>it<\/em>/);
    assert.match(html, /snake_case/);
    assert.match(html, /<code>&lt;code&gt;<\/code>/);
    assert.match(html, /<ul>\s*<li>one<\/li>\s*<li>two<\/li>\s*<\/ul>/);
    assert.match(html, /<ol>\s*<li>first<\/li>\s*<li>second<\/li>\s*<\/ol>/);
  });
});
