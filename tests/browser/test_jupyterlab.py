"""The quickstart notebook in a real browser, in JupyterLab and in Notebook 7 (Debian's Chromium,
driven by Playwright).

One Jupyter server (``jupyter lab``, which also serves Notebook 7's ``/notebooks`` pages when the
``notebook`` package is installed) runs as a subprocess on a free loopback port with a random
token, serving a temporary copy of ``notebooks/``, with private Jupyter, IPython and fabstir config
dirs. Each front end opens its own copy of the quickstart (so each has its own kernel). The
quickstart's own cells run unchanged; only the hosts are slowed down (8 tokens/s) so the answer can
be watched growing:

* where the SDK reads ``local_host_args`` from its config file, the notebook's local network
  starts two scripted hosts with ``--token-rate 8`` (``FABSTIR_LOCAL_HOSTS=2`` and a
  ``config.json`` in the private config dir): the quickstart runs exactly as a user runs it;
* otherwise two slow scripted ``fabstir-host`` processes started here are given to the kernel
  through ``FABSTIR_HOSTS`` (the quickstart's ``local_backend`` setting then does not matter).

In each front end the test runs the quickstart's setup cells and its first ``%%fabstir`` cell (the
extension started the local network in the background as the setup cell ended, and the cell comes
before that start is over): the live widget first says which step of the network's start it waits on
(screenshot: light in JupyterLab, dark in Notebook 7), then streams; the test reads its text twice
and checks that it grew, checks the final rendering (the scripted text, status ``done``, a status
line with the network's wait, the TTFT, and on the paid local network the job, its estimated cost
and the lock, also while it streams; 🔓 plaintext on static hosts), runs ``%fabstir hosts`` and
checks one dashboard row per host with the Failed and Retried columns (and, paid, the job in its
jobs table), interrupts a long stream and
checks that the cancelled status line keeps the host and the tokens, checks that the chart's tick
and point labels contrast with the background (WCAG 4.5:1) in the light and dark themes, runs a cell
that fails with the cell after it queued (the error shows once: the widget's error state and one
error line; the queued cell never runs), checks that ``%fabstir help`` and a ``--format code``
answer scroll rather than wrap, then saves the notebook, exports it with nbconvert and checks in
Chromium that the exported page shows the answer, the dashboard's rows and the failed cell's error.
Screenshots (light and dark) go to ``$FABSTIR_TEST_ARTIFACTS/browser`` (else the test's tmp dir);
their paths are printed. Never downloads a browser: it skips, saying why, only without
``/usr/bin/chromium``, Playwright, JupyterLab or Notebook 7.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

from fabstir_jupyter.host.scripted import scripted_text
from fabstir_jupyter.local import HostProcess
from fabstir_jupyter.notebook.parsers import parse_cell_options
from fabstir_jupyter.protocol import http_url

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
QUICKSTART = "quickstart.ipynb"
TOKEN_RATE = 8  # tokens per second of the slow scripted hosts: a 40-token answer streams for ~5 s
SLOW_HOST_ARGS = ["--token-rate", str(TOKEN_RATE)]
HOSTS = 2

# Every wait is bounded (seconds).
LAB_START_TIMEOUT = 60.0
KERNEL_READY_TIMEOUT = 60.0
CELL_TIMEOUT = 30.0
FIRST_TEXT_TIMEOUT = 60.0  # the first request starts the local network (chain and hosts)
STREAM_END_TIMEOUT = 30.0
READ_GAP = 0.6  # between the two reads of the live text


def _require_browser_stack():
    """Skip, saying what is missing, unless Chromium, Playwright and JupyterLab are all there."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (never `playwright install`)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install playwright (it ships its driver)")
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        pytest.skip("jupyterlab is not installed: pip install jupyterlab")
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _api(base: str, token: str, path: str, method: str = "GET", timeout: float = 5.0) -> object:
    request = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


FRONT_ENDS = {  # name: the page that opens a notebook
    "jupyterlab": "/lab/tree/{name}",
    "notebook7": "/notebooks/{name}",
}


@pytest.fixture
def artifacts(tmp_path) -> Path:
    """Where screenshots go: ``$FABSTIR_TEST_ARTIFACTS/browser``, else the test's tmp dir."""
    root = os.environ.get("FABSTIR_TEST_ARTIFACTS")
    path = Path(root) / "browser" if root else tmp_path / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser_stack():
    """Playwright's ``sync_playwright``; skips first (before any process starts) if a piece is missing."""
    return _require_browser_stack()


def _sdk_reads_local_host_args(tmp_path: Path) -> bool:
    """Whether the SDK passes ``local_host_args`` from its config file to the local hosts."""
    from fabstir_jupyter.sdk import load_settings

    probe = tmp_path / "probe-config.json"
    probe.write_text(json.dumps({"local_host_args": SLOW_HOST_ARGS}))
    try:
        settings = load_settings(environ={}, config_file=probe)
    except Exception:  # an SDK that rejects the key cannot pass it either
        return False
    return tuple(getattr(settings, "local_host_args", ())) == tuple(SLOW_HOST_ARGS)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """The private home of the Jupyter server and its kernels."""
    return tmp_path_factory.mktemp("browser-home")


@pytest.fixture(scope="module")
def slow_hosts(browser_stack, home):
    """Slow scripted hosts for the kernels: yields ``(env, urls)``.

    ``env`` goes into the server's environment; ``urls`` are the hosts' URLs when this test started
    them (static hosts), or None when each notebook's local network starts them itself.
    """
    config_home = home / "xdg-config"
    if _sdk_reads_local_host_args(home):
        config = config_home / "fabstir-jupyter" / "config.json"
        config.parent.mkdir(parents=True)
        config.write_text(json.dumps({"local_host_args": SLOW_HOST_ARGS}))
        print(f"\nhosts: the notebook's local network, {HOSTS} scripted hosts with {' '.join(SLOW_HOST_ARGS)}")
        yield {"FABSTIR_LOCAL_HOSTS": str(HOSTS), "XDG_CONFIG_HOME": str(config_home)}, None
        return
    hosts = [HostProcess("scripted", SLOW_HOST_ARGS, start_timeout=30.0) for _ in range(HOSTS)]
    try:
        for host in hosts:
            host.start()
        urls = [host.url for host in hosts]
        print(f"\nhosts: {HOSTS} static scripted hosts with {' '.join(SLOW_HOST_ARGS)} (FABSTIR_HOSTS)")
        yield {"FABSTIR_HOSTS": ",".join(urls), "XDG_CONFIG_HOME": str(config_home)}, urls
    finally:
        for host in hosts:
            host.stop()


@pytest.fixture(scope="module")
def server(home, slow_hosts):
    """One Jupyter server on a free port serving a copy of ``notebooks/`` to JupyterLab and
    Notebook 7: yields ``(base_url, token, root)``.

    Its settings, config, runtime and IPython dirs are private to the test, so neither the user's
    Jupyter/IPython set-up nor the fabstir config file leaks in. Stops the kernels and the server.
    """
    root = home / "notebooks"
    shutil.copytree(NOTEBOOKS, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    jupyter_config = home / "jupyter-config"
    settings = jupyter_config / "lab" / "user-settings"  # the default of both front ends
    # All cells stay in the DOM (no virtual scrolling), and no news or update pop-ups.
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    notes = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notes.parent.mkdir(parents=True)
    notes.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    # window.jupyterapp in both front ends (the notebook extension reads the server's config files).
    (jupyter_config / "jupyter_server_config.json").write_text(json.dumps({
        "LabApp": {"expose_app_in_browser": True},
        "JupyterNotebookApp": {"expose_app_in_browser": True},
    }))

    env = {k: v for k, v in os.environ.items() if not k.startswith("FABSTIR_")}
    env.update({
        "FABSTIR_USAGE_DB": ":memory:",
        "XDG_DATA_HOME": str(home / "xdg-data"),
        "JUPYTER_CONFIG_DIR": str(jupyter_config),
        "JUPYTER_RUNTIME_DIR": str(home / "jupyter-runtime"),
        "IPYTHONDIR": str(home / "ipython"),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(slow_hosts[0])
    port = _free_port()
    token = secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    log_path = home / "jupyter-server.log"
    cmd = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--port={port}",
        "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        f"--LabApp.workspaces_dir={home / 'workspaces'}", "--LabApp.news_url=", "--ServerApp.log_level=WARN",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers run as root
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + LAB_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{_tail(log_path)}")
            try:
                _api(base, token, "/api/status", timeout=2.0)
                break
            except (urllib.error.URLError, OSError, ValueError):
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab not ready within {LAB_START_TIMEOUT:g} s:\n{_tail(log_path)}")
                time.sleep(0.2)
        yield base, token, root
    finally:
        try:  # shut the kernels down cleanly first (ipykernel also exits when its parent dies)
            for kernel in _api(base, token, "/api/kernels") or []:  # type: ignore[union-attr]
                _api(base, token, f"/api/kernels/{kernel['id']}", method="DELETE", timeout=10.0)
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this test started (server + kernels)
                proc.wait(5)
        print(f"\njupyter server log: {log_path}")


# JavaScript run in the page (window.jupyterapp exists because of expose_app_in_browser).
PANEL = "window.jupyterapp.shell.currentWidget"
NOTEBOOK_READY = """() => {
    const app = window.jupyterapp;
    const panel = app && app.shell.currentWidget;
    if (!panel || !panel.sessionContext || !panel.context || !panel.context.isReady) return false;
    const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
    return !!kernel && kernel.status === "idle" && panel.content.widgets.length > 0;
}"""
RUN_CELL = f"""async (index) => {{
    const panel = {PANEL};
    panel.content.activeCellIndex = index;
    return await window.jupyterapp.commands.execute("notebook:run-cell");
}}"""
SELECT_CELL = f"""(index) => {{
    const panel = {PANEL};
    panel.content.activeCellIndex = index;
    panel.content.mode = "command";
    panel.content.widgets[index].node.setAttribute("data-fabstir-test", "cell-" + index);
    panel.content.node.focus();
}}"""
STREAM_STATE = f"""(index) => {{
    const cell = {PANEL}.content.widgets[index];
    const root = cell && cell.node.querySelector(".fabstir-stream");
    if (!root) return null;
    const text = (selector) => {{ const node = root.querySelector(selector); return node ? node.textContent : ""; }};
    return {{state: root.dataset.state || "", live: text(".fabstir-live"), body: text(".fabstir-body"),
             status: text(".fabstir-status"), starting: root.dataset.starting === "true",
             badge: text(".fabstir-badge"), problem: text(".fabstir-problem")}};
}}"""
CELL_OUTPUTS = f"""(index) => {{
    const cell = {PANEL}.content.widgets[index];
    const model = cell.model;
    const errors = Array.from(cell.node.querySelectorAll(
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'), (node) => node.textContent.trim());
    return {{count: model.outputs.length, executionCount: model.executionCount, errors,
             types: Array.from({{length: model.outputs.length}}, (_, i) => model.outputs.get(i).type)}};
}}"""
RUN_ALL_BELOW = f"""(index) => {{
    const panel = {PANEL};
    panel.content.activeCellIndex = index;
    void window.jupyterapp.commands.execute("notebook:run-all-below");  // not awaited: it stops at the error
}}"""
KERNEL_IDLE = f"() => {{ const k = {PANEL}.sessionContext.session.kernel; return !!k && k.status === 'idle'; }}"
SCROLLS = f"""([index, selector]) => {{
    const node = {PANEL}.content.widgets[index].node.querySelector(selector);
    if (!node) return null;
    const style = getComputedStyle(node);
    const lineHeight = parseFloat(style.lineHeight) || 1.5 * parseFloat(style.fontSize);
    return {{whiteSpace: style.whiteSpace, wordBreak: style.wordBreak, overflowX: style.overflowX,
             scrollWidth: node.scrollWidth, clientWidth: node.clientWidth, lines: node.textContent.split("\\n").length,
             height: node.clientHeight, lineHeight, text: node.textContent}};
}}"""
DASHBOARD_ROWS = f"""(index) => {{
    const cell = {PANEL}.content.widgets[index];
    const table = cell && cell.node.querySelector(".fabstir-dash .fabstir-dash-content > table.fabstir-table");
    if (!table) return null;
    return Array.from(table.tBodies[0].rows, (row) => Array.from(row.cells, (td) => td.textContent));
}}"""


CHART_COLOURS = f"""(index) => {{
    const cell = {PANEL}.content.widgets[index];
    const chart = cell && cell.node.querySelector(".fabstir-dash .fabstir-chart");
    const tick = chart && chart.querySelector('[aria-label="y-axis tick label"] text');
    const label = chart && chart.querySelector(".fabstir-point-label text");
    if (!tick || !label) return null;
    let node = chart, background = null;
    for (; node && !background; node = node.parentElement) {{
        const colour = getComputedStyle(node).backgroundColor;
        if (colour && colour !== "transparent" && !/rgba\\(.*,\\s*0\\)$/.test(colour)) background = colour;
    }}
    return {{theme: document.body.dataset.jpThemeName || "", tick: getComputedStyle(tick).fill,
             label: getComputedStyle(label).fill, background: background || "rgb(255, 255, 255)"}};
}}"""
CHANGE_THEME = """async (theme) => {
    await window.jupyterapp.commands.execute("apputils:change-theme", {theme});
}"""
THEME_NAME = "() => document.body.dataset.jpThemeName || ''"
APPEND_CELL = f"""(source) => {{
    const panel = {PANEL};
    const count = panel.content.model.sharedModel.cells.length;
    panel.content.model.sharedModel.insertCell(count, {{cell_type: "code", source}});
    return count;
}}"""
START_CELL = f"""(index) => {{
    const panel = {PANEL};
    panel.content.activeCellIndex = index;
    void window.jupyterapp.commands.execute("notebook:run-cell");  // not awaited: it runs on
    return panel.content.widgets[index].model.sharedModel.getSource();
}}"""
KERNEL_ID = f"() => {PANEL}.sessionContext.session.kernel.id"
SAVE = f"""async () => {{
    const panel = {PANEL};
    await panel.context.save();
    return panel.context.path;
}}"""
DASHBOARD_HEADERS = f"""(index) => {{
    const cell = {PANEL}.content.widgets[index];
    const table = cell && cell.node.querySelector(".fabstir-dash .fabstir-dash-content > table.fabstir-table");
    return table ? Array.from(table.tHead.rows[0].cells, (th) => th.textContent.replace(/[▲▼]/g, "").trim()) : null;
}}"""
JOB_ROWS = f"""(index) => {{
    const cell = {PANEL}.content.widgets[index];
    const table = cell && cell.node.querySelector(".fabstir-dash .fabstir-jobs table.fabstir-table");
    return table ? Array.from(table.tBodies[0].rows, (row) => Array.from(row.cells, (td) => td.textContent)) : null;
}}"""
LONG_PROMPT = "%%fabstir --max-tokens 400\nTell me a long story about rivers."
FAILING_PROMPT = "%%fabstir --model no-such-model --max-tokens 4\nWhich model answers?"
BUSY_CELL = "import time; time.sleep(2)"  # holds the kernel while the cells below it queue
AFTER_FAILING = "print('the cell after the failed one', 'ran')"  # its output is not its source
CODE_PROMPT = "%%fabstir --max-tokens 30 --format code\nOne long line of code, please."
FAILED_LINE = "FabstirError [MODEL_NOT_AVAILABLE]: the request failed (the output above says why)"


def _contrast(foreground: str, background: str) -> float:
    """WCAG contrast ratio of two CSS ``rgb()``/``rgba()`` colours (alpha ignored)."""

    def luminance(colour: str) -> float:
        channels = [float(v) / 255 for v in re.findall(r"[\d.]+", colour)[:3]]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    light, dark = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def _cells(path: Path) -> tuple[list[int], int, int, str]:
    """The quickstart's code cells before its first ``%%fabstir`` cell, that cell's index, the
    ``%fabstir hosts`` cell's index, and the text the scripted host answers to that ``%%fabstir`` cell."""
    cells = nbformat.read(path, as_version=4).cells
    stream = next(i for i, c in enumerate(cells) if c.cell_type == "code" and c.source.startswith("%%fabstir"))
    hosts = next(i for i, c in enumerate(cells) if c.cell_type == "code" and c.source.strip() == "%fabstir hosts")
    setup = [i for i, c in enumerate(cells[:stream]) if c.cell_type == "code"]
    line, _, body = cells[stream].source.partition("\n")
    options = parse_cell_options(line.removeprefix("%%fabstir"))
    assert options.max_tokens and "{" not in body, "the test expects a plain prompt with --max-tokens"
    expected = scripted_text(body.strip("\n"), options.max_tokens, seed=options.seed)
    return setup, stream, hosts, expected


def _poll(read, until, timeout: float, step: float = 0.05):
    """Call ``read()`` until ``until(value)`` holds; return the value, or the last one after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    value = read()
    while not until(value) and time.monotonic() < deadline:
        time.sleep(step)
        value = read()
    return value


@pytest.mark.parametrize("front_end", list(FRONT_ENDS))
def test_quickstart_in_the_browser(front_end, browser_stack, server, slow_hosts, artifacts):
    """Live streaming, the dashboard, a cancelled stream, both themes and the HTML export, in
    JupyterLab and in Notebook 7."""
    if front_end == "notebook7":
        try:
            version = importlib.metadata.version("notebook")
        except importlib.metadata.PackageNotFoundError:
            pytest.skip("Notebook 7 is not installed: pip install 'notebook>=7'")
        if int(version.split(".")[0]) < 7:
            pytest.skip(f"notebook {version} is not Notebook 7: pip install 'notebook>=7'")
    sync_playwright = browser_stack
    base, token, root = server
    name = f"quickstart-{front_end}.ipynb"  # a copy per front end: its own session and kernel
    shutil.copy(root / QUICKSTART, root / name)
    setup, stream_cell, hosts_cell, expected = _cells(NOTEBOOKS / QUICKSTART)
    shots: list[Path] = []

    def shot(page, label: str, selector: str | None = None) -> None:
        path = artifacts / f"{front_end}-{label}.png"
        (page.locator(selector) if selector else page).screenshot(path=str(path))
        shots.append(path)
        print(f"screenshot: {path}")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
                                             timeout=30_000)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            try:
                url = FRONT_ENDS[front_end].format(name=name)
                page.goto(f"{base}{url}?token={token}", wait_until="domcontentloaded")
                page.wait_for_function(NOTEBOOK_READY, timeout=KERNEL_READY_TIMEOUT * 1000, polling=200)
                page.evaluate("() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
                start_mode = "dark" if front_end == "notebook7" else "light"  # each front end one theme
                if start_mode == "dark":
                    page.evaluate(CHANGE_THEME, "JupyterLab Dark")
                    _poll(lambda: page.evaluate(THEME_NAME), lambda n: n == "JupyterLab Dark", CELL_TIMEOUT)

                # The setup cells: load the extension and choose the backend (the network starts in
                # the background as that cell ends), show the settings.
                for index in setup:
                    assert page.evaluate(RUN_CELL, index) is not False, f"cell {index} failed"

                # The %%fabstir cell, started from the keyboard like a user would, while the network
                # still starts: the widget names the step it waits on, then streams.
                page.evaluate(SELECT_CELL, stream_cell)
                page.keyboard.press("Shift+Enter")
                read = lambda: page.evaluate(STREAM_STATE, stream_cell)  # noqa: E731
                waiting = _poll(read, lambda s: bool(s and (s["starting"] or s["live"].strip())), FIRST_TEXT_TIMEOUT)
                assert waiting and waiting["starting"], \
                    f"the cell did not show the network's start (was it over before the cell ran?): {waiting!r}"
                assert waiting["badge"] == "starting" and "…" in waiting["status"], waiting
                shot(page, f"starting-{start_mode}", f'[data-fabstir-test="cell-{stream_cell}"]')
                first = _poll(read, lambda s: bool(s and s["state"] == "running" and s["live"].strip()),
                              FIRST_TEXT_TIMEOUT)
                assert first and first["state"] == "running" and first["live"].strip(), \
                    f"no streamed text within {FIRST_TEXT_TIMEOUT:g} s: {first!r}"
                time.sleep(READ_GAP)
                second = read()
                assert second["state"] == "running", f"the stream ended too soon to be seen growing: {second!r}"
                assert len(second["live"]) > len(first["live"]), (first, second)
                assert second["live"].startswith(first["live"])
                assert expected.startswith(second["live"]), "the live text is not a prefix of the answer"
                # The local network's hosts are paid and publish keys: while the answer streams, its
                # status line names its job and its cost so far (an estimate) and shows the lock.
                paid = slow_hosts[1] is None
                if paid:
                    assert re.search(r"USDC est\. · job \d+ · 🔒", second["status"]), second["status"]
                shot(page, "streaming", f'[data-fabstir-test="cell-{stream_cell}"]')

                final = _poll(read, lambda s: bool(s and s["state"] != "running"), STREAM_END_TIMEOUT)
                assert final["state"] == "done", final
                assert " ".join(final["body"].split()) == " ".join(expected.split())
                assert f"{len(expected.split())} tokens" in final["status"], final["status"]
                # The wait for the network apart; the TTFT counts from the cell's start, so it is longer.
                waited = re.search(r"network ready in (\d+\.\d) s", final["status"])
                ttft = re.search(r"TTFT (\d+) ms|TTFT (\d+\.\d) s", final["status"])
                assert waited and ttft, final["status"]
                ttft_s = int(ttft.group(1)) / 1000 if ttft.group(1) else float(ttft.group(2))
                assert ttft_s >= float(waited.group(1)) - 0.05, final["status"]
                if paid:  # static scripted hosts: unpaid, and in clear (they publish no key)
                    assert re.search(r"USDC est\. · job \d+ · 🔒 · ", final["status"]), final["status"]
                else:
                    assert " · 🔓 plaintext" in final["status"] and "job" not in final["status"], final["status"]
                shot(page, "stream", f'[data-fabstir-test="cell-{stream_cell}"]')

                # The host dashboard: one row per host, each host's URL in its row; failed requests
                # and retried attempts in columns of their own.
                page.evaluate(SELECT_CELL, hosts_cell)
                assert page.evaluate(RUN_CELL, hosts_cell) is not False, "the %fabstir hosts cell failed"
                rows = _poll(lambda: page.evaluate(DASHBOARD_ROWS, hosts_cell),
                             lambda r: r is not None and len(r) >= HOSTS, CELL_TIMEOUT)
                assert rows is not None and len(rows) == HOSTS, rows
                shown = {cell for row in rows for cell in row if cell.startswith("http://127.0.0.1:")}
                started = slow_hosts[1]
                if started is not None:  # static hosts: exactly the ones started here
                    assert shown == {http_url(u) for u in started}, rows
                else:  # the local network's hosts: one distinct URL per row
                    assert len(shown) == HOSTS, rows
                headers = page.evaluate(DASHBOARD_HEADERS, hosts_cell)
                assert headers[-4:] == ["Requests", "Tokens", "Failed", "Retried"], headers
                assert "Errors" not in headers
                # On the paid local network the dashboard lists the job the answer was billed to: open,
                # its bill so far an estimate (≈); static hosts are unpaid and have no jobs table.
                jobs = page.evaluate(JOB_ROWS, hosts_cell)
                if paid:
                    job_id = re.search(r"job (\d+)", final["status"]).group(1)
                    assert jobs and [row for row in jobs if row[0] == job_id and row[-1] == "open"
                                     and row[5].startswith("≈")], jobs
                else:
                    assert jobs is None, jobs

                # The chart's labels read in the light theme and in the dark one; both screenshotted.
                for theme in ("JupyterLab Light", "JupyterLab Dark"):
                    if page.evaluate(THEME_NAME) != theme:
                        page.evaluate(CHANGE_THEME, theme)
                        _poll(lambda: page.evaluate(THEME_NAME), lambda n, t=theme: n == t, CELL_TIMEOUT)
                    colours = _poll(lambda: page.evaluate(CHART_COLOURS, hosts_cell),
                                    lambda c, t=theme: bool(c) and c["theme"] == t, CELL_TIMEOUT)
                    assert colours and colours["theme"] == theme, colours
                    for part in ("tick", "label"):
                        assert _contrast(colours[part], colours["background"]) >= 4.5, (theme, part, colours)
                    mode = "dark" if theme.endswith("Dark") else "light"
                    shot(page, f"dashboard-{mode}", f'[data-fabstir-test="cell-{hosts_cell}"]')
                    page.locator(f'[data-fabstir-test="cell-{stream_cell}"]').scroll_into_view_if_needed()
                    shot(page, f"stream-{mode}", f'[data-fabstir-test="cell-{stream_cell}"]')
                page.evaluate(CHANGE_THEME, "JupyterLab Light")

                # A long stream interrupted (the kernel's Interrupt): the status line keeps its host,
                # tokens and cost, and the cell ends with one KeyboardInterrupt.
                long_cell = page.evaluate(APPEND_CELL, LONG_PROMPT)
                page.evaluate(SELECT_CELL, long_cell)
                assert page.evaluate(START_CELL, long_cell) == LONG_PROMPT
                read_long = lambda: page.evaluate(STREAM_STATE, long_cell)  # noqa: E731
                running = _poll(read_long, lambda s: bool(s and s["state"] == "running" and s["live"].strip()),
                                CELL_TIMEOUT)
                assert running and running["live"].strip(), running
                _api(base, token, f"/api/kernels/{page.evaluate(KERNEL_ID)}/interrupt", method="POST")
                stopped = _poll(read_long, lambda s: bool(s and s["state"] != "running"), CELL_TIMEOUT)
                assert stopped["state"] == "cancelled", stopped
                assert re.search(r"http://127\.0\.0\.1:\d+", stopped["status"]), stopped["status"]
                assert re.search(r"\b\d+ tokens?\b", stopped["status"]), stopped["status"]
                assert stopped["body"].strip() and expected_prefix_ok(stopped["body"])
                shot(page, "cancelled", f'[data-fabstir-test="cell-{long_cell}"]')

                # A cell that fails, with the cell after it queued (Run All Below): the error shows
                # once (the widget's error state, one error line naming its code, nothing on stderr
                # besides), and the queued cell never runs. The kernel aborts only requests that
                # reached it before the error, and the failure takes milliseconds, so a busy cell
                # first holds the kernel until the browser has sent the two below it.
                _poll(lambda: page.evaluate(KERNEL_IDLE), bool, CELL_TIMEOUT)
                busy_cell = page.evaluate(APPEND_CELL, BUSY_CELL)
                failing_cell = page.evaluate(APPEND_CELL, FAILING_PROMPT)
                after_cell = page.evaluate(APPEND_CELL, AFTER_FAILING)
                page.evaluate(SELECT_CELL, failing_cell)  # tags it for its screenshots
                page.evaluate(SELECT_CELL, busy_cell)
                page.evaluate(RUN_ALL_BELOW, busy_cell)
                failed = _poll(lambda: page.evaluate(CELL_OUTPUTS, failing_cell), lambda o: bool(o["errors"]),
                               CELL_TIMEOUT)
                _poll(lambda: page.evaluate(KERNEL_IDLE), bool, CELL_TIMEOUT)
                failed = page.evaluate(CELL_OUTPUTS, failing_cell)
                assert failed["errors"] == [FAILED_LINE], failed
                assert failed["types"].count("error") == 1 and "stream" not in failed["types"], failed
                widget = page.evaluate(STREAM_STATE, failing_cell)
                assert widget["state"] == "error" and "[MODEL_NOT_AVAILABLE]" in widget["problem"], widget
                busy = page.evaluate(CELL_OUTPUTS, busy_cell)
                assert busy["count"] == 0 and busy["executionCount"] is not None, busy
                after = page.evaluate(CELL_OUTPUTS, after_cell)
                assert after["count"] == 0 and after["executionCount"] is None, after
                for theme in ("JupyterLab Light", "JupyterLab Dark"):
                    page.evaluate(CHANGE_THEME, theme)
                    _poll(lambda: page.evaluate(THEME_NAME), lambda n, t=theme: n == t, CELL_TIMEOUT)
                    page.locator(f'[data-fabstir-test="cell-{failing_cell}"]').scroll_into_view_if_needed()
                    shot(page, f"failed-{'dark' if theme.endswith('Dark') else 'light'}",
                         f'[data-fabstir-test="cell-{failing_cell}"]')
                page.evaluate(CHANGE_THEME, "JupyterLab Light")

                # Help and code answers scroll sideways: no line is broken, mid-word or at all.
                help_cell = page.evaluate(APPEND_CELL, "%fabstir help")
                page.evaluate(SELECT_CELL, help_cell)
                assert page.evaluate(RUN_CELL, help_cell) is not False
                help_text = _poll(lambda: page.evaluate(SCROLLS, [help_cell, "pre.fabstir-help"]), bool, CELL_TIMEOUT)
                assert help_text["whiteSpace"] == "pre" and help_text["overflowX"] == "auto", help_text
                assert help_text["text"].startswith("%%fabstir [OPTIONS]")
                assert "%fabstir help OPTION" in help_text["text"]
                one_row_per_line = (help_text["lines"] + 1) * help_text["lineHeight"] + 40
                assert help_text["height"] <= one_row_per_line, help_text
                shot(page, "help", f'[data-fabstir-test="cell-{help_cell}"]')
                code_cell = page.evaluate(APPEND_CELL, CODE_PROMPT)
                page.evaluate(SELECT_CELL, code_cell)
                assert page.evaluate(RUN_CELL, code_cell) is not False
                code = _poll(lambda: page.evaluate(SCROLLS, [code_cell, "pre.fabstir-code"]), bool, STREAM_END_TIMEOUT)
                assert code["whiteSpace"] == "pre" and code["wordBreak"] == "normal", code
                assert code["lines"] == 1 and code["scrollWidth"] > code["clientWidth"], code  # it scrolls
                assert code["height"] < 3 * code["lineHeight"] + 40, code  # one row, not wrapped
                shot(page, "code", f'[data-fabstir-test="cell-{code_cell}"]')

                # Saved as the front end saves it (no widget state), then exported with nbconvert: the
                # page a browser shows has the answer, the dashboard's rows and the cancelled status.
                saved = page.evaluate(SAVE)
                page_path = _export_html(root / saved, artifacts / f"{front_end}-export.html")
                export = browser.new_page(viewport={"width": 1200, "height": 1000})
                try:
                    export.goto(page_path.as_uri(), wait_until="domcontentloaded")
                    visible = " ".join(export.inner_text("body").split())
                    assert " ".join(expected.split()) in visible
                    assert f"{len(expected.split())} tokens" in visible
                    assert ("🔒" if paid else "🔓 plaintext") in visible  # the static fallback's status line
                    for cell in shown:
                        assert cell in visible
                    assert "Cancelled: the text above is what arrived before the stop." in visible
                    assert FAILED_LINE in visible and "[MODEL_NOT_AVAILABLE]" in visible
                    assert "the cell after the failed one ran" not in visible
                    export.get_by_text(expected.split()[0], exact=False).first.scroll_into_view_if_needed()
                    shot(export, "export")
                finally:
                    export.close()
            except BaseException:
                try:
                    shot(page, "failure")
                except Exception:  # the page may be gone; the original error matters
                    pass
                raise
        finally:
            browser.close()
    assert all(path.stat().st_size > 0 for path in shots)


def expected_prefix_ok(text: str) -> bool:
    """Whether ``text`` is words of the scripted vocabulary (an interrupted scripted answer)."""
    from fabstir_jupyter.host.scripted import VOCABULARY

    words = text.split()
    return bool(words) and all(word in VOCABULARY for word in words)


def _export_html(notebook: Path, target: Path) -> Path:
    """Export ``notebook`` to HTML with nbconvert, as ``jupyter nbconvert --to html`` does."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    target.write_text(body, encoding="utf-8")
    print(f"exported: {target}")
    return target
