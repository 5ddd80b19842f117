"""The final rendering of an answer and its one-line status, shared by the widget and the text output.

:func:`render` wraps an answer for display per ``--format`` (Markdown, text, code, JSON);
:func:`answer_html` is its static HTML, rendered by markdown-it with raw HTML off (the same rules
as the widget's front end), so exported notebooks read well and model text never becomes markup;
:func:`status_line` is the one-line status (host, or ``A → B after N tokens`` after a failover,
model, the wait for the network, time to first token, tokens/s, tokens, cost, the paid job, the
encryption lock); :func:`format_error` the one line of an expected failure. :class:`LiveStatus` is
what a running stream's status line says besides its text: its paid job, the answer's cost so far
(an estimate until the job settles) and whether it is end-to-end encrypted. Nothing here displays
anything.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from .tables import host_text

if TYPE_CHECKING:
    from markdown_it import MarkdownIt
    from markdown_it.renderer import RendererHTML
    from markdown_it.token import Token
    from markdown_it.utils import OptionsDict

__all__ = [
    "STATUS_PREFIX", "ENCRYPTED", "PLAINTEXT", "LiveStatus", "Rendering", "answer_html", "attempt_route",
    "format_error", "hosts_part", "job_text", "lock_text", "network_part", "render", "route_text", "status_line",
    "usage_parts",
]

STATUS_PREFIX = "[fabstir]"
#: What a status line shows for an end-to-end encrypted stream, and for one sent in clear.
ENCRYPTED = "🔒"
PLAINTEXT = "🔓 plaintext"


def lock_text(encrypted: bool | None) -> str | None:
    """The encryption lock of a status line: :data:`ENCRYPTED` when every attempt of the stream was
    end-to-end encrypted (``True``), :data:`PLAINTEXT` when one was sent in clear (``False``), nothing
    when it is not known (``None``: nothing sent yet, or a cached answer)."""
    if encrypted is True:
        return ENCRYPTED
    if encrypted is False:
        return PLAINTEXT
    return None


def job_text(job_ids: Iterable[int] | None) -> str | None:
    """``job 3`` (or ``jobs 3, 4`` for an answer that went on on a new job); ``None`` when unpaid."""
    ids = list(job_ids or ())
    if not ids:
        return None
    return f"job {ids[0]}" if len(ids) == 1 else "jobs " + ", ".join(map(str, ids))


@dataclass(frozen=True)
class LiveStatus:
    """What a running stream's status line says besides its text (the bridge sends it to the output
    as it changes).

    Attributes:
        job_ids: the paid jobs the answer is billed to so far (the current one last); ``()`` unpaid.
        cost: the answer's cost so far, the tokens its hosts reported at its jobs' prices, in whole
            tokens of ``cost_unit``: an estimate until the job settles (the job's first proof bills at
            least its proof interval, and a remainder under 100 tokens may go unbilled); ``None`` unpaid.
        cost_unit: the payment token (``"USDC"``).
        encrypted: as :attr:`~fabstir_jupyter.streams.InferenceStream.encrypted`.
    """

    job_ids: tuple[int, ...] = ()
    cost: float | None = None
    cost_unit: str | None = None
    encrypted: bool | None = None

    @classmethod
    def of(cls, stream: Any) -> LiveStatus:
        """The live status of an :class:`~fabstir_jupyter.streams.InferenceStream` (or anything with
        its ``job_ids``, ``running_cost`` and ``encrypted``) now."""
        running = getattr(stream, "running_cost", None)
        cost, unit = running if running else (None, None)
        return cls(tuple(getattr(stream, "job_ids", ()) or ()), cost, unit, getattr(stream, "encrypted", None))

    def fields(self) -> dict[str, Any]:
        """The status fields of the widget (``StreamOutput.status``) this sets."""
        fields: dict[str, Any] = {"job_ids": list(self.job_ids) or None, "encrypted": self.encrypted}
        if self.job_ids:
            fields.update(cost=self.cost, cost_unit=self.cost_unit, cost_estimate=True)
        return fields


_FENCE = re.compile(r"\A\s*```[ \t]*(?P<lang>[\w+#.-]*)[ \t]*\n(?P<body>.*?)\n?```\s*\Z", re.DOTALL)


def _unfence(text: str) -> tuple[str, str]:
    """Return ``(body, language)`` of text wrapped in one code fence, else ``(text, "")``."""
    match = _FENCE.match(text)
    if match is None:
        return text, ""
    return match.group("body"), match.group("lang")


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt | None:
    """markdown-it configured like the widget's front end (js/src/markdown.ts), or None if missing."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # the notebook extra brings it; without it answers render as plain text
        return None
    md = MarkdownIt("js-default", {"html": False, "linkify": False, "typographer": False})

    def link_open(self: RendererHTML, tokens: Sequence[Token], index: int, options: OptionsDict,
                  env: MutableMapping[str, Any]) -> str:
        tokens[index].attrSet("target", "_blank")
        tokens[index].attrSet("rel", "noopener noreferrer")
        return self.renderToken(tokens, index, options, env)

    md.add_render_rule("link_open", link_open)
    return md


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


def answer_html(text: str, format: str = "markdown") -> str:
    """Return static HTML for an answer's final rendering (the widget's, without its JavaScript).

    The text is untrusted (it comes from a remote model): Markdown is rendered with raw HTML off (a
    ``<script>`` in the text is shown as text) and unsafe link schemes dropped; the other formats
    are escaped into ``<pre>`` or a ``<div>``.
    """
    if format == "markdown":
        md = _markdown()
        if md is not None:
            return f'<div class="fabstir-md">{md.render(text)}</div>'
        return f'<div class="fabstir-plain" style="white-space: pre-wrap">{_escape(text)}</div>'
    if format in ("code", "json"):
        body, _ = _unfence(text)
        if format == "json":
            try:
                body = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
            except ValueError:
                body = text
        # Long lines scroll instead of wrapping mid-word (front ends wrap <pre> in outputs).
        return (f'<pre class="fabstir-code" style="white-space: pre; overflow-x: auto; word-break: normal; '
                f'overflow-wrap: normal"><code>{_escape(body)}</code></pre>')
    return f'<div class="fabstir-plain" style="white-space: pre-wrap">{_escape(text)}</div>'


class Rendering:
    """The final rendering of an answer for IPython's display: a MIME bundle per ``format``.

    ``text/plain`` is always the answer's text, so terminals, nbconvert and nbval see stable output.
    ``text/html`` (:func:`answer_html`) is what exporters such as nbconvert choose first: the text's
    own markup never reaches it.
    """

    def __init__(self, text: str, format: str = "markdown") -> None:
        self.text = text
        self.format = format

    def __repr__(self) -> str:
        return self.text

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle: dict[str, Any] = {"text/plain": self.text}
        if self.format != "text":
            bundle["text/html"] = answer_html(self.text, self.format)
        if self.format == "markdown":
            bundle["text/markdown"] = self.text
        elif self.format == "code":
            body, language = _unfence(self.text)
            bundle["text/markdown"] = f"```{language}\n{body}\n```"
        elif self.format == "json":
            body, _ = _unfence(self.text)
            try:
                data = json.loads(body)
            except ValueError:
                bundle["text/markdown"] = f"```\n{self.text}\n```"
            else:
                bundle["text/plain"] = json.dumps(data, indent=2, ensure_ascii=False)
                bundle["application/json"] = data if isinstance(data, (dict, list)) else {"value": data}
        return bundle


def render(text: str, format: str = "markdown") -> Rendering:
    """Return the displayable final rendering of ``text`` (``markdown``, ``text``, ``code``, ``json``)."""
    return Rendering(text, format)


def attempt_route(records: Iterable[Any] | None) -> list[dict[str, Any]]:
    """Return the hosts a request went through, in order: ``[{"host": url, "tokens": n}, ...]``.

    ``records`` are the request's attempts (:class:`~fabstir_jupyter.usage.UsageRecord`, oldest
    first). Consecutive attempts on one host make one entry; ``tokens`` are the tokens delivered
    there. Attempts that reached no host are left out. One entry (or none) means no switch.
    """
    route: list[dict[str, Any]] = []
    for record in records or ():
        host = getattr(record, "host", None)
        if not host:
            continue
        tokens = int(getattr(record, "received_tokens", 0) or 0)
        if route and route[-1]["host"] == host:
            route[-1]["tokens"] += tokens
        else:
            route.append({"host": str(host), "tokens": tokens})
    return route


def route_text(route: list[dict[str, Any]]) -> str:
    """``A → B after 37 tokens`` for a route of :func:`attempt_route` (the tokens delivered before
    each switch); a route of one host is that host."""
    parts: list[str] = []
    delivered = 0
    for index, step in enumerate(route):
        if index == 0:
            parts.append(step["host"])
        else:
            parts.append(f"→ {step['host']}" + (f" after {delivered} tokens" if delivered else ""))
        delivered += int(step.get("tokens") or 0)
    return " ".join(parts)


def hosts_part(result: Any) -> str | None:
    """``host A`` (or ``host A → B after N tokens`` after a failover) of a request, if it reached one."""
    route = attempt_route(getattr(result, "records", None))
    if len(route) > 1:
        return f"host {route_text(route)}"
    host = host_text(getattr(result, "host", None))
    return f"host {host}" if host else None


def network_part(seconds: float) -> str:
    """``network ready in 2.1 s``: how long a cell waited for its network to start."""
    return f"network ready in {seconds:.1f} s"


def status_line(result: Any, note: str | None = None, *, ttft: float | None = None,
                network: float | None = None) -> str:
    """Return the one-line status of a finished request: host (``A → B after N tokens`` after a
    failover), model, the wait for the network (``network``, seconds, when the cell waited for it
    to start), ttft (``ttft`` when given, counted from the cell's start; else the request's),
    tokens/s, tokens, cost (``est.`` on a paid network: the job settles later), the paid job, the
    encryption lock (:func:`lock_text`)."""
    parts = []
    hosts = hosts_part(result)
    if hosts:
        parts.append(hosts)
    model = getattr(result, "model", None)
    if model:
        parts.append(f"model {model}")
    if network is not None:
        parts.append(network_part(network))
    if ttft is None:
        ttft = getattr(result, "ttft", None)
    if ttft is not None:
        parts.append(f"ttft {ttft * 1000:.0f} ms")
    usage = getattr(result, "usage", None)
    rate = getattr(usage, "tokens_per_second", None) if usage is not None else None
    if rate is not None:
        parts.append(f"{rate:.1f} tok/s")
    parts.extend(usage_parts(usage, result))
    reason = getattr(result, "finish_reason", None)
    if reason:
        parts.append(f"finish {reason}")
    if note:
        parts.append(note)
    return f"{STATUS_PREFIX} " + " | ".join(parts)


def format_error(error: BaseException) -> str:
    """The one line shown for an expected failure: ``FabstirError [CODE]: message (hint: ...)``."""
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    host = getattr(error, "host", None)
    if host:
        message = f"host {host}: {message}"
    line = f"FabstirError [{getattr(error, 'code', None) or type(error).__name__}]: {message}"
    hint = getattr(error, "hint", None)
    if hint:
        line += f" (hint: {hint})"
    return line.replace("\n", " ")


def usage_parts(usage: Any, result: Any = None) -> list[str]:
    """The tokens, cost, paid job and lock parts of a status line for a usage record and, where
    given, its request's result (a paid answer's cost is the result's, at its jobs' prices, marked
    ``est.``: the job settles later)."""
    parts = [f"{usage.received_tokens} tokens"] if usage is not None else []
    job_ids = getattr(result, "job_ids", None) or ()
    cost, unit = (getattr(usage, "cost", None), getattr(usage, "cost_unit", None))
    if job_ids and getattr(result, "cost", None) is not None:
        cost, unit = result.cost, result.cost_unit
    if cost is not None:
        parts.append(f"cost {cost:.6g} {unit or ''}".rstrip() + (" est." if job_ids else ""))
    for part in (job_text(job_ids), lock_text(getattr(result, "encrypted", None))):
        if part:
            parts.append(part)
    return parts


# --------------------------------------------------------------------------- the text fallback
