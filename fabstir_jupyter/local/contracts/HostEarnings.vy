# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title HostEarnings (local network)
@notice Holds what hosts have earned from settled jobs, per host and per token
        (0x0 = native), until each host withdraws it. Only authorized callers (the
        JobMarketplace) credit earnings, after sending the funds here. Every function
        and event named as in the production HostEarnings has its exact signature,
        outputs and selector (spec/production-abi.txt).
@dev As in production: creditEarnings needs an authorized caller, a host and a
     non-zero amount; withdraw / withdrawAll / withdrawMultiple pay the caller its own
     balance. Left out: the proxy, ownership transfer, rescueTokens.
"""

from ethereum.ercs import IERC20

MAX_TOKENS: constant(uint256) = 32

event EarningsCredited:
    host: indexed(address)
    token: indexed(address)
    amount: uint256
    newBalance: uint256

event EarningsWithdrawn:
    host: indexed(address)
    token: indexed(address)
    amount: uint256
    remainingBalance: uint256

event CallerAuthorized:
    caller: indexed(address)
    authorized: bool

owner: public(address)
authorizedCallers: public(HashMap[address, bool])
totalAccumulated: public(HashMap[address, uint256])
totalWithdrawn: public(HashMap[address, uint256])
earnings: HashMap[address, HashMap[address, uint256]]  # host -> token -> balance


@deploy
def __init__():
    self.owner = msg.sender


@external
@payable
def __default__():
    """
    @notice Accept native funds (the marketplace sends a host's share before crediting it).
    """
    pass


@external
def setAuthorizedCaller(caller: address, authorized: bool):
    """
    @notice Let `caller` (the JobMarketplace) credit earnings, or stop it; owner only.
    """
    assert msg.sender == self.owner, "not owner"
    assert caller != empty(address), "Invalid caller address"
    self.authorizedCallers[caller] = authorized
    log CallerAuthorized(caller=caller, authorized=authorized)


@external
@nonreentrant
def creditEarnings(host: address, amount: uint256, token: address):
    """
    @notice Add `amount` of `token` (0x0 = native) to `host`'s balance; authorized callers only.
    """
    assert self.authorizedCallers[msg.sender], "Not authorized to credit earnings"
    assert host != empty(address), "Invalid host address"
    assert amount > 0, "Amount must be positive"
    self.earnings[host][token] += amount
    self.totalAccumulated[token] += amount
    log EarningsCredited(host=host, token=token, amount=amount, newBalance=self.earnings[host][token])


@view
@external
def getBalance(host: address, token: address) -> uint256:
    return self.earnings[host][token]


@view
@external
def getBalances(host: address, tokens: DynArray[address, MAX_TOKENS]) -> DynArray[uint256, MAX_TOKENS]:
    balances: DynArray[uint256, MAX_TOKENS] = []
    for token: address in tokens:
        balances.append(self.earnings[host][token])
    return balances


@view
@external
def getTokenStats(token: address) -> (uint256, uint256, uint256):
    """
    @notice Return (accumulated, withdrawn, outstanding) of `token` over all hosts.
    """
    accumulated: uint256 = self.totalAccumulated[token]
    withdrawn: uint256 = self.totalWithdrawn[token]
    return accumulated, withdrawn, accumulated - withdrawn


@internal
def _pay(token: address, amount: uint256, remaining: uint256):
    if token == empty(address):
        raw_call(msg.sender, b"", value=amount)
    else:
        assert extcall IERC20(token).transfer(msg.sender, amount, default_return_value=True), "transfer failed"
    log EarningsWithdrawn(host=msg.sender, token=token, amount=amount, remainingBalance=remaining)


@external
@nonreentrant
def withdraw(amount: uint256, token: address):
    """
    @notice Pay the caller `amount` of its `token` earnings (0x0 = native).
    """
    assert amount > 0, "Amount must be positive"
    assert self.earnings[msg.sender][token] >= amount, "Insufficient earnings"
    self.earnings[msg.sender][token] -= amount
    self.totalWithdrawn[token] += amount
    self._pay(token, amount, self.earnings[msg.sender][token])


@external
@nonreentrant
def withdrawAll(token: address):
    """
    @notice Pay the caller all its `token` earnings (0x0 = native).
    """
    amount: uint256 = self.earnings[msg.sender][token]
    assert amount > 0, "No earnings to withdraw"
    self.earnings[msg.sender][token] = 0
    self.totalWithdrawn[token] += amount
    self._pay(token, amount, 0)


@external
@nonreentrant
def withdrawMultiple(tokens: DynArray[address, MAX_TOKENS]):
    """
    @notice Pay the caller all its earnings in each of `tokens`; zero balances are skipped.
    """
    for token: address in tokens:
        amount: uint256 = self.earnings[msg.sender][token]
        if amount > 0:
            self.earnings[msg.sender][token] = 0
            self.totalWithdrawn[token] += amount
            self._pay(token, amount, 0)
