"""LocalRpcServer: the local chain over HTTP JSON-RPC on loopback, as web3's HTTPProvider sees a node."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from eth_abi import decode as abi_decode
from eth_account import Account
from web3 import Web3
from web3.exceptions import ContractLogicError

from fabstir_jupyter.errors import InvalidOptions
from fabstir_jupyter.local.rpc import MAX_BODY, LocalRpcServer


@pytest.fixture
def served(chain):
    """The fresh chain served on a free loopback port."""
    with LocalRpcServer(chain.provider) as server:
        yield chain, server


def _post(url: str, payload) -> httpx.Response:
    return httpx.post(url, content=json.dumps(payload), headers={"Content-Type": "application/json"}, timeout=10)


def test_web3_http_provider_sends_a_signed_transaction_and_reads_it_back(served):
    """A real web3 HTTPProvider: chain id, nonce, gas estimate and fees, a raw signed transaction, its
    receipt and decoded event, logs, blocks, calls and balances all come back as a node sends them."""
    chain, server = served
    sender = chain.create_account(native=10**18, usdc=10**7)
    w3 = Web3(Web3.HTTPProvider(server.url))
    assert w3.is_connected() and w3.eth.chain_id == chain.chain_id
    assert w3.eth.get_balance(sender.address) == 10**18
    usdc = w3.eth.contract(address=chain.usdc.address, abi=chain.usdc.abi)
    assert usdc.functions.balanceOf(sender.address).call() == 10**7

    tx = usdc.functions.transfer(chain.deployer, 1234).build_transaction(
        {"from": sender.address, "nonce": w3.eth.get_transaction_count(sender.address, "pending")})
    assert tx["maxFeePerGas"] > tx["maxPriorityFeePerGas"] > 0 and tx["gas"] > 21_000
    tx_hash = w3.eth.send_raw_transaction(Account.sign_transaction(tx, sender.private_key).raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=10)
    assert receipt["status"] == 1 and receipt["from"] == sender.address
    assert receipt["blockNumber"] == w3.eth.block_number
    (transfer,) = usdc.events.Transfer().process_receipt(receipt)
    assert (transfer.args.sender, transfer.args.receiver, transfer.args.value) == (sender.address, chain.deployer, 1234)
    logs = w3.eth.get_logs({"address": chain.usdc.address, "fromBlock": receipt["blockNumber"]})
    assert [log["transactionHash"] for log in logs] == [tx_hash]
    block = w3.eth.get_block(receipt["blockNumber"], full_transactions=True)
    assert block["transactions"][0]["hash"] == tx_hash and len(block["logsBloom"]) == 256
    assert w3.eth.get_transaction(tx_hash)["nonce"] == 0
    assert usdc.functions.balanceOf(sender.address).call() == 10**7 - 1234
    assert w3.eth.get_transaction_count(sender.address) == 1
    assert len(w3.eth.get_code(chain.usdc.address)) > 100


def test_a_revert_is_code_3_with_the_revert_data(served):
    """eth_call and eth_estimateGas of a reverting call answer code 3 with Error(string) data, which web3
    turns into ContractLogicError with the contract's reason."""
    chain, server = served
    w3 = Web3(Web3.HTTPProvider(server.url))
    usdc = w3.eth.contract(address=chain.usdc.address, abi=chain.usdc.abi)
    caller = chain.deployer  # holds no USDC (eth-tester wants a caller that can afford the gas)
    receiver = Account.create().address
    with pytest.raises(ContractLogicError, match="balance too low"):
        usdc.functions.transfer(receiver, 1).call({"from": caller})
    data = usdc.functions.transfer(receiver, 1)._encode_transaction_data()
    answer = _post(server.url, {"jsonrpc": "2.0", "id": 7, "method": "eth_estimateGas",
                                "params": [{"from": caller, "to": chain.usdc.address, "data": data}]}).json()
    assert answer["id"] == 7 and answer["error"]["code"] == 3
    revert = bytes.fromhex(answer["error"]["data"][2:])
    assert revert[:4] == bytes.fromhex("08c379a0") and abi_decode(["string"], revert[4:]) == ("balance too low",)


def test_batches_notifications_and_unknown_receipts(served):
    """A batch answers each request by id, in order; a notification gets no answer; an unknown
    transaction's receipt is null, as a node answers it."""
    chain, server = served
    answers = _post(server.url, [
        {"jsonrpc": "2.0", "id": "a", "method": "eth_chainId", "params": []},
        {"jsonrpc": "2.0", "method": "eth_blockNumber", "params": []},  # a notification
        {"jsonrpc": "2.0", "id": 2, "method": "eth_getBalance", "params": [chain.deployer, "latest"]},
        {"jsonrpc": "2.0", "id": 3, "method": "eth_getTransactionReceipt", "params": ["0x" + "11" * 32]},
    ]).json()
    assert [a["id"] for a in answers] == ["a", 2, 3]
    assert int(answers[0]["result"], 16) == chain.chain_id
    assert int(answers[1]["result"], 16) == chain.native_balance(chain.deployer)
    assert answers[2]["result"] is None
    only_notification = _post(server.url, {"jsonrpc": "2.0", "method": "eth_chainId", "params": []})
    assert only_notification.status_code == 204 and only_notification.content == b""
    w3 = Web3(Web3.HTTPProvider(server.url))
    with w3.batch_requests() as batch:
        batch.add(w3.eth.get_balance(chain.deployer))
        batch.add(w3.eth.get_block("latest"))
        balance, block = batch.execute()
    assert balance == chain.native_balance(chain.deployer) and block["number"] == w3.eth.block_number


@pytest.mark.parametrize("method", ["eth_sendTransaction", "eth_sign", "eth_accounts", "evm_mine", "evm_snapshot",
                                    "testing_timeTravel", "personal_unlockAccount", "debug_traceTransaction"])
def test_unlocked_account_and_test_only_methods_are_refused(served, method):
    """Only signed raw transactions move funds over the wire: the tester's unlocked accounts, time
    travel and snapshots are "method not found"."""
    chain, server = served
    before = chain.w3.eth.block_number
    answer = _post(server.url, {"jsonrpc": "2.0", "id": 1, "method": method,
                                "params": [{"from": chain.deployer, "to": chain.deployer, "value": "0x1"}]}).json()
    assert answer["error"]["code"] == -32601 and method in answer["error"]["message"]
    assert chain.w3.eth.block_number == before


@pytest.mark.parametrize("body, code", [
    (b"{not json", -32700),
    (b"[]", -32600),
    (b'{"jsonrpc": "1.0", "id": 1, "method": "eth_chainId"}', -32600),
    (b'{"jsonrpc": "2.0", "id": 1, "method": 5}', -32600),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "eth_getBalance", "params": {"a": 1}}', -32602),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "eth_getBalance", "params": ["0xnot-an-address", "latest"]}', -32000),
    (b"[1, 2]", -32600),
])
def test_malformed_requests_get_json_rpc_errors(served, body, code):
    """Bad JSON, an empty batch, a wrong version, a bad method or params: a JSON-RPC error, never a crash."""
    _chain, server = served
    answer = httpx.post(server.url, content=body, timeout=10).json()
    errors = [a["error"]["code"] for a in answer] if isinstance(answer, list) else [answer["error"]["code"]]
    assert set(errors) == {code}
    chain_id = b'{"jsonrpc":"2.0","id":1,"method":"eth_chainId"}'
    assert httpx.post(server.url, content=chain_id, timeout=10).json()["result"]


def test_oversized_bodies_and_other_verbs_are_refused(served):
    """A body over MAX_BODY is 413 before it is read; GET is 405."""
    _chain, server = served
    assert httpx.post(server.url, content=b"x" * (MAX_BODY + 1), timeout=10).status_code == 413
    assert httpx.get(server.url, timeout=10).status_code == 405


def test_concurrent_clients_are_served_consistently(served):
    """Eight threads of reads at once all get the right answers (the provider serializes py-evm)."""
    chain, server = served
    accounts = [chain.create_account(native=(i + 1) * 10**15) for i in range(8)]
    w3 = Web3(Web3.HTTPProvider(server.url))

    def read(i: int) -> list[int]:
        return [w3.eth.get_balance(accounts[i].address) for _ in range(10)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(read, range(8)))
    assert results == [[(i + 1) * 10**15] * 10 for i in range(8)]
    assert server.requests_served >= 80


def test_it_binds_loopback_only_and_stops(chain):
    """The server listens on 127.0.0.1 only; after stop() its port refuses connections."""
    server = LocalRpcServer(chain.provider).start()
    host, port = server.url.removeprefix("http://").split(":")
    assert host == "127.0.0.1" and "serving" in repr(server)
    assert Web3(Web3.HTTPProvider(server.url)).eth.chain_id == chain.chain_id
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(port)), timeout=2).close()


def test_a_socket_bound_before_the_chain_answers_requests_sent_before_start(chain):
    """Served on a socket bound earlier (the local network binds it before its chain exists, so hosts
    can have its URL): a request sent before start() waits in the socket's backlog and is answered
    once the server starts. A socket that is not on loopback is refused."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = LocalRpcServer(chain.provider, sock=sock)
    assert server.url == f"http://127.0.0.1:{sock.getsockname()[1]}"
    with ThreadPoolExecutor(1) as pool:
        early = pool.submit(_post, server.url, {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
        assert server.requests_served == 0
        server.start()
        try:
            assert int(early.result(timeout=30).json()["result"], 16) == chain.chain_id
            assert server.requests_served == 1
        finally:
            server.stop()
    with socket.create_server(("0.0.0.0", 0)) as anywhere, pytest.raises(InvalidOptions):
        LocalRpcServer(chain.provider, sock=anywhere)


def test_kept_alive_requests_are_not_held_back_by_delayed_acks(served):
    """Requests on one kept-alive connection (what web3's HTTPProvider does) answer in about a millisecond:
    the answer's headers and body go out without Nagle waiting for the client's delayed ACK, which cost
    40 ms per request (a paid host's proof or a client's job took hundreds of milliseconds of it)."""
    import statistics
    import time

    import requests

    _, server = served
    session = requests.Session()
    latencies = []
    for index in range(11):
        started = time.perf_counter()
        answer = session.post(server.url, json={"jsonrpc": "2.0", "id": index, "method": "eth_blockNumber",
                                                "params": []}, timeout=10)
        latencies.append(time.perf_counter() - started)
        assert answer.json()["id"] == index
    assert statistics.median(latencies) < 0.02  # 40 ms each with the delayed-ACK stall
