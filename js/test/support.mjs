// What the widget tests share: a DOM (happy-dom), the built widget modules, a fake anywidget
// model, animation frames run by hand, and a record of timers set and cleared.

import { copyFileSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

import { Window } from "happy-dom";

const HERE = dirname(fileURLToPath(import.meta.url));
/** Where the built modules are: $FABSTIR_WIDGETS_DIR (a fresh build), else the package's static folder. */
export const WIDGETS_DIR = resolve(process.env.FABSTIR_WIDGETS_DIR || join(HERE, "../../fabstir_jupyter/notebook/static"));

const window = new Window({ url: "http://localhost:8888/lab" });
for (const name of ["window", "document", "navigator", "Node", "HTMLElement", "SVGElement", "Event", "KeyboardEvent"]) {
  Object.defineProperty(globalThis, name, { value: name === "window" ? window : window[name], configurable: true, writable: true });
}

// Animation frames run when the test says so (the views draw in the next frame).
const frames = new Map();
let nextFrame = 1;
globalThis.requestAnimationFrame = (callback) => {
  frames.set(nextFrame, callback);
  return nextFrame++;
};
globalThis.cancelAnimationFrame = (id) => frames.delete(id);
/** Run the pending animation frames. */
export function flushFrames() {
  const due = [...frames.values()];
  frames.clear();
  for (const callback of due) callback(0);
}

const loaded = new Map();
/** Import a built widget module (copied to an .mjs file: the bundles are ES modules). */
export async function loadWidget(name) {
  if (!loaded.has(name)) {
    const dir = mkdtempSync(join(tmpdir(), "fabstir-widget-"));
    const copy = join(dir, `${name}.mjs`);
    copyFileSync(join(WIDGETS_DIR, `${name}.js`), copy);
    loaded.set(name, import(pathToFileURL(copy).href));
  }
  return loaded.get(name);
}

/** A stand-in for anywidget's model: traits, change events, custom messages both ways. */
export class FakeModel {
  constructor(state) {
    this.state = { ...state };
    this.handlers = new Map();
    this.sent = [];
    this.saves = 0;
  }

  get(name) {
    return this.state[name];
  }

  set(name, value) {
    this.state[name] = value;
    this.#emit(`change:${name}`);
  }

  on(event, callback) {
    if (!this.handlers.has(event)) this.handlers.set(event, new Set());
    this.handlers.get(event).add(callback);
  }

  off(event, callback) {
    this.handlers.get(event)?.delete(callback);
  }

  send(content) {
    this.sent.push(content);
  }

  save_changes() {
    this.saves++;
  }

  /** A custom message from the kernel. */
  receive(content) {
    this.#emit("msg:custom", content, []);
  }

  /** How many handlers listen to `event`. */
  listeners(event) {
    return this.handlers.get(event)?.size ?? 0;
  }

  #emit(event, ...args) {
    for (const callback of [...(this.handlers.get(event) ?? [])]) callback(...args);
  }
}

/** A fresh host element for render(). */
export function hostElement() {
  const el = document.createElement("div");
  document.body.append(el);
  return el;
}

/**
 * Record the timers set and cleared while `body({timers, cleared})` runs (real timers; callbacks still run).
 * Returns {timers: Map<id, {kind, callback, delay}>, cleared: Set<id>, result}.
 */
export async function watchTimers(body) {
  const saved = {
    setTimeout: globalThis.setTimeout, clearTimeout: globalThis.clearTimeout,
    setInterval: globalThis.setInterval, clearInterval: globalThis.clearInterval,
  };
  const timers = new Map();
  const cleared = new Set();
  const wrapSet = (kind) => (callback, delay, ...args) => {
    const id = saved[kind](callback, delay, ...args);
    timers.set(id, { kind, callback, delay });
    return id;
  };
  const wrapClear = (kind) => (id) => {
    if (id !== undefined && id !== null) cleared.add(id);
    return saved[kind](id);
  };
  globalThis.setTimeout = wrapSet("setTimeout");
  globalThis.setInterval = wrapSet("setInterval");
  globalThis.clearTimeout = wrapClear("clearTimeout");
  globalThis.clearInterval = wrapClear("clearInterval");
  try {
    const result = await body({ timers, cleared });
    return { timers, cleared, result };
  } finally {
    Object.assign(globalThis, saved);
    for (const [id, timer] of timers) if (!cleared.has(id)) saved[timer.kind === "setTimeout" ? "clearTimeout" : "clearInterval"](id);
  }
}
