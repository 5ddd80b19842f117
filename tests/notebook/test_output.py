"""Live outputs: the text fallback, final renderings, the status line, and choosing an output."""

from __future__ import annotations

import io
import json
import sys

import pytest

from fabstir_jupyter.errors import ModelNotAvailable
from fabstir_jupyter.inference import InferenceResult
from fabstir_jupyter.notebook import output
from fabstir_jupyter.notebook.output import OutputSink, TextOutput, make_output, render, status_line
from fabstir_jupyter.usage import UsageRecord


def result(text: str = "hello world ", **usage_fields) -> InferenceResult:
    usage = UsageRecord(time=0.0, request_id="r1", host="http://h:1", model="m1", received_tokens=2,
                        completion_tokens=2, ttft=0.05, duration=0.15, finish_reason="length", **usage_fields)
    return InferenceResult(text=text, finish_reason="length", usage=usage, host="http://h:1", model="m1",
                           ttft=0.05, request_id="r1")


def test_text_output_implements_the_sink_protocol():
    """TextOutput is an OutputSink."""
    assert isinstance(TextOutput(), OutputSink)


def test_text_output_streams_pieces_then_prints_the_status_line():
    """Pieces are written as they arrive; finish ends the line and adds the status, whose TTFT counts
    from the output's start (the cell's)."""
    out = io.StringIO()
    now = [100.0]
    sink = TextOutput("markdown", stream=out, rich=False, clock=lambda: now[0])
    sink.start(host=None, model="m1")
    now[0] += 0.05
    sink.append("hello ")
    assert out.getvalue() == "hello "
    sink.append("world")
    sink.finish(result("hello world"))
    lines = out.getvalue().splitlines()
    assert lines[0] == "hello world"
    assert lines[1].startswith("[fabstir] host http://h:1 | model m1 | ttft 50 ms | 10.0 tok/s | 2 tokens")
    assert sink.state == "done" and sink.text == "hello world"


def test_status_line_shows_cost_finish_reason_and_note():
    """Cost with its unit, the finish reason and a note appear in the status line."""
    line = status_line(result(cost=0.0002, cost_unit="USDC"), note="mode cheapest not supported")
    assert "cost 0.0002 USDC" in line and "finish length" in line
    assert line.endswith("mode cheapest not supported")


def test_cancelled_and_failed_states_are_marked():
    """cancelled() prints a marker line; failed() ends the partial line and keeps the error."""
    out = io.StringIO()
    sink = TextOutput(stream=out, rich=False)
    sink.start(host=None, model=None)
    sink.append("partial")
    sink.cancelled()
    assert out.getvalue() == "partial\n[fabstir] cancelled after 7 characters\n"
    sink.cancelled()  # idempotent
    assert out.getvalue().count("cancelled") == 1
    out2 = io.StringIO()
    failing = TextOutput(stream=out2, rich=False)
    failing.append("abc")
    error = ModelNotAvailable("nope")
    failing.failed(error)
    assert failing.state == "failed" and failing.error is error and out2.getvalue() == "abc\n"


def test_json_format_pretty_prints_in_a_terminal():
    """--format json prints the parsed answer indented after the stream."""
    out = io.StringIO()
    sink = TextOutput("json", stream=out, rich=False)
    sink.append('{"a": [1, 2]}')
    sink.finish(result('{"a": [1, 2]}'))
    assert json.dumps({"a": [1, 2]}, indent=2) in out.getvalue()


@pytest.mark.parametrize("fmt, text, mime, expected", [
    ("markdown", "# Title", "text/markdown", "# Title"),
    ("code", "```python\nx = 1\n```", "text/markdown", "```python\nx = 1\n```"),
    ("code", "x = {1: 2}", "text/markdown", "```\nx = {1: 2}\n```"),
    ("json", '```json\n{"a": 1}\n```', "application/json", {"a": 1}),
    ("json", "[1, 2]", "application/json", [1, 2]),
    ("json", "not json", "text/markdown", "```\nnot json\n```"),
])
def test_renderings_carry_the_format_and_a_stable_plain_text(fmt, text, mime, expected):
    """Each format gives its MIME type; text/plain is always present and free of addresses."""
    bundle = render(text, fmt)._repr_mimebundle_()
    assert bundle[mime] == expected
    assert "object at 0x" not in bundle["text/plain"]
    assert repr(render(text, fmt)) == text


def test_text_format_renders_plain_text_only():
    """--format text has only a text/plain rendering."""
    assert render("x", "text")._repr_mimebundle_() == {"text/plain": "x"}


def test_in_a_kernel_the_streamed_text_is_replaced_by_the_rendering(make_shell, monkeypatch):
    """With a rich front end the output is cleared and the Markdown rendering displayed."""
    from IPython.utils.capture import capture_output

    make_shell(load=False)
    monkeypatch.setattr(output, "_in_kernel", lambda: True)
    with capture_output() as captured:
        sink = TextOutput("markdown")
        sink.start(host=None, model=None)
        sink.append("**bold**")
        sink.finish(result("**bold**"))
    assert [o.data["text/markdown"] for o in captured.outputs] == ["**bold**"]
    assert captured.outputs[0].data["text/plain"] == "**bold**"
    assert "[fabstir] host http://h:1" in captured.stdout


def test_make_output_falls_back_to_text_without_a_kernel(isolated_env, monkeypatch):
    """Outside a kernel (or with FABSTIR_NO_WIDGETS=1) the text output is used."""
    monkeypatch.delenv("FABSTIR_NO_WIDGETS")
    assert not output.widgets_available()
    sink = make_output("code", True, note="n")
    assert isinstance(sink, TextOutput)
    assert (sink.format, sink.background, sink.note) == ("code", True, "n")


def test_make_output_respects_fabstir_no_widgets(isolated_env, monkeypatch):
    """FABSTIR_NO_WIDGETS=1 disables the widget even in a kernel."""

    class Kernel:
        comm_manager = object()

    monkeypatch.setattr(output, "_shell", lambda: type("Shell", (), {"kernel": Kernel()})())
    assert not output.widgets_available()
    monkeypatch.setenv("FABSTIR_NO_WIDGETS", "0")
    assert output.widgets_available()


def test_make_output_falls_back_when_the_widget_module_fails(monkeypatch):
    """A widget that cannot be imported leaves the text output in place."""
    monkeypatch.setattr(output, "widgets_available", lambda: True)
    monkeypatch.setitem(sys.modules, "fabstir_jupyter.notebook.widgets", None)  # import raises ImportError
    assert isinstance(make_output("markdown", False), TextOutput)


def test_make_output_passes_only_the_arguments_the_widget_accepts(monkeypatch):
    """The widget is built with the keyword arguments its constructor names."""
    import types

    made = {}

    class StreamOutput:
        def __init__(self, format="markdown", background=False):
            made.update(format=format, background=background)

    module = types.ModuleType("fabstir_jupyter.notebook.widgets")
    module.StreamOutput = StreamOutput
    monkeypatch.setattr(output, "widgets_available", lambda: True)
    monkeypatch.setitem(sys.modules, "fabstir_jupyter.notebook.widgets", module)
    assert isinstance(make_output("json", True, update_interval=0.1, note="x"), StreamOutput)
    assert made == {"format": "json", "background": True}


def test_status_line_after_a_failover_names_both_hosts_and_where_it_switched():
    """records with attempts on two hosts: host A → B after the tokens A delivered."""
    records = (
        UsageRecord(time=0.0, request_id="r1", host="http://a:1", received_tokens=37, error_code="CONNECTION_LOST"),
        UsageRecord(time=1.0, request_id="r1", host="http://b:2", received_tokens=20, attempt=2),
    )
    finished = InferenceResult(**{**result().__dict__, "host": "http://b:2", "records": records})
    line = status_line(finished)
    assert line.startswith("[fabstir] host http://a:1 → http://b:2 after 37 tokens | model m1")
    assert output.route_text(output.attempt_route(records * 1 + (
        UsageRecord(time=2.0, request_id="r1", host="http://c:3", received_tokens=1, attempt=3),))) == \
        "http://a:1 → http://b:2 after 37 tokens → http://c:3 after 57 tokens"
    busy = (UsageRecord(time=0.0, request_id="r1", host=None, error_code="NO_HOSTS_AVAILABLE"),
            UsageRecord(time=0.0, request_id="r1", host="http://a:1", error_code="HOST_BUSY"),
            UsageRecord(time=1.0, request_id="r1", host="http://a:1", received_tokens=2, attempt=2))
    assert output.attempt_route(busy) == [{"host": "http://a:1", "tokens": 2}]
    assert status_line(InferenceResult(**{**result().__dict__, "records": busy})).startswith(
        "[fabstir] host http://h:1 | model m1")


def test_cancelled_with_the_stopped_request_keeps_host_tokens_and_cost():
    """cancelled(result) prints the host, tokens and cost next to the characters received."""
    out = io.StringIO()
    sink = TextOutput(stream=out, rich=False)
    sink.start(host=None, model=None)
    sink.append("partial")
    sink.cancelled(result("partial", cost=0.00004, cost_unit="USDC"))
    assert out.getvalue() == ("partial\n[fabstir] cancelled after 7 characters | host http://h:1 | 2 tokens"
                              " | cost 4e-05 USDC\n")


def test_renderings_carry_escaped_html_for_exporters():
    """nbconvert renders text/markdown with raw HTML passed through, and prefers text/html: the
    rendering's text/html is Markdown with the model's markup escaped."""
    from nbconvert.filters.markdown import markdown2html

    text = "**ok** <script>alert(1)</script>"
    bundle = render(text, "markdown")._repr_mimebundle_()
    assert "<script>" in markdown2html(bundle["text/markdown"])  # why text/html must exist
    assert "<strong>ok</strong>" in bundle["text/html"] and "<script>" not in bundle["text/html"]
    assert "&lt;script&gt;" in bundle["text/html"]
    code = render("```\n</code><script>x</script>\n```", "code")._repr_mimebundle_()["text/html"]
    assert "<script>" not in code and code.startswith('<pre class="fabstir-code" style="')
    assert code.split(">", 1)[1].startswith("<code>&lt;/code&gt;")
    # long lines scroll instead of wrapping mid-word (a notebook's output area wraps <pre> anywhere)
    assert "white-space: pre;" in code and "overflow-x: auto" in code and "word-break: normal" in code


def paid_result(encrypted=True, job_ids=(7,), cost=0.00012) -> InferenceResult:
    """A paid answer: billed to ``job_ids`` at their price (the usage record's cost is the last attempt's)."""
    return InferenceResult(**{**result(cost=0.00001, cost_unit="USDC").__dict__, "job_ids": tuple(job_ids),
                              "cost": cost, "cost_unit": "USDC", "encrypted": encrypted})


@pytest.mark.parametrize("encrypted, lock", [(True, " | 🔒"), (False, " | 🔓 plaintext"), (None, "")])
def test_status_line_shows_a_paid_answers_cost_as_an_estimate_its_job_and_the_lock(encrypted, lock):
    """A paid answer's status line: its cost at its jobs' prices marked est. (the job settles later),
    the job, and the lock: 🔒 encrypted, 🔓 plaintext in clear, nothing when unknown."""
    line = status_line(paid_result(encrypted))
    assert line.endswith(f"| 2 tokens | cost 0.00012 USDC est. | job 7{lock} | finish length")
    assert "| jobs 7, 8 |" in status_line(paid_result(job_ids=(7, 8)))
    unpaid = status_line(InferenceResult(**{**result(cost=0.0002, cost_unit="USDC").__dict__,
                                            "encrypted": encrypted}))
    assert unpaid.endswith(f"| 2 tokens | cost 0.0002 USDC{lock} | finish length")
    assert "est." not in unpaid and "job" not in unpaid


def test_text_output_ends_with_the_lock_and_keeps_it_when_cancelled():
    """The plain-text fallback's last line carries the lock and the paid job, finished or cancelled."""
    out = io.StringIO()
    sink = TextOutput(stream=out, rich=False)
    sink.start(host=None, model=None)
    sink.append("hello world")
    sink.finish(paid_result(False))
    assert out.getvalue().splitlines()[-1].endswith("cost 0.00012 USDC est. | job 7 | 🔓 plaintext | finish length")
    out = io.StringIO()
    sink = TextOutput(stream=out, rich=False)
    sink.start(host=None, model=None)
    sink.append("half")
    sink.cancelled(paid_result(True))
    assert out.getvalue() == ("half\n[fabstir] cancelled after 4 characters | host http://h:1 | 2 tokens"
                              " | cost 0.00012 USDC est. | job 7 | 🔒\n")
