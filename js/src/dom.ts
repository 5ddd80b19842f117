// Small DOM helpers shared by the widgets. Text always goes in through textContent.

/** A new element with an optional class and text. */
export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className?: string,
  text?: string,
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A class-name-safe form of a value from the kernel (e.g. a host's status). */
export function classToken(value: unknown): string {
  return String(value).replace(/[^\w-]/g, "");
}
