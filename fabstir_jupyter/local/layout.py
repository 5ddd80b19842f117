"""What the local chain will hold, known before it exists: host keys, model ids, contract addresses.

Loading the EVM (web3, eth-tester, py-evm) takes about a second; the local network starts its host
processes before that, and a paid host needs its key, the model's registry id and the
JobMarketplace's address. Everything here is a pure function of its arguments and imports only
light libraries (eth-hash's keccak, coincurve; eth-utils alone takes 0.1-0.3 s to import, as it
loads pydantic):

- :func:`derive_key`: a host's key, derived from a seed or fresh;
- :func:`model_id`: a model's ModelRegistry id;
- :func:`contract_addresses`: where :class:`~fabstir_jupyter.local.chain.LocalChain` deploys each
  contract. It deploys from :data:`DEPLOYER`, in :data:`DEPLOY_ORDER`, each contract at the address
  the EVM's CREATE rule gives (keccak256(rlp([sender, nonce]))[12:]), and checks every address
  against this function when it starts.

Addresses are EIP-55 checksummed, as eth-utils writes them.
"""

from __future__ import annotations

import coincurve
from eth_hash.auto import keccak

__all__ = ["DEPLOYER", "DEPLOY_ORDER", "checksummed", "contract_address", "contract_addresses", "derive_key",
           "model_id"]

#: The account that deploys the local chain's contracts: eth-tester's first genesis account (private
#: key 1). Its nonce is 0 in the genesis state.
DEPLOYER = "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"
#: The contracts in the order the deployer creates them (the n-th is created with nonce n).
DEPLOY_ORDER = ("fab_token", "usdc", "model_registry", "node_registry", "multicall", "host_earnings",
                "job_marketplace")


def derive_key(seed: int | None, index: int) -> str:
    """Return the private key (0x-hex) of host ``index``: derived from ``seed``, or fresh when ``None``.

    The same seed and index always give the same key, hence the same host address.
    """
    if seed is None:
        return "0x" + coincurve.PrivateKey().secret.hex()  # from the OS's CSPRNG
    return "0x" + keccak(f"fabstir local host {seed} {index}".encode()).hex()


def model_id(repo: str, file_name: str) -> str:
    """Return the registry id of a model: ``0x`` + keccak256(utf8(repo + "/" + file_name)) in hex."""
    return "0x" + keccak(f"{repo}/{file_name}".encode()).hex()


def checksummed(address: bytes) -> str:
    """A 20-byte address as EIP-55 writes it: hex, a letter upper-case where keccak256 of the
    lower-case hex has a nibble of 8 or more at its place."""
    text = address.hex()
    nibbles = keccak(text.encode("ascii")).hex()[: len(text)]  # the hash's first 40 of its 64 nibbles
    return "0x" + "".join(c.upper() if int(n, 16) >= 8 else c for c, n in zip(text, nibbles, strict=True))


def contract_address(sender: str, nonce: int) -> str:
    """The address of the contract ``sender`` creates with ``nonce`` (CREATE, not CREATE2).

    Raises:
        ValueError: ``nonce`` is not from 0 to 127 (the local chain's deployer uses 0 to 6).
    """
    if not 0 <= nonce < 0x80:
        raise ValueError(f"nonce must be from 0 to 127, not {nonce}")
    # rlp([sender, nonce]): a list of 22 bytes (0xc0 + 22) holding a 20-byte string (0x80 + 20) and
    # the nonce, one byte that is its own encoding (0 is the empty string, 0x80)
    encoded = bytes([0xC0 + 22, 0x80 + 20]) + bytes.fromhex(sender.removeprefix("0x")) + bytes([nonce or 0x80])
    return checksummed(keccak(encoded)[12:])


def contract_addresses(deployer: str = DEPLOYER) -> dict[str, str]:
    """Each contract of :data:`DEPLOY_ORDER` and the address ``deployer`` creates it at."""
    return {name: contract_address(deployer, nonce) for nonce, name in enumerate(DEPLOY_ORDER)}
