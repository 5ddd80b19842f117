"""A notebook that pays for its answers, run in a real kernel (nbclient) on the embedded local network:
the cells stream answers paid from the network's funded test account into the live widget, ``%fabstir
end`` settles the job, and this test reads the result from the chain itself (the kernel's local chain
over its JSON-RPC endpoint), not from the notebook's own records. The account's key appears nowhere:
not in the saved notebook, not in the kernel's DEBUG log."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

pytest.importorskip("nbclient")
pytest.importorskip("eth_tester", reason="the local network needs eth-tester and py-evm (the 'chain' extra)")

from fabstir_jupyter.billing import cadence_of
from fabstir_jupyter.marketplace import JobStatus, MarketplaceClient

pytestmark = pytest.mark.timeout(300)

INFO = "__fabstir_test__ "  # the line a cell prints for the test to read


def code(source: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(source)


def printed(cell: nbformat.NotebookNode) -> dict:
    """The JSON a cell printed after INFO."""
    text = "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")
    line, = [line for line in text.splitlines() if line.startswith(INFO)]
    return json.loads(line[len(INFO):])


def test_a_notebook_cell_is_paid_from_the_test_account_and_the_chain_agrees(isolated_env, monkeypatch, tmp_path):
    """Two turns of a paid session stream into the widget (its status shows the job, the estimate and
    🔒); after %fabstir end the chain shows the job Completed, tokensUsed as the production cadence
    implies for the answers, host earnings + treasury fee + refund == deposit, the test account's USDC
    fell by exactly the cost, and the receipt says the usage ledger agrees."""
    from nbclient import NotebookClient

    monkeypatch.delenv("FABSTIR_NO_WIDGETS")  # the live widget, as in JupyterLab
    log = tmp_path / "kernel-debug.log"
    nb = nbformat.v4.new_notebook(cells=[
        code(f"import json, logging\nlogging.basicConfig(filename={str(log)!r}, level=logging.DEBUG, force=True)\n"
             "%load_ext fabstir_jupyter\n%config FabstirMagics.local_backend = 'scripted'\n"
             "%config FabstirMagics.usage_db = ':memory:'"),
        code("from fabstir_jupyter.notebook.bridge import get_bridge\nmanager = %fabstir manager\n"
             "net = get_bridge().sdk().local_network\n"
             f"print({INFO!r} + json.dumps({{'rpc_url': net.rpc_url, 'marketplace': net.addresses['JobMarketplace'], "
             "'usdc': net.addresses['stable_token'], 'user': net.user_address, 'key_file': net.user_key_file}))"),
        code("%%fabstir --session paid --deposit 1 --max-tokens 150 --out one\nTell me about rivers"),
        code("%%fabstir --session paid --max-tokens 120 --out two\nAnd about the sea"),
        code("%fabstir wallet"),
        code("receipt = %fabstir end paid\nreceipt"),
        code(f"print({INFO!r} + json.dumps({{'job_ids': list(one.job_ids) + list(two.job_ids), "
             "'answers': [one.usage.completion_tokens, two.usage.completion_tokens], 'agrees': receipt.agrees, "
             "'billed': receipt.settlement.tokens_billed, 'settle_tx': receipt.settlement.settle_tx}))"),
    ])
    client = NotebookClient(nb, timeout=120, kernel_name="python3", store_widget_state=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        for index in range(2):
            client.execute_cell(nb.cells[index], index)
        network = printed(nb.cells[1])
        chain = MarketplaceClient(network["rpc_url"], network["marketplace"])
        balance_before = chain.balance(network["usdc"], network["user"])
        for index in range(2, len(nb.cells)):
            client.execute_cell(nb.cells[index], index)
        outcome = printed(nb.cells[-1])
        job_id = outcome["job_ids"][0]
        assert outcome["job_ids"] == [job_id, job_id]
        job = chain.get_job(job_id)
        secret = Path(network["key_file"]).read_text().strip().lower().removeprefix("0x")
        earned = chain.earnings(job.host, network["usdc"])
        fee_basis_points = chain.fee_basis_points()
        balance_after = chain.balance(network["usdc"], network["user"])

    assert job.depositor == network["user"] and job.deposit == 10**6  # --deposit 1: one USDC, from the test account
    assert job.status is JobStatus.COMPLETED
    assert outcome["answers"] == [150, 120]
    assert job.tokens_used == cadence_of(outcome["answers"], job.proof_interval).settled() == outcome["billed"]
    payment = job.tokens_used * job.price_per_token // 1000
    fee = payment * fee_basis_points // 10_000
    assert earned == payment - fee  # this host's only earnings: this job
    assert earned + fee + job.refunded_to_user == job.deposit
    assert balance_before - balance_after == payment
    assert outcome["agrees"] is True

    # what the notebook shows: the live widget's fallbacks, the wallet, the receipt
    stream_html = "".join(out.get("data", {}).get("text/html", "") for out in nb.cells[2].outputs)
    assert "application/vnd.jupyter.widget-view+json" in json.dumps(nb.cells[2].outputs)
    assert f"job {job_id} · 🔒" in stream_html and "USDC est." in stream_html
    wallet = "".join(out.get("data", {}).get("text/plain", "") for out in nb.cells[4].outputs)
    assert f"wallet {network['user']}" in wallet and f"job {job_id}" in wallet
    receipt = "".join(out.get("data", {}).get("text/plain", "") for out in nb.cells[5].outputs)
    assert f"job {job_id} completed" in receipt and "agrees with the chain" in receipt
    assert outcome["settle_tx"][:6] in receipt and outcome["settle_tx"] not in receipt

    saved = tmp_path / "paid.ipynb"
    nbformat.write(nb, saved)
    assert len(secret) == 64
    for text in (saved.read_text(), log.read_text()):
        assert secret not in text.lower()
    assert "fabstir_jupyter" in log.read_text()  # the log really holds the package's DEBUG lines
