// Batch progress (batch_progress.ts).

import assert from "node:assert/strict";
import { it } from "node:test";

import { FakeModel, hostElement, loadWidget } from "./support.mjs";

const { default: widget, progressLabel } = await loadWidget("batch_progress");

it("labels done, percent and errors", () => {
  assert.equal(progressLabel(7, 10, 1), "7/10 done (70%), 1 error");
  assert.equal(progressLabel(0, 0, 0), "0/0 done");
  assert.equal(progressLabel(3, 4, 2), "3/4 done (75%), 2 errors");
});

it("draws the bar and follows the model until cleanup", () => {
  const model = new FakeModel({ done: 2, total: 8, errors: 1, description: "prompts" });
  const el = hostElement();
  const cleanup = widget.render({ model, el });
  assert.equal(el.querySelector(".fabstir-progress-ok").style.width, "12.5%");
  assert.equal(el.querySelector(".fabstir-progress-failed").style.width, "12.5%");
  model.set("done", 8);
  assert.equal(el.querySelector(".fabstir-progress-label").textContent, "8/8 done (100%), 1 error");
  assert.equal(el.querySelector(".fabstir-progress").dataset.finished, "true");
  assert.equal(el.querySelector('[role="progressbar"]').getAttribute("aria-valuenow"), "8");
  cleanup();
  assert.equal(model.listeners("change:done"), 0);
});
