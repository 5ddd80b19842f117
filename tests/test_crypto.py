"""fabstir_jupyter.crypto: keys and primitives, checked against published vectors and other libraries."""

from __future__ import annotations

import copy
import pickle

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from eth_account import Account
from hypothesis import given, strategies as st

from fabstir_jupyter.crypto import (
    PrivateKey,
    PublicKey,
    aead_decrypt,
    aead_encrypt,
    decode_hex,
    hkdf_sha256,
    public_key_from_transaction,
    recover_public_key,
)
from fabstir_jupyter.errors import EncryptionError, InvalidOptions

SECRET_HEX = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


# --------------------------------------------------------------------------- keys


def test_private_key_loads_0x_and_64_hex_and_derives_the_ethereum_address():
    """A 0x+64-hex key (any case, 0x optional) derives the address eth-account derives."""
    expected = Account.from_key(SECRET_HEX).address
    for text in (SECRET_HEX, SECRET_HEX[2:], SECRET_HEX.upper().replace("0X", "0x"), f"  {SECRET_HEX}\n"):
        assert PrivateKey.from_hex(text).address == expected


@pytest.mark.parametrize("text", [
    "", "0x", "0x1234", SECRET_HEX + "00", SECRET_HEX[:-1] + "g", "0x" + "00" * 32,
    hex(SECP256K1_N), "0x" + "ff" * 32, None, 12345, SECRET_HEX.replace("0x", "0x "),
], ids=lambda text: f"len{len(text)}" if isinstance(text, str) else type(text).__name__)  # ids never show a key
def test_private_key_refuses_other_forms_without_echoing_them(text):
    """A malformed or out-of-range key is INVALID_OPTIONS, and the message never holds the text."""
    with pytest.raises(InvalidOptions) as info:
        PrivateKey.from_hex(text)
    assert info.value.field == "private_key"
    assert SECRET_HEX[2:12] not in str(info.value)
    if isinstance(text, str) and len(text) > 4:
        assert text.strip()[2:] not in str(info.value)


def test_private_key_never_shows_its_secret():
    """repr, str and f-strings show the address only; pickling and copying refuse."""
    key = PrivateKey.from_hex(SECRET_HEX)
    for shown in (repr(key), str(key), f"{key}", repr([key])):
        assert SECRET_HEX[2:] not in shown.lower()
        assert key.address in shown
    for attempt in (lambda: pickle.dumps(key), lambda: copy.copy(key), lambda: copy.deepcopy(key)):
        with pytest.raises(TypeError):
            attempt()


def test_public_key_reads_both_encodings_and_compares_by_point():
    """Compressed and uncompressed forms of one key are equal; str is the 66-hex registry form."""
    key = PrivateKey.from_hex(SECRET_HEX).public_key
    compressed, uncompressed = PublicKey.from_hex(str(key)), PublicKey.from_bytes(key.uncompressed)
    assert compressed == uncompressed == key and hash(compressed) == hash(uncompressed)
    assert len(str(key)) == 66 and str(key)[:2] in ("02", "03")
    assert PublicKey.from_hex("0x" + str(key).upper()) == key
    assert key.address == Account.from_key(SECRET_HEX).address


@pytest.mark.parametrize("text, code", [
    ("02" + "zz" * 32, "INVALID_HEX_ENCODING"),
    ("02 " + "11" * 32, "INVALID_HEX_ENCODING"),
    ("02" + "11" * 31, "INVALID_PAYLOAD"),
    ("05" + "11" * 32, "INVALID_PAYLOAD"),
    ("02" + "ff" * 32, "INVALID_PAYLOAD"),  # x beyond the field prime
    (None, "INVALID_HEX_ENCODING"),
])
def test_public_key_refuses_what_is_not_a_point(text, code):
    """Bad hex, a bad length or a non-point is a coded EncryptionError."""
    with pytest.raises(EncryptionError) as info:
        PublicKey.from_hex(text)
    assert info.value.code == code


def test_decode_hex_takes_what_production_peers_send_and_nothing_else():
    """Optional 0x, either case; whitespace, odd lengths and non-strings are refused."""
    assert decode_hex("0xABcd", what="x") == b"\xab\xcd" == decode_hex("abCD", what="x")
    assert decode_hex("", what="x") == b""
    for bad in ("ab cd", "abc", "0xg0", " ab", b"ab", 1):
        with pytest.raises(EncryptionError) as info:
            decode_hex(bad, what="nonceHex")
        assert info.value.code == "INVALID_HEX_ENCODING" and "nonceHex" in info.value.message


@given(st.one_of(st.text(max_size=12), st.text(alphabet="0123456789abcdefABCDEFxX \t\n٣g", max_size=12)))
def test_decode_hex_accepts_exactly_the_strict_hex_grammar(text):
    """The fast decoder accepts exactly ``(0x|0X)?([0-9a-fA-F]{2})*`` and decodes it as bytes.fromhex does."""
    import re

    match = re.fullmatch(r"(?:0[xX])?((?:[0-9a-fA-F]{2})*)", text)
    if match is None:
        with pytest.raises(EncryptionError):
            decode_hex(text, what="x")
    else:
        assert decode_hex(text, what="x") == bytes.fromhex(match.group(1))


# --------------------------------------------------------------------------- ECDH, HKDF, AEAD


def test_ecdh_is_the_raw_x_coordinate_openssl_computes():
    """Both sides get the same 32 bytes, equal to OpenSSL's ECDH (via cryptography)."""
    a, b = PrivateKey.generate(), PrivateKey.generate()
    shared = a.ecdh(b.public_key)
    assert shared == b.ecdh(a.public_key) and len(shared) == 32
    ossl_a = ec.derive_private_key(int.from_bytes(a._secret(), "big"), ec.SECP256K1())
    ossl_b = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), b.public_key.compressed)
    assert ossl_a.exchange(ec.ECDH(), ossl_b) == shared


def test_hkdf_matches_rfc5869_test_case_1():
    """HKDF-SHA256 reproduces RFC 5869 A.1."""
    okm = hkdf_sha256(bytes([0x0B]) * 22, salt=bytes(range(13)), info=bytes(range(0xF0, 0xFA)), length=42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


XCHACHA_KEY = bytes(range(0x80, 0xA0))
XCHACHA_NONCE = bytes(range(0x40, 0x58))
XCHACHA_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
XCHACHA_TEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
    b"sunscreen would be it."
)
XCHACHA_SEALED = bytes.fromhex(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb731c7f1b0b4aa6440bf3a82f4eda7e39"
    "ae64c6708c54c216cb96b72e1213b4522f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52e" "c0875924c1c7987947deafd8780acf49"
)


def test_xchacha20_poly1305_matches_the_cfrg_draft_vector():
    """draft-irtf-cfrg-xchacha A.3.1: ciphertext ‖ tag, and back."""
    assert aead_encrypt(XCHACHA_KEY, XCHACHA_NONCE, XCHACHA_TEXT, XCHACHA_AAD) == XCHACHA_SEALED
    assert aead_decrypt(XCHACHA_KEY, XCHACHA_NONCE, XCHACHA_SEALED, XCHACHA_AAD) == XCHACHA_TEXT


@pytest.mark.parametrize("change", ["aad", "nonce", "key", "ciphertext", "tag", "truncated"])
def test_aead_refuses_anything_altered(change):
    """Any altered byte or the wrong AAD is DECRYPTION_FAILED, never plaintext."""
    key, nonce, sealed, aad = bytearray(XCHACHA_KEY), bytearray(XCHACHA_NONCE), bytearray(XCHACHA_SEALED), XCHACHA_AAD
    if change == "aad":
        aad = b"chunk_1"
    elif change == "nonce":
        nonce[0] ^= 1
    elif change == "key":
        key[31] ^= 0x80
    elif change == "ciphertext":
        sealed[3] ^= 1
    elif change == "tag":
        sealed[-1] ^= 1
    else:
        sealed = sealed[:15]
    with pytest.raises(EncryptionError) as info:
        aead_decrypt(bytes(key), bytes(nonce), bytes(sealed), aad)
    assert info.value.code == "DECRYPTION_FAILED"


def test_aead_refuses_a_nonce_that_is_not_24_bytes():
    """A 12-byte (ChaCha20-Poly1305 IETF) nonce is INVALID_NONCE_SIZE on both sides."""
    for call in (aead_encrypt, aead_decrypt):
        with pytest.raises(EncryptionError) as info:
            call(XCHACHA_KEY, bytes(12), b"x" * 16)
        assert info.value.code == "INVALID_NONCE_SIZE"


# --------------------------------------------------------------------------- signatures


def test_signature_is_65_bytes_low_s_and_verifies_with_openssl():
    """r ‖ s ‖ v with v 0/1, deterministic, low s, valid for OpenSSL, and the key recovers."""
    key = PrivateKey.from_hex(SECRET_HEX)
    digest = bytes(range(32))
    signature = key.sign_digest(digest)
    assert len(signature) == 65 and signature[64] in (0, 1) and signature == key.sign_digest(digest)
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big")
    assert s <= SECP256K1_N // 2
    ossl = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), key.public_key.compressed)
    ossl.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    with pytest.raises(InvalidSignature):
        ossl.verify(encode_dss_signature(r, s), bytes(32), ec.ECDSA(Prehashed(hashes.SHA256())))
    assert recover_public_key(signature, digest) == key.public_key
    assert recover_public_key(signature[:64] + bytes([signature[64] + 27]), digest) == key.public_key


def test_recovery_over_another_digest_yields_another_key():
    """Recovery always finds *a* key: only a comparison with an expected key authenticates."""
    key = PrivateKey.generate()
    signature = key.sign_digest(bytes(32))
    assert recover_public_key(signature, bytes([1]) * 32) != key.public_key


@pytest.mark.parametrize("signature", [bytes(64), bytes(66), bytes(64) + b"\x05", bytes(65)])
def test_recovery_refuses_malformed_signatures(signature):
    """Wrong length, a recovery id beyond 3, or r = s = 0 is INVALID_PAYLOAD."""
    with pytest.raises(EncryptionError) as info:
        recover_public_key(signature, bytes(32))
    assert info.value.code == "INVALID_PAYLOAD"


# --------------------------------------------------------------------------- keys from transactions

TX_KINDS = {
    "legacy-eip155": {"gasPrice": 10**9, "chainId": 84532},
    "legacy-pre155": {"gasPrice": 10**9},
    "access-list": {"gasPrice": 10**9, "chainId": 84532, "accessList": [], "type": 1},
    "dynamic-fee": {"maxFeePerGas": 2 * 10**9, "maxPriorityFeePerGas": 10**9, "chainId": 84532, "type": 2},
}


@pytest.mark.parametrize("kind", TX_KINDS)
def test_public_key_recovers_from_a_raw_signed_transaction(kind):
    """Every transaction type eth-account signs gives back the signer's public key (raw or hex)."""
    key = PrivateKey.from_hex(SECRET_HEX)
    tx = {"to": "0x" + "11" * 20, "value": 5, "gas": 60_000, "nonce": 7, "data": b"\x01\x02", **TX_KINDS[kind]}
    raw = Account.sign_transaction(tx, SECRET_HEX).raw_transaction
    assert public_key_from_transaction(bytes(raw)) == key.public_key
    assert public_key_from_transaction(raw.to_0x_hex(), expected_address=key.address.lower()) == key.public_key


@pytest.fixture(scope="module")
def tester_w3():
    """An in-process chain (eth-tester) where the SECRET_HEX account holds 1 ETH."""
    pytest.importorskip("eth_tester", reason="needs eth-tester (the 'local' extra)")
    from eth_tester import EthereumTester
    from web3 import EthereumTesterProvider, Web3

    w3 = Web3(EthereumTesterProvider(EthereumTester()))
    funder = w3.eth.accounts[0]
    key_owner = Account.from_key(SECRET_HEX).address
    w3.eth.send_transaction({"from": funder, "to": key_owner, "value": 10**18, "gas": 21_000})
    return w3


@pytest.mark.parametrize("kind", TX_KINDS)
def test_public_key_recovers_from_the_fields_a_node_returns(tester_w3, kind):
    """Every type, sent to a real chain and read back with eth_getTransactionByHash (v/r/s, yParity,
    EIP-155 v), rebuilds its signed encoding, matches its hash and gives the signer's key."""
    key = PrivateKey.from_hex(SECRET_HEX)
    extra = dict(TX_KINDS[kind])
    if "chainId" in extra:
        extra["chainId"] = tester_w3.eth.chain_id
    if "accessList" in extra:
        extra["accessList"] = [{"address": "0x" + "22" * 20, "storageKeys": ["0x" + "00" * 32]}]
    nonce = tester_w3.eth.get_transaction_count(key.address)
    tx = {"to": "0x" + "11" * 20, "value": 5, "gas": 60_000, "nonce": nonce, "data": b"\x01\x02", **extra}
    sent = tester_w3.eth.send_raw_transaction(Account.sign_transaction(tx, SECRET_HEX).raw_transaction)
    fetched = dict(tester_w3.eth.get_transaction(sent))
    assert public_key_from_transaction(fetched, expected_address=key.address) == key.public_key


@pytest.mark.parametrize("tx", [b"", b"\x02", b"\xc0", "0xzz", b"\x02" + bytes(40), "0x" + "f8" * 10])
def test_public_key_from_garbage_is_a_coded_error(tx):
    """Bytes that are no signed transaction are INVALID_PAYLOAD."""
    with pytest.raises(EncryptionError) as info:
        public_key_from_transaction(tx)
    assert info.value.code in ("INVALID_PAYLOAD", "INVALID_HEX_ENCODING")


def test_a_transaction_of_another_signer_is_refused():
    """expected_address must be the signer's."""
    raw = Account.sign_transaction({"to": "0x" + "11" * 20, "value": 0, "gas": 21_000, "nonce": 0,
                                    "gasPrice": 1, "chainId": 1}, SECRET_HEX).raw_transaction
    with pytest.raises(EncryptionError) as info:
        public_key_from_transaction(raw, expected_address=PrivateKey.generate().address)
    assert info.value.code == "INVALID_PAYLOAD" and "not by" in info.value.message


def test_host_key_recovers_from_its_registration_on_a_real_chain():
    """The registerNode transaction a host sent (read back with eth_getTransactionByHash) yields the
    key the host publishes; a field altered in transit no longer reproduces the transaction hash."""
    pytest.importorskip("eth_tester", reason="the local chain needs eth-tester (the 'local' extra)")
    from fabstir_jupyter.local.chain import LocalChain

    with LocalChain(seed=5) as chain:
        host = chain.register_host("http://127.0.0.1:9", models=[("org/repo", "m.gguf")], prices=(1, 1))
        # The host's own transactions (approve the stake, register), newest last; reading "latest"
        # may first mine an idle block, so look through every block.
        sent = [tx for number in range(chain.w3.eth.block_number + 1)
                for tx in chain.w3.eth.get_block(number, full_transactions=True)["transactions"]
                if tx["from"] == host.address]
        registration = sent[-1]
        fetched = dict(chain.w3.eth.get_transaction(registration["hash"]))
    key = public_key_from_transaction(fetched, expected_address=host.address)
    assert key == PublicKey.from_hex(host.public_key)
    assert key.address == host.address
    altered = {**fetched, "value": fetched["value"] + 1}
    with pytest.raises(EncryptionError) as info:
        public_key_from_transaction(altered)
    assert info.value.code == "INVALID_PAYLOAD"


def test_sign_transaction_is_eth_accounts_signature_and_keeps_the_secret_in():
    """PrivateKey.sign_transaction gives eth-account's raw signed transaction, recovering to the key's
    address; a transaction eth-account refuses is INVALID_OPTIONS whose text holds no key."""
    secret = bytes(range(1, 33))
    key = PrivateKey.from_bytes(secret)
    tx = {"to": "0x" + "22" * 20, "value": 5, "gas": 21_000, "maxFeePerGas": 2 * 10**9,
          "maxPriorityFeePerGas": 10**9, "nonce": 3, "chainId": 84532, "from": key.address}
    raw = key.sign_transaction(tx)
    expected = Account.sign_transaction({k: v for k, v in tx.items() if k != "from"}, secret).raw_transaction
    assert raw == bytes(expected)
    assert Account.recover_transaction(raw) == key.address
    with pytest.raises(InvalidOptions) as caught:
        key.sign_transaction({"to": "0x" + "22" * 20, "value": "five"})
    assert secret.hex() not in str(caught.value) and caught.value.__cause__ is None
