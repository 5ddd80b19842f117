// The final renderings of an answer: Markdown (markdown-it), code, JSON or plain text.
//
// The text comes from a model on a remote host, so it is untrusted. markdown-it runs with raw
// HTML off (any `<tag>` in the text is escaped, not passed through) and its default link check
// (javascript:, vbscript:, file: and non-image data: URLs are not made links); links open in a new
// tab without access to this page.

import MarkdownIt from "markdown-it";

const markdown = new MarkdownIt({ html: false, linkify: false, typographer: false });

const defaultLinkOpen = markdown.renderer.rules.link_open;
markdown.renderer.rules.link_open = (tokens, index, options, env, self) => {
  tokens[index].attrSet("target", "_blank");
  tokens[index].attrSet("rel", "noopener noreferrer");
  return defaultLinkOpen
    ? defaultLinkOpen(tokens, index, options, env, self)
    : self.renderToken(tokens, index, options);
};

/** The final formats of StreamOutput (its `format` trait). */
export type Format = "markdown" | "text" | "code" | "json";

/** Escape text for HTML element content and quoted attribute values. */
export const escapeHtml: (text: string) => string = markdown.utils.escapeHtml;

/** Render untrusted Markdown to HTML (raw HTML escaped, unsafe links dropped). */
export function markdownToHtml(source: string): string {
  return markdown.render(source);
}

const FENCED = /^\s*```[ \t]*([\w+#.-]*)[^\n]*\n([\s\S]*?)\n?```\s*$/;

/** The body of text wrapped in one code fence, else the text. */
export function unfence(text: string): string {
  const match = FENCED.exec(text);
  return match ? match[2] : text;
}

/** The final rendering of `text` in `format`, as an HTML string (the text escaped). */
export function renderFinal(text: string, format: Format): string {
  if (format === "markdown") return `<div class="fabstir-md">${markdownToHtml(text)}</div>`;
  if (format === "code") return `<pre class="fabstir-code"><code>${escapeHtml(unfence(text))}</code></pre>`;
  if (format === "json") {
    let shown = text;
    try {
      shown = JSON.stringify(JSON.parse(unfence(text)), null, 2);
    } catch {
      // not JSON: show it as it came
    }
    return `<pre class="fabstir-code"><code>${escapeHtml(shown)}</code></pre>`;
  }
  return `<div class="fabstir-plain">${escapeHtml(text)}</div>`;
}
