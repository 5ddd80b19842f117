// Batch progress: the view of BatchProgress (fabstir_jupyter/notebook/widgets.py). No messages.

import type { Render } from "@anywidget/types";

import { el } from "./dom";

/** The synced traits of BatchProgress in fabstir_jupyter/notebook/widgets.py. */
export interface BatchProgressModel {
  done: number;
  total: number;
  errors: number;
  description: string;
}

const TRAITS = ["done", "total", "errors", "description"] as const;

/** The label beside the bar, e.g. "7/10 done (70%), 1 error". */
export function progressLabel(done: number, total: number, errors: number): string {
  const percent = total > 0 ? ` (${Math.round((100 * done) / total)}%)` : "";
  const failed = errors ? `, ${errors} error${errors === 1 ? "" : "s"}` : "";
  return `${done}/${total} done${percent}${failed}`;
}

const render: Render<BatchProgressModel> = ({ model, el: host }) => {
  const root = el("div", "fabstir-progress");
  const description = el("span", "fabstir-progress-description");
  const track = el("div", "fabstir-progress-track");
  track.setAttribute("role", "progressbar");
  const ok = el("div", "fabstir-progress-ok");
  const failed = el("div", "fabstir-progress-failed");
  track.append(ok, failed);
  const label = el("span", "fabstir-progress-label");
  root.append(description, track, label);
  host.replaceChildren(root);

  function draw(): void {
    const done = Number(model.get("done")) || 0;
    const total = Number(model.get("total")) || 0;
    const errors = Number(model.get("errors")) || 0;
    const share = (n: number) => (total > 0 ? Math.min(100, (100 * n) / total) : 0);
    const shownErrors = Math.min(errors, done);
    ok.style.width = `${share(done - shownErrors)}%`;
    failed.style.width = `${share(shownErrors)}%`;
    track.setAttribute("aria-valuemin", "0");
    track.setAttribute("aria-valuemax", String(total));
    track.setAttribute("aria-valuenow", String(done));
    description.textContent = model.get("description") || "";
    description.hidden = !description.textContent;
    label.textContent = progressLabel(done, total, errors);
    root.dataset.finished = String(total > 0 && done >= total);
  }

  for (const name of TRAITS) model.on(`change:${name}`, draw);
  draw();
  return () => {
    for (const name of TRAITS) model.off(`change:${name}`, draw);
  };
};

export default { render };
