// Batch progress: the view of fabstir_jupyter/notebook/widgets.py's BatchProgress.
// A hand-written ES module (no bundler, no imports). Model: done, total, errors, description.

/** The label beside the bar, e.g. "7/10 done (70%), 1 error". */
export function progressLabel(done, total, errors) {
  const percent = total > 0 ? ` (${Math.round((100 * done) / total)}%)` : "";
  const failed = errors ? `, ${errors} error${errors === 1 ? "" : "s"}` : "";
  return `${done}/${total} done${percent}${failed}`;
}

function render({ model, el: host }) {
  const root = document.createElement("div");
  root.className = "fabstir-progress";
  const description = document.createElement("span");
  description.className = "fabstir-progress-description";
  const track = document.createElement("div");
  track.className = "fabstir-progress-track";
  track.setAttribute("role", "progressbar");
  const ok = document.createElement("div");
  ok.className = "fabstir-progress-ok";
  const failed = document.createElement("div");
  failed.className = "fabstir-progress-failed";
  track.append(ok, failed);
  const label = document.createElement("span");
  label.className = "fabstir-progress-label";
  root.append(description, track, label);
  host.replaceChildren(root);

  function draw() {
    const done = Number(model.get("done")) || 0;
    const total = Number(model.get("total")) || 0;
    const errors = Math.min(Number(model.get("errors")) || 0, done);
    const share = (n) => (total > 0 ? Math.min(100, (100 * n) / total) : 0);
    ok.style.width = `${share(done - errors)}%`;
    failed.style.width = `${share(errors)}%`;
    track.setAttribute("aria-valuemin", "0");
    track.setAttribute("aria-valuemax", String(total));
    track.setAttribute("aria-valuenow", String(done));
    description.textContent = model.get("description") || "";
    description.hidden = !description.textContent;
    label.textContent = progressLabel(done, total, Number(model.get("errors")) || 0);
    root.dataset.finished = String(total > 0 && done >= total);
  }

  const names = ["done", "total", "errors", "description"];
  for (const name of names) model.on(`change:${name}`, draw);
  draw();
  return () => { for (const name of names) model.off(`change:${name}`, draw); };
}

export default { render };
