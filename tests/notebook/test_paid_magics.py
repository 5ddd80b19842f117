"""Paying from a notebook: %%fabstir --deposit/--budget, %fabstir wallet, %fabstir end's receipt, the
dashboard's jobs and the live status line, in a real IPython shell on the embedded local network (paid
scripted hosts, the local chain over JSON-RPC). Every check of money reads the chain itself."""

from __future__ import annotations

import logging
import os
import re

import pytest

pytest.importorskip("eth_tester", reason="the local network needs eth-tester and py-evm (the 'chain' extra)")

from fabstir_jupyter.billing import cadence_of
from fabstir_jupyter.host.scripted import scripted_text
from fabstir_jupyter.marketplace import JobStatus, MarketplaceClient
from fabstir_jupyter.notebook import magics as magics_module
from fabstir_jupyter.notebook.bridge import close_bridge, get_bridge
from fabstir_jupyter.notebook.paying import SettlementReceipt, WalletSummary, short_hash
from fabstir_jupyter.notebook.tables import JOB_COLUMNS

from .test_magics import cell, failing_cell, one_line_error

PROMPT = "Tell me about rivers"
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    """One IPython shell for the module, on the paid local network (scripted hosts, started here),
    text output, the usage ledger in memory, no FABSTIR_* settings from outside."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    home = tmp_path_factory.mktemp("paid-notebook")
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("FABSTIR_"):
                patch.delenv(name)
        patch.setenv("XDG_CONFIG_HOME", str(home / "config"))
        patch.setenv("XDG_DATA_HOME", str(home / "data"))
        patch.setenv("FABSTIR_NO_WIDGETS", "1")
        InteractiveShell.clear_instance()
        config = Config()
        config.HistoryManager.hist_file = ":memory:"
        config.FabstirMagics.usage_db = ":memory:"
        config.FabstirMagics.start_network_on_load = False
        ip = InteractiveShell.instance(config=config)
        ip.run_line_magic("load_ext", "fabstir_jupyter")
        ip.run_line_magic("config", "FabstirMagics.local_backend = 'scripted'")
        ip.run_line_magic("fabstir", "manager")  # the network starts now, not in a test's first cell
        try:
            yield ip
        finally:
            ip.run_line_magic("unload_ext", "fabstir_jupyter")
            close_bridge()
            InteractiveShell.clear_instance()


@pytest.fixture(scope="module")
def network(shell):
    """The local network the shell's cells run on."""
    local = get_bridge().sdk().local_network
    assert local is not None and local.paid
    return local


@pytest.fixture(scope="module")
def chain(network) -> MarketplaceClient:
    """A reader of the local chain's marketplace, over its JSON-RPC endpoint (as any client would)."""
    return MarketplaceClient(network.rpc_url, network.addresses["JobMarketplace"])


def payments():
    return get_bridge().sdk().payments


def next_job_id(chain: MarketplaceClient) -> int:
    return chain._marketplace.functions.nextJobId().call()


def usdc(network) -> str:
    return network.addresses["stable_token"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("line, code, field", [
    ("--session bad --deposit 0", "INVALID_OPTIONS", "deposit"),
    ("--session bad --deposit -1", "INVALID_OPTIONS", "deposit"),
    ("--session bad --deposit=-0.5", "INVALID_OPTIONS", "deposit"),
    ("--session bad --deposit lots", "INVALID_OPTIONS", "deposit"),
    ("--session bad --budget 0", "INVALID_OPTIONS", "budget"),
    ("--session bad --budget nan", "INVALID_OPTIONS", "budget"),
    ("--session bad --deposit 0.0000001", "INVALID_OPTIONS", "deposit"),  # finer than USDC's 6 decimals
    ("--session bad --deposit 0.1", "INVALID_OPTIONS", "deposit"),  # below the marketplace's 0.5 USDC
    ("--session bad --deposit 5000", "BUDGET_EXCEEDED", None),  # the local network's process budget: 1000 USDC
    ("--session bad --deposit 2 --budget 1", "BUDGET_EXCEEDED", None),
    ("--deposit 1", "INVALID_OPTIONS", "deposit"),  # a session's term without a session
    ("--budget 3 --max-tokens 4", "INVALID_OPTIONS", "budget"),
])
def test_bad_session_terms_are_one_coded_line_and_open_nothing(shell, chain, capsys, line, code, field):
    """Zero, negative, non-numeric, too fine, too small, over-budget deposits and budgets, and terms
    without --session, fail the cell with the Python API's coded error, shown once; no session is made
    and no job is opened on chain."""
    before = next_job_id(chain)
    open_before = [job.job_id for job in payments().open_jobs]
    capsys.readouterr()
    error = failing_cell(shell, line)
    shown = one_line_error(capsys)
    assert shown.startswith(f"FabstirError [{code}]: ") and getattr(error, "code", None) == code
    if field is not None:
        assert error.field == field, shown
    assert "bad" not in get_bridge().sessions
    assert next_job_id(chain) == before and [job.job_id for job in payments().open_jobs] == open_before


def test_a_sessions_terms_are_set_once(shell, chain, capsys):
    """A later cell of a session may repeat its --deposit (also written otherwise: 1 and 1.0) but not
    change it: INVALID_OPTIONS, nothing sent, the session goes on."""
    cell(shell, "--session terms --deposit 1 --max-tokens 4 --out first")
    job_id, = shell.user_ns["first"].job_ids
    cell(shell, "--session terms --deposit 1.0 --max-tokens 4 --out second")
    assert shell.user_ns["second"].job_ids == (job_id,)
    capsys.readouterr()
    failing_cell(shell, "--session terms --deposit 2 --max-tokens 4")
    shown = one_line_error(capsys)
    assert shown.startswith("FabstirError [INVALID_OPTIONS]: session 'terms' exists with deposit 1")
    assert "%fabstir end terms" in shown
    failing_cell(shell, "--session terms --budget 5 --max-tokens 4")
    assert one_line_error(capsys).startswith("FabstirError [INVALID_OPTIONS]: session 'terms' exists with budget none")
    assert chain.get_job(job_id).deposit == 10**6 and chain.get_job(job_id).status is JobStatus.ACTIVE
    shell.run_line_magic("fabstir", "end terms")


# --------------------------------------------------------------------------- the paid session, end to end


def test_a_paid_session_streams_from_the_test_account_and_its_receipt_agrees_with_the_chain(shell, network, chain,
                                                                                          capsys):
    """--session --deposit 1 --budget 3: the answer streams on a job of exactly 1 USDC opened by the test
    account; %fabstir wallet lists it; %fabstir end returns the receipt, and the chain agrees with it:
    the job Completed, tokensUsed as the proof cadence implies for what the host streamed, host
    earnings + treasury fee + refund == deposit, and the account's USDC fell by the cost."""
    user = network.user_address
    balance_before = chain.balance(usdc(network), user)
    cell(shell, "--session paid --deposit 1 --budget 3 --max-tokens 150 --out one")
    cell(shell, "--session paid --max-tokens 120 --out two")
    one, two = shell.user_ns["one"], shell.user_ns["two"]
    assert one.text == scripted_text(PROMPT, 150) and len(two.text.split()) == 120
    job_id, = one.job_ids
    assert two.job_ids == (job_id,) and one.cost_unit == "USDC"
    job = chain.get_job(job_id)
    assert job.status is JobStatus.ACTIVE and job.depositor == user and job.deposit == 10**6
    assert job.payment_token.lower() == usdc(network).lower()
    line = capsys.readouterr().out.splitlines()
    status = [text for text in line if text.startswith("[fabstir] host")][-1]
    assert f"| job {job_id} | 🔒 |" in status and " USDC est. |" in status

    wallet = shell.run_line_magic("fabstir", "wallet")
    assert isinstance(wallet, WalletSummary) and wallet.paid and wallet.address == user
    assert wallet.source == "the local network's test account" and wallet.unit == "USDC"
    assert set(wallet.balances) == {"USDC", "ETH"} and wallet.balances["USDC"] == pytest.approx(
        chain.balance(usdc(network), user) / 10**6)
    row, = [row for row in wallet.jobs if row["job_id"] == job_id]
    assert row["deposit"] == 1.0 and row["status"] == "open" and row["tokens"] == 270
    assert row["billed"] == pytest.approx(270 * job.price_per_token / 1000 / 10**6)
    assert wallet.budget == 1000 and wallet.remaining == pytest.approx(1000 - wallet.held - wallet.settled)
    text = repr(wallet)
    assert f"wallet {user}" in text and f"job {job_id}" in text and "budget" in text and "left" in text
    assert list(wallet.jobs_frame.columns) == list(JOB_COLUMNS)

    host = chain.get_job(job_id).host
    earned_before = chain.earnings(host, usdc(network))
    receipt = shell.run_line_magic("fabstir", "end paid")
    assert capsys.readouterr().out.startswith("[fabstir] ended session 'paid' after 2 turns")
    assert isinstance(receipt, SettlementReceipt)
    settled = receipt.settlement
    job = chain.get_job(job_id)
    expected = cadence_of([150, 120], job.proof_interval).settled()
    assert job.status is JobStatus.COMPLETED and expected == 270
    assert job.tokens_used == settled.tokens_billed == expected
    payment = job.tokens_used * job.price_per_token // 1000
    fee = payment * chain.fee_basis_points() // 10_000
    host_earned = chain.earnings(host, usdc(network)) - earned_before
    assert host_earned == payment - fee == settled.host_earnings and settled.treasury_fee == fee
    assert host_earned + fee + job.refunded_to_user == job.deposit == settled.deposit
    assert settled.refund == job.refunded_to_user and settled.cost == payment
    assert balance_before - chain.balance(usdc(network), user) == payment
    found = chain.find_settlement(job_id)
    assert found is not None and found.tx_hash == settled.settle_tx
    check = receipt.check(settled)
    assert receipt.agrees and check.source == "usage ledger"
    assert (check.ledger_tokens, check.expected_tokens, check.billed_tokens) == (270, 270, 270)
    text = repr(receipt)
    assert re.search(r"\n  tokens billed +270\n", text), text
    for words in (f"job {job_id} completed", "host earnings", "treasury fee", "refund",
                  short_hash(settled.open_tx), short_hash(settled.settle_tx), "agrees with the chain"):
        assert words in text, words
    assert settled.settle_tx not in text  # hashes in their short form
    assert "&lt;" not in receipt._repr_html_() and short_hash(settled.settle_tx) in receipt._repr_html_()
    after = shell.run_line_magic("fabstir", "wallet")
    assert job_id not in [row["job_id"] for row in after.jobs]
    assert after.settled == pytest.approx(wallet.settled + payment / 10**6)


def test_an_unpaid_sessions_end_returns_nothing_and_ending_twice_is_one_line(shell, capsys):
    """Ending an unknown (or already ended) session is SESSION_NOT_FOUND, one line, nothing settled."""
    capsys.readouterr()
    result = shell.run_cell("%fabstir end paid")
    error = result.error_in_exec
    assert error is not None and error.code == "SESSION_NOT_FOUND"
    assert one_line_error(capsys).startswith("FabstirError [SESSION_NOT_FOUND]: no session named 'paid'")


# --------------------------------------------------------------------------- stateless cells, dashboard, widget


def test_stateless_cells_show_their_tab_job_live_and_the_dashboard_lists_every_job(shell, chain, monkeypatch):
    """A paid cell without --session streams into the widget, whose status carries its job, its cost at
    the job's price (an estimate) and the lock; the dashboard's jobs table lists that open job beside
    a settled session job, with the chain's deposit; %fabstir jobs is the same table."""
    pytest.importorskip("anywidget")
    from fabstir_jupyter.notebook import output
    from fabstir_jupyter.notebook.widgets import HostDashboard, StreamOutput

    cell(shell, "--session ended --max-tokens 5")  # a settled job of this test's own, whatever ran before
    shell.run_line_magic("fabstir", "end ended")
    made = []
    monkeypatch.setattr(output, "widgets_available", lambda: True)
    monkeypatch.setattr(magics_module, "widgets_available", lambda: True)
    original = magics_module.make_output
    monkeypatch.setattr(magics_module, "make_output",
                        lambda format, background, **kw: made.append(original(format, background, **kw)) or made[-1])
    cell(shell, "--max-tokens 60 --out free")
    widget, = made
    result = shell.user_ns["free"]
    job_id, = result.job_ids
    assert isinstance(widget, StreamOutput) and widget.state == "done"
    price = chain.get_job(job_id).price_per_token
    status = widget.status
    assert status["job_ids"] == [job_id] and status["cost_estimate"] is True and status["encrypted"] is True
    assert status["cost"] == pytest.approx(60 * price / 1000 / 10**6) and status["tokens"] == 60
    page = widget._repr_mimebundle_()[0]["text/html"]
    assert f"job {job_id} · 🔒" in page and "USDC est." in page

    dashboard = shell.run_line_magic("fabstir", "hosts")
    assert isinstance(dashboard, HostDashboard) and dashboard.paid
    jobs = dashboard.jobs_frame.set_index("job_id")
    assert list(dashboard.jobs_frame.columns) == list(JOB_COLUMNS)
    tab = jobs.loc[job_id]
    assert tab["status"] == "open" and tab["kind"] == "tab" and pd_isna(tab["refund"])
    assert tab["deposit"] == chain.get_job(job_id).deposit / 10**6 and tab["tokens"] == 100  # the first proof's 100
    assert tab["billed"] == pytest.approx(100 * price / 1000 / 10**6)
    settled = jobs[jobs["status"] == "completed"]
    assert len(settled) >= 1  # the session ended above (and those of earlier tests in this kernel)
    for settled_id, row in settled.iterrows():
        onchain = chain.get_job(int(settled_id))
        assert onchain.status is JobStatus.COMPLETED and row["tokens"] == onchain.tokens_used
        assert row["refund"] == pytest.approx(onchain.refunded_to_user / 10**6)
    assert "Paid jobs" in dashboard.static_html()
    frame = shell.run_line_magic("fabstir", "jobs")  # the same table without a widget front end
    assert list(frame.columns) == list(JOB_COLUMNS)
    assert sorted(frame["job_id"]) == sorted(dashboard.jobs_frame["job_id"])
    assert set(frame["status"]) >= {"open", "completed"}  # settled jobs too, which the wallet does not list


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


# --------------------------------------------------------------------------- the key never shows


def test_the_wallets_key_shows_nowhere(shell, network, capsys, caplog):
    """With every logger at DEBUG, a paid session, %fabstir wallet, its HTML and %fabstir end's receipt
    never hold the account's key (in any case, with or without 0x); only its address."""
    caplog.set_level(logging.DEBUG)
    secret = network.user_key._secret().hex()
    capsys.readouterr()
    cell(shell, "--session secret --deposit 0.5 --max-tokens 8")
    wallet = shell.run_line_magic("fabstir", "wallet")
    receipt = shell.run_line_magic("fabstir", "end secret")
    shown = capsys.readouterr()
    texts = [shown.out, shown.err, caplog.text, repr(wallet), wallet._repr_html_(), repr(receipt),
             receipt._repr_html_(), repr(get_bridge().sdk()), repr(payments())]
    assert network.user_address in repr(wallet)
    for text in texts:
        lowered = text.lower()
        assert secret not in lowered and re.sub(r"^0x", "", secret) not in lowered
    assert any(record.levelno == logging.DEBUG for record in caplog.records)  # DEBUG really was on
