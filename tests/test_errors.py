"""Tests for fabstir_jupyter.errors: the code namespace of spec/PROTOCOL.md §7 and the error classes."""

from __future__ import annotations

import copy
import pickle
import re
from pathlib import Path

import pytest

from fabstir_jupyter import errors
from fabstir_jupyter.errors import (
    CLIENT_ONLY_CODES,
    ERROR_CODES,
    AuthFailed,
    ConnectionFailed,
    DeadlineExceeded,
    EncryptionError,
    FabstirError,
    FirstTokenTimeout,
    HostBusy,
    HostError,
    IdleTimeout,
    InferenceTimeout,
    InvalidInput,
    InvalidOptions,
    InvalidPrompt,
    LedgerClosed,
    LedgerUnavailable,
    ModelNotAvailable,
    ProtocolError,
    RateLimitExceeded,
    error_from_code,
)

PROTOCOL_DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"

# A row of the error-code table: | `CODE` | yes/no | meaning |
_ROW = re.compile(r"^\| `([A-Z][A-Z0-9_]+)` \| (yes|no) \|", re.M)


def _section(text: str, number: str) -> str:
    """Return the body of the level-2 section ``## <number>.`` of a markdown document."""
    match = re.search(rf"^## {re.escape(number)}\.[^\n]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"section {number} not found in {PROTOCOL_DOC}"
    return match.group(1)


def documented_codes() -> dict[str, bool]:
    """The error codes of docs/protocol.md §9, mapped to whether the table calls them retryable."""
    text = PROTOCOL_DOC.read_text(encoding="utf-8")
    return {code: flag == "yes" for code, flag in _ROW.findall(_section(text, "9"))}


DOC_CODES = documented_codes()

ENCRYPTION_CODES = {
    "ENCRYPTION_NOT_SUPPORTED",
    "MISSING_PAYLOAD",
    "INVALID_PAYLOAD",
    "INVALID_HEX_ENCODING",
    "INVALID_NONCE_SIZE",
    "DECRYPTION_FAILED",
    "SESSION_KEY_NOT_FOUND",
}


def test_protocol_doc_lists_the_known_codes() -> None:
    """docs/protocol.md §9 lists the brief's codes, the added ones and the encryption ones."""
    brief = {"NO_HOSTS_AVAILABLE", "CONNECTION_FAILED", "INFERENCE_TIMEOUT", "MODEL_NOT_AVAILABLE",
             "RATE_LIMIT_EXCEEDED", "INVALID_PROMPT"}
    added = {"INVALID_OPTIONS", "CONTEXT_OVERFLOW", "HOST_BUSY", "HOST_ERROR", "PROTOCOL_ERROR",
             "SESSION_NOT_FOUND", "CANCELLED", "AUTH_FAILED"}
    assert brief | added | ENCRYPTION_CODES <= set(DOC_CODES)


@pytest.mark.parametrize("code", sorted(DOC_CODES))
def test_every_documented_code_maps_to_a_class_with_that_code(code: str) -> None:
    """Each code of docs/protocol.md §9 has a class in ERROR_CODES, with the documented retryable
    flag, and error_from_code builds it carrying that code."""
    assert code in ERROR_CODES, f"{code} from docs/protocol.md §9 has no error class"
    cls = ERROR_CODES[code]
    assert issubclass(cls, FabstirError)
    if code in ENCRYPTION_CODES:
        assert cls is EncryptionError
    else:
        assert cls.code == code
    documented = DOC_CODES[code]
    assert cls("x", code=code).retryable is documented, f"docs/protocol.md §9 says {code} retryable={documented}"
    if code in CLIENT_ONLY_CODES:
        return  # never built from a host frame (see test_a_host_cannot_raise_client_only_codes)
    error = error_from_code(code, "something failed")
    assert type(error) is cls
    assert error.code == code


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_every_error_class_code_is_documented(code: str) -> None:
    """No code reaches users undocumented: every code in ERROR_CODES has a row in docs/protocol.md §9."""
    assert code in DOC_CODES, f"{code} is raised by the package but missing from docs/protocol.md §9"


def test_documented_codes_are_exactly_the_package_codes() -> None:
    """docs/protocol.md §9 lists exactly ERROR_CODES: the wire codes plus the client-only ledger and chain codes."""
    assert {"LEDGER_UNAVAILABLE", "LEDGER_CLOSED", "CHAIN_ERROR"} == CLIENT_ONLY_CODES
    assert set(DOC_CODES) == set(ERROR_CODES)


@pytest.mark.parametrize("code, cls", [("LEDGER_UNAVAILABLE", LedgerUnavailable), ("LEDGER_CLOSED", LedgerClosed)])
def test_ledger_errors_live_in_the_tree_and_are_not_retryable(code: str, cls: type[FabstirError]) -> None:
    """The ledger errors are FabstirErrors with their own codes, also the builtin a caller may expect."""
    assert ERROR_CODES[code] is cls and cls.code == code and cls.retryable is False
    assert issubclass(LedgerUnavailable, OSError) and issubclass(LedgerClosed, RuntimeError)
    from fabstir_jupyter import usage

    assert usage.LedgerUnavailable is LedgerUnavailable and usage.LedgerClosed is LedgerClosed


@pytest.mark.parametrize("code", sorted(CLIENT_ONLY_CODES))
def test_a_host_cannot_raise_client_only_codes(code: str) -> None:
    """A host frame carrying a ledger code becomes a HostError keeping the code, not a local ledger error."""
    error = error_from_code(code, "odd")
    assert type(error) is HostError and error.code == code


@pytest.mark.parametrize("code, cls", sorted(ERROR_CODES.items()))
def test_error_codes_table_is_consistent(code: str, cls: type[FabstirError]) -> None:
    """A class's own code is the key it is filed under (EncryptionError carries several)."""
    assert code == cls.code or cls is EncryptionError
    assert cls(code.lower()).message == code.lower()


@pytest.mark.parametrize(
    "code, retryable",
    [
        # spec §7: "connection failures, timeouts, rate limits, busy, host errors: yes"
        ("CONNECTION_FAILED", True),
        ("INFERENCE_TIMEOUT", True),
        ("RATE_LIMIT_EXCEEDED", True),
        ("HOST_BUSY", True),
        ("HOST_ERROR", True),
        # "invalid prompt/options, model not available anywhere, auth: no"
        ("INVALID_PROMPT", False),
        ("INVALID_OPTIONS", False),
        ("MODEL_NOT_AVAILABLE", False),
        ("AUTH_FAILED", False),
    ],
)
def test_retryable_flag_follows_spec(code: str, retryable: bool) -> None:
    """Each class says whether a retry may help, as spec §7 lists it."""
    assert ERROR_CODES[code].retryable is retryable
    assert error_from_code(code, "m").retryable is retryable


@pytest.mark.parametrize("cls", [FirstTokenTimeout, IdleTimeout, DeadlineExceeded])
def test_timeout_leaves_share_the_timeout_code(cls: type[InferenceTimeout]) -> None:
    """Timeout leaves are InferenceTimeouts with code INFERENCE_TIMEOUT."""
    error = cls("no first token within 5 s")
    assert isinstance(error, InferenceTimeout)
    assert error.code == "INFERENCE_TIMEOUT"


def test_deadline_exceeded_is_not_retryable() -> None:
    """The caller's overall deadline is spent, so a retry cannot help."""
    assert DeadlineExceeded("deadline passed").retryable is False
    assert FirstTokenTimeout("slow").retryable is True


def test_error_from_code_keeps_unknown_codes_on_a_host_error() -> None:
    """An unknown string code becomes a HostError that keeps the host's code and text."""
    error = error_from_code("GPU_ON_FIRE", "the gpu is on fire", host="ws://h:1/v1/ws")
    assert type(error) is HostError
    assert error.code == "GPU_ON_FIRE"
    assert error.message == "the gpu is on fire"
    assert error.host == "ws://h:1/v1/ws"
    assert error.retryable is True


@pytest.mark.parametrize("code", [None, "", 5, 5.5, True, [], {}, ["RATE_LIMIT_EXCEEDED"], b"HOST_BUSY", object()])
def test_error_from_code_maps_non_string_codes_to_host_error(code: object) -> None:
    """A missing, empty or non-string code never raises: it becomes HOST_ERROR."""
    error = error_from_code(code, "odd frame")
    assert type(error) is HostError
    assert error.code == "HOST_ERROR"
    assert error.message == "odd frame"


def test_error_from_code_passes_fields_through() -> None:
    """Keyword fields (host, hint, retry_after) reach the built error."""
    error = error_from_code("RATE_LIMIT_EXCEEDED", "slow down", host="h", hint="wait", retry_after=2.5)
    assert isinstance(error, RateLimitExceeded)
    assert (error.host, error.hint, error.retry_after) == ("h", "wait", 2.5)


def test_str_shows_code_host_and_message() -> None:
    """str() carries the code, the host and the message."""
    error = HostBusy("at the concurrent-stream limit", host="ws://h:1/v1/ws")
    assert str(error) == "[HOST_BUSY] host ws://h:1/v1/ws: at the concurrent-stream limit"


def test_str_without_host_omits_it() -> None:
    """str() of an error with no host has just the code and the message."""
    error = ProtocolError("frame is not valid JSON")
    assert str(error) == "[PROTOCOL_ERROR] frame is not valid JSON"
    assert "host" not in str(error)


def test_repr_names_class_code_message_and_host() -> None:
    """repr() names the class and lists code, message and host."""
    text = repr(ConnectionFailed("connection refused", host="ws://h:1/v1/ws"))
    assert text.startswith("ConnectionFailed(")
    for part in ("'CONNECTION_FAILED'", "'connection refused'", "'ws://h:1/v1/ws'"):
        assert part in text


def test_explicit_code_and_retryable_override_class_defaults() -> None:
    """code= and retryable= given to the constructor win over the class attributes."""
    error = HostError("x", code="WEIRD", retryable=False)
    assert (error.code, error.retryable) == ("WEIRD", False)
    assert HostError.code == "HOST_ERROR" and HostError.retryable is True


@pytest.mark.parametrize(
    "error",
    [
        HostError("boom", code="GPU_ON_FIRE", host="ws://h:1/v1/ws", hint="try another host"),
        RateLimitExceeded("slow down", host="ws://h:2/v1/ws", retry_after=1.5),
        EncryptionError("bad nonce", code="INVALID_NONCE_SIZE"),
        ModelNotAvailable("no host serves m", retryable=True),
        InvalidOptions("'top_p' must be a number", field="top_p"),
        InvalidPrompt("'prompt' is empty", field="prompt", host="ws://h:3/v1/ws"),
        FirstTokenTimeout("no first token within 5 s", host="ws://h:4/v1/ws"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_pickling_and_copying_keep_every_field(error: FabstirError) -> None:
    """pickle and copy keep the class, code, retryable, message, host, hint, retry_after and field."""
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
        assert type(clone) is type(error)
        for name in ("code", "retryable", "message", "host", "hint", "retry_after", "args"):
            assert getattr(clone, name) == getattr(error, name), name
        if isinstance(error, InvalidInput):
            assert clone.field == error.field
        assert str(clone) == str(error)
        assert repr(clone) == repr(error)


def test_invalid_prompt_is_a_value_error() -> None:
    """InvalidPrompt (and InvalidOptions) can be caught as ValueError, and carry the culprit field."""
    with pytest.raises(ValueError) as info:
        raise InvalidPrompt("'prompt' is empty", field="prompt")
    assert isinstance(info.value, FabstirError)
    assert info.value.code == "INVALID_PROMPT"
    assert info.value.field == "prompt"
    assert issubclass(InvalidOptions, ValueError)
    assert InvalidPrompt.retryable is False


def test_every_exported_class_is_a_fabstir_error() -> None:
    """All exception classes errors.py exports descend from FabstirError and have a docstring."""
    classes = [getattr(errors, name) for name in errors.__all__ if isinstance(getattr(errors, name), type)]
    assert len(classes) >= 20
    for cls in classes:
        assert issubclass(cls, FabstirError), cls
        assert cls.__doc__, cls


def test_auth_failed_is_not_retryable_but_protocol_error_is() -> None:
    """Bad credentials stay bad; an uninterpretable frame may be a one-off on another host."""
    assert AuthFailed("bad key").retryable is False
    assert ProtocolError("garbled").retryable is True
