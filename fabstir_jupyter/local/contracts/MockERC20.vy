# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title MockERC20 (local network)
@notice A plain ERC-20 whose owner mints at will: the local chain's FAB (hosts stake
        it in the NodeRegistry, as on Base Sepolia) and any other test token.
@dev Not for value: minting is unlimited. Transfers and allowances follow ERC-20;
     an allowance of max(uint256) is never spent down.
"""

from ethereum.ercs import IERC20

implements: IERC20

MAX_NAME: constant(uint256) = 64

event Transfer:
    sender: indexed(address)
    receiver: indexed(address)
    value: uint256

event Approval:
    owner: indexed(address)
    spender: indexed(address)
    value: uint256

name: public(String[MAX_NAME])
symbol: public(String[MAX_NAME])
decimals: public(uint8)
totalSupply: public(uint256)
balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
owner: public(address)


@deploy
def __init__(name_: String[MAX_NAME], symbol_: String[MAX_NAME], decimals_: uint8):
    self.name = name_
    self.symbol = symbol_
    self.decimals = decimals_
    self.owner = msg.sender


@internal
def _transfer(sender: address, receiver: address, amount: uint256):
    assert receiver != empty(address), "transfer to the zero address"
    assert self.balanceOf[sender] >= amount, "balance too low"
    self.balanceOf[sender] -= amount
    self.balanceOf[receiver] += amount
    log Transfer(sender=sender, receiver=receiver, value=amount)


@external
def transfer(receiver: address, amount: uint256) -> bool:
    self._transfer(msg.sender, receiver, amount)
    return True


@external
def transferFrom(sender: address, receiver: address, amount: uint256) -> bool:
    allowed: uint256 = self.allowance[sender][msg.sender]
    if allowed != max_value(uint256):
        assert allowed >= amount, "allowance too low"
        self.allowance[sender][msg.sender] = allowed - amount
    self._transfer(sender, receiver, amount)
    return True


@external
def approve(spender: address, amount: uint256) -> bool:
    self.allowance[msg.sender][spender] = amount
    log Approval(owner=msg.sender, spender=spender, value=amount)
    return True


@external
def mint(receiver: address, amount: uint256):
    """
    @notice Create `amount` tokens for `receiver`; only the owner may.
    """
    assert msg.sender == self.owner, "not owner"
    assert receiver != empty(address), "mint to the zero address"
    self.totalSupply += amount
    self.balanceOf[receiver] += amount
    log Transfer(sender=empty(address), receiver=receiver, value=amount)
