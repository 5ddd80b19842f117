"""Exported notebooks keep the answers: execute a notebook in a real kernel, export it to HTML.

nbconvert's HTML exporter shows a widget view only where the notebook carries widget state (and a
browser then needs the widget JavaScript from a CDN); otherwise it shows the highest-priority static
type of the display data. JupyterLab and Notebook 7 save notebooks without widget state by default,
and so do these executions (``store_widget_state=False``): the answer and the dashboard must then be
readable from the static fallbacks alone, and model text must never become markup.

The hosts are scripted reference hosts in this process on loopback: one plain, and one whose model
answers with HTML and Markdown (a hostile model).
"""

from __future__ import annotations

import asyncio
import html.parser
import re
from collections.abc import AsyncIterator

import nbformat
import pytest

from fabstir_jupyter.host.backends import GenerationParams, GenerationStats
from fabstir_jupyter.host.scripted import ScriptedBackend, scripted_text
from fabstir_jupyter.host.server import HostServer

pytest.importorskip("nbclient")
pytest.importorskip("nbconvert")

pytestmark = pytest.mark.timeout(180)

PROMPT = "Tell me about rivers"
HOSTILE_ANSWER = ("**Bold claim** <script>alert('pwned')</script> <img src=x onerror=alert(1)> "
                  "[click](javascript:alert(2)) the end")


class HostileBackend(ScriptedBackend):
    """Answers every prompt with :data:`HOSTILE_ANSWER`, word by word."""

    async def _tokens(self, params: GenerationParams, cancel: asyncio.Event,
                      stats: GenerationStats) -> AsyncIterator[str]:
        words = HOSTILE_ANSWER.split(" ")
        for index, word in enumerate(words[: params.max_tokens]):
            if cancel.is_set():
                return
            yield word if index == len(words) - 1 else word + " "
        stats.finish_reason = "stop"


@pytest.fixture
def hosts(start_host):
    """``(plain, hostile)``: two hosts on their own loop thread in this process."""
    return start_host(), start_host(backend=HostileBackend())


class VisibleText(html.parser.HTMLParser):
    """The text a browser shows: everything outside ``<script>``, ``<style>`` and tags."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("script", "style"):
            self._hidden += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self._hidden:
            self._hidden -= 1

    def handle_data(self, data):
        if not self._hidden:
            self.parts.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.parts).split())


def _notebook(plain: HostServer, hostile: HostServer) -> nbformat.NotebookNode:
    cells = [
        "%load_ext fabstir_jupyter\n%config FabstirMagics.usage_db = ':memory:'",
        f"%%fabstir --max-tokens 12 --host {plain.ws_url} --out answer\n{PROMPT}",
        f"%%fabstir --max-tokens 40 --host {hostile.ws_url}\nSay something bold.",
        "dashboard = %fabstir hosts\ndashboard",
        f"%%fabstir --max-tokens 5 --host {plain.ws_url} --format text\n{PROMPT}",
        "dashboard.refresh()  # the saved dashboard shows the latest usage",
    ]
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])


def _execute(nb: nbformat.NotebookNode, tmp_path, *, store_widget_state: bool) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=120, kernel_name="python3", store_widget_state=store_widget_state,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb


def _html(nb: nbformat.NotebookNode) -> str:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    return body


@pytest.fixture
def widget_env(isolated_env, monkeypatch):
    """The kernel gets the live widgets (a comm manager is there), as in JupyterLab."""
    monkeypatch.delenv("FABSTIR_NO_WIDGETS", raising=False)
    return isolated_env


def test_exported_html_shows_the_answers_and_the_dashboard_escaped(widget_env, hosts, tmp_path):
    """Executed in a kernel and saved without widget state (as JupyterLab saves), the HTML export
    shows each answer and its status line, the dashboard's rows for both hosts with the counts after
    the refresh, and the hostile model's markup only as text."""
    plain, hostile = hosts
    nb = _execute(_notebook(plain, hostile), tmp_path, store_widget_state=False)
    errors = [out for cell in nb.cells for out in cell.outputs if out.output_type == "error"]
    assert errors == []
    stream = nb.cells[1].outputs
    assert len(stream) == 1 and stream[0].output_type == "display_data"
    data = stream[0].data
    answer = scripted_text(PROMPT, 12)
    assert data["text/plain"] == answer  # the final text, not the empty one displayed at the start
    assert "application/vnd.jupyter.widget-view+json" in data  # the live widget is still there

    page = _html(nb)
    seen = VisibleText()
    seen.feed(page)
    visible = seen.text
    assert " ".join(answer.split()) in visible
    assert f"{plain.http_url} · scripted-1" in visible and "12 tokens" in visible  # the status line
    assert " ".join(scripted_text(PROMPT, 5).split()) in visible

    # The hostile answer: its Markdown renders, its HTML is text, its javascript: link is no link.
    assert "Bold claim" in visible and "<script>alert('pwned')</script>" in visible
    assert "<img src=x onerror=alert(1)>" in visible
    assert not any(tag == "img" and attrs.get("src") == "x" for tag, attrs in seen.tags)
    assert not any(attrs.get("onerror") for _, attrs in seen.tags)
    assert not any((attrs.get("href") or "").startswith("javascript:") for _, attrs in seen.tags)
    assert "alert('pwned')" not in "".join(re.findall(r"<script[^>]*>(.*?)</script>", page, re.DOTALL))
    assert ("strong", {}) in seen.tags

    # The dashboard: its display data was updated by refresh(); one row per host, with its usage.
    dashboard, = nb.cells[3].outputs
    assert dashboard.output_type == "display_data"  # displayed under its own id, so it can be updated
    table = dashboard.data["text/html"]
    for host in (plain, hostile):
        assert host.http_url in table
    plain_row = re.search(rf"<tr>\s*<td>[^<]*</td>\s*<td>{re.escape(plain.http_url)}</td>(.*?)</tr>",
                          table, re.DOTALL)
    assert plain_row is not None, table
    cells = re.findall(r"<td>([^<]*)</td>", plain_row.group(1))
    assert cells[-4:] == ["2", "17", "0", "0"]  # requests, tokens (12 + 5), failed, retried
    assert plain.http_url in visible and hostile.http_url in visible


@pytest.mark.parametrize("widgets", [True, False], ids=["widget", "text"])
def test_a_failed_cell_raises_once_stops_the_run_and_exports_the_partial_answer(
        isolated_env, monkeypatch, start_host, tmp_path, widgets):
    """nbclient runs a notebook whose second cell fails after some text: the run stops there (the
    kernel's reply is an error, so the third cell never runs), the error shows once (the widget's
    error state and a one-line error naming its code; without the widget, the error's one line),
    nothing goes to stderr, and the HTML export keeps the partial answer and the coded error."""
    from nbclient.exceptions import CellExecutionError

    if widgets:
        monkeypatch.delenv("FABSTIR_NO_WIDGETS", raising=False)
    broken = start_host(backend=ScriptedBackend(fail_after=4))
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext fabstir_jupyter\n%config FabstirMagics.usage_db = ':memory:'"),
        nbformat.v4.new_code_cell(f"%%fabstir --max-tokens 20 --host {broken.ws_url}\n{PROMPT}"),
        nbformat.v4.new_code_cell("print('the cell after the failed one ran')"),
    ])
    with pytest.raises(CellExecutionError) as raised:
        _execute(nb, tmp_path, store_widget_state=False)
    assert raised.value.ename == "HostError"
    failed, after = nb.cells[1], nb.cells[2]
    assert after.outputs == [] and after.execution_count is None  # Run All / nbconvert stopped there
    errors = [out for out in failed.outputs if out.output_type == "error"]
    assert len(errors) == 1 and not any(out.output_type == "stream" and out.name == "stderr"
                                        for out in failed.outputs)
    traceback, = errors[0].traceback  # one line, no Python traceback
    partial = " ".join(scripted_text(PROMPT, 4).split())
    message = "scripted failure after 4 tokens"
    if widgets:
        assert traceback == "FabstirError [HOST_ERROR]: the request failed (the output above says why)"
        assert failed.outputs[0].output_type == "display_data" and message in failed.outputs[0].data["text/html"]
    else:
        assert traceback.startswith("FabstirError [HOST_ERROR]: the stream broke on ") and message in traceback
    seen = VisibleText()
    seen.feed(_html(nb))
    assert partial in seen.text and "[HOST_ERROR]" in seen.text
    assert seen.text.count("no host could continue it") == 1  # the error's message shows once
