# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title Multicall3 (Vyper)
@notice Batch many read calls into one. `aggregate3` has the selector and the
        ABI of the canonical Multicall3 (0xcA11bde05977b3631167028862bE2a173976CA11).
@dev Vyper needs bounds: at most MAX_CALLS calls per batch, MAX_CALLDATA bytes of
     call data and MAX_RETURNDATA bytes of return data per call. Memory is laid out
     for the bounds, so a call costs about 15 M gas whatever its size; the bounds
     keep that under the usual 30 M gas cap of eth_call. Clients split bigger
     batches into chunks (and send the chunks in one JSON-RPC batch).
"""

MAX_CALLS: constant(uint256) = 256
MAX_CALLDATA: constant(uint256) = 1024
MAX_RETURNDATA: constant(uint256) = 4096

struct Call3:
    target: address
    allowFailure: bool
    callData: Bytes[MAX_CALLDATA]

struct Result:
    success: bool
    returnData: Bytes[MAX_RETURNDATA]


@external
@payable
def aggregate3(calls: DynArray[Call3, MAX_CALLS]) -> DynArray[Result, MAX_CALLS]:
    """
    @notice Call each target with its call data; revert if a call that does not
            allow failure fails.
    """
    results: DynArray[Result, MAX_CALLS] = []
    for c: Call3 in calls:
        success: bool = False
        data: Bytes[MAX_RETURNDATA] = b""
        success, data = raw_call(
            c.target, c.callData, max_outsize=MAX_RETURNDATA, revert_on_failure=False
        )
        assert success or c.allowFailure, "Multicall3: call failed"
        results.append(Result(success=success, returnData=data))
    return results


@view
@external
def getBlockNumber() -> uint256:
    return block.number


@view
@external
def getChainId() -> uint256:
    return chain.id


@view
@external
def getCurrentBlockTimestamp() -> uint256:
    return block.timestamp


@view
@external
def getEthBalance(addr: address) -> uint256:
    return addr.balance
