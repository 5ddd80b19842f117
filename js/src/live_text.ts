// The live text of a streaming answer, rebuilt from the kernel's messages.
//
// The kernel side is fabstir_jupyter/notebook/text_deltas.py (DeltaBatcher) and widgets.py
// (StreamOutput). Its custom messages:
//   " more words"                                   a delta: append (a bare string, to keep it small)
//   {type: "snapshot", text: "the whole text"}      replace the text
//   {type: "reset"}                                 a new stream begins: empty text
// A comm delivers messages in order and loses only those sent before the handler was registered
// (a prefix). So the text is in step after a snapshot or a reset; before that a delta is ignored
// (it would append to a text that misses its start) and the view waits for the next snapshot,
// which the kernel sends each time the text doubles, or for the final `text` trait.

/** A message from the kernel to the view. */
export type KernelMessage = string | { type: "snapshot"; text: string } | { type: "reset" };

/**
 * The live text of one model: `chars` counts its code points (Python's len); `epoch` changes when
 * the text is replaced rather than extended.
 */
export interface LiveText {
  text: string;
  chars: number;
  inStep: boolean;
  epoch: number;
}

/** An empty live text, not yet in step. */
export function newLiveText(): LiveText {
  return { text: "", chars: 0, inStep: false, epoch: 0 };
}

function codePoints(text: string): number {
  let count = 0;
  for (const _ of text) count++;
  return count;
}

/** Apply one kernel message to `live`; return whether its text changed. Unknown messages are ignored. */
export function applyMessage(live: LiveText, msg: unknown): boolean {
  if (typeof msg === "string") {
    if (!live.inStep || !msg) return false;
    live.text += msg;
    live.chars += codePoints(msg);
    return true;
  }
  if (!msg || typeof msg !== "object") return false;
  const { type, text } = msg as { type?: unknown; text?: unknown };
  if (type === "snapshot" && typeof text === "string") {
    const extendsText = live.inStep && text.startsWith(live.text);
    const changed = text !== live.text;
    if (!extendsText) live.epoch++;
    live.text = text;
    live.chars = codePoints(text);
    live.inStep = true;
    return changed || !extendsText;
  }
  if (type === "reset") {
    live.text = "";
    live.chars = 0;
    live.inStep = true;
    live.epoch++;
    return true;
  }
  return false;
}
