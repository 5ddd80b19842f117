"""The SDK facade: pick a network, hold the managers, own their lifecycle.

``FabstirSDK()`` with no arguments runs the embedded default, ``network="local"``: a
:class:`~fabstir_jupyter.local.network.LocalNetwork` (an in-process chain with the registry
deployed, and host processes registered on it: the embedded SmolLM2 model by default, or the
scripted backend), which lives as long as the SDK object and dies with this process however it
ends. Hosts are found on that chain's registry, as in production, plus any static ``hosts=[...]``.

Chain networks read a real registry through its RPC endpoint: ``"base-sepolia"`` (a preset of
:mod:`fabstir_jupyter.networks`) or a dict ``{"rpc_url": ..., "chain_id": ..., "addresses": {...}}``.
There, discovery and probing work but inference is refused until paid sessions exist
(spec/PROTOCOL.md §10). A static host list alone (``hosts=[...]`` or ``FABSTIR_HOSTS``) is
``network="static"``.

Settings come from arguments, then the environment (``FABSTIR_NETWORK``, ``FABSTIR_HOSTS``,
``FABSTIR_RPC_URL``, ``FABSTIR_PRIVATE_KEY``, ``FABSTIR_LOCAL_BACKEND``, ``FABSTIR_LOCAL_HOSTS``),
then ``config.json`` in the user's config dir. Importing this module loads neither web3 nor the
chain: they load when a network needs them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

from . import protocol
from .config import InferenceConfig
from .errors import AuthFailed, ConnectionFailed, InvalidOptions
from .hosts import HostManager, hosts_from_env
from .inference import InferenceManager
from .local import HostProcess
from .networks import NETWORKS as CHAIN_NETWORKS
from .networks import NetworkPreset, resolve_network
from .sessions import SessionManager

if TYPE_CHECKING:
    from .local.network import LocalNetwork

__all__ = ["FabstirSDK", "FabstirSDKCore", "SDKSettings", "NETWORKS", "load_settings"]

logger = logging.getLogger("fabstir_jupyter.sdk")

#: The networks known by name (a chain network may also be given as a dict).
NETWORKS = ("local", "static", *CHAIN_NETWORKS)
LOCAL_BACKENDS = ("llama-cpp", "scripted")

NetworkSpec = Union[str, Mapping[str, Any], NetworkPreset]


@dataclass(frozen=True)
class SDKSettings:
    """Resolved SDK settings (never holds the private key: see :meth:`FabstirSDK.authenticate`).

    ``network`` is a name: ``"local"``, ``"static"``, a preset's, or a custom network's (``chain``
    then says where its registry is).
    """

    network: str = "local"
    hosts: tuple[str, ...] = ()
    rpc_url: str | None = field(default=None, repr=False)  # may carry an API key
    local_backend: str = "llama-cpp"
    local_hosts: int = 1
    local_host_args: tuple[str, ...] = field(default=())
    chain: NetworkPreset | None = None


def _config_file() -> Path:
    from platformdirs import user_config_dir

    return Path(user_config_dir("fabstir-jupyter")) / "config.json"


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidOptions(f"config file {path} is not valid JSON: {exc}", field="config_file") from None
    if not isinstance(stored, dict):
        raise InvalidOptions(f"config file {path} must hold a JSON object", field="config_file")
    return stored


def _stored_hosts(stored: Mapping[str, Any], path: Path) -> list[str]:
    """The config file's ``hosts``: a list of host URLs, each checked."""
    value = stored.get("hosts", [])
    if not isinstance(value, list) or not all(isinstance(url, str) for url in value):
        raise InvalidOptions(f"hosts in config file {path} must be a list of url strings, not {value!r}",
                             field="hosts")
    for url in value:
        try:
            protocol.ws_url(url)
        except InvalidOptions as exc:
            raise InvalidOptions(f"hosts in config file {path}: {exc.message}", field="hosts") from None
    return value


def load_settings(
    network: NetworkSpec | None = None,
    hosts: Sequence[str] | None = None,
    *,
    rpc_url: str | None = None,
    local_backend: str | None = None,
    local_hosts: int | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> SDKSettings:
    """Resolve settings: arguments, then environment, then the user's config file.

    Raises:
        InvalidOptions: an unknown network or local backend, a chain network without an RPC URL
            (and no static hosts), a host URL in ``$FABSTIR_HOSTS`` or the config file that is not
            usable, or an unreadable config file; ``field`` names the setting, the message where
            the bad value came from.
    """
    env = os.environ if environ is None else environ
    path = config_file if config_file is not None else _config_file()
    stored = _read_config(path)

    def pick(arg: Any, env_name: str, key: str, default: Any) -> Any:
        if arg is not None:
            return arg
        if env.get(env_name):
            return env[env_name]
        return stored.get(key, default)

    host_list = list(hosts) if hosts is not None else hosts_from_env(env) or _stored_hosts(stored, path)
    chosen = pick(network, "FABSTIR_NETWORK", "network", None) or ("static" if host_list else "local")
    url = pick(rpc_url, "FABSTIR_RPC_URL", "rpc_url", None)
    chain: NetworkPreset | None = None
    if isinstance(chosen, (Mapping, NetworkPreset)):
        chain = resolve_network(chosen, rpc_url=url)
    elif not isinstance(chosen, str) or chosen not in NETWORKS:
        raise InvalidOptions(
            f"unknown network {chosen!r}; choose one of {', '.join(NETWORKS)}, or pass a dict with "
            "rpc_url, chain_id and addresses",
            field="network",
        )
    elif chosen in CHAIN_NETWORKS:
        chain = resolve_network(chosen, rpc_url=url)
    if chain is not None and not chain.reachable and not host_list:
        raise InvalidOptions(
            f"network {chain.name!r} needs an RPC URL to read its registry: pass rpc_url=..., set "
            f"FABSTIR_RPC_URL, or put \"rpc_url\" in {path}",
            field="rpc_url",
        )
    backend = pick(local_backend, "FABSTIR_LOCAL_BACKEND", "local_backend", "llama-cpp")
    if backend not in LOCAL_BACKENDS:
        raise InvalidOptions(f"unknown local backend {backend!r}; choose {', '.join(LOCAL_BACKENDS)}",
                             field="local_backend")
    count = pick(local_hosts, "FABSTIR_LOCAL_HOSTS", "local_hosts", 1)
    try:
        count = int(count)
    except (TypeError, ValueError):
        raise InvalidOptions(f"local_hosts must be an integer, not {count!r}", field="local_hosts") from None
    if not 1 <= count <= 16:
        raise InvalidOptions("local_hosts must be between 1 and 16", field="local_hosts")
    if chosen == "static" and not host_list:
        raise InvalidOptions("network 'static' needs hosts=[...] or FABSTIR_HOSTS", field="hosts")
    host_args = stored.get("local_host_args", ())
    if not isinstance(host_args, (list, tuple)) or not all(isinstance(a, str) for a in host_args):
        raise InvalidOptions(f"local_host_args in {path} must be a list of strings", field="local_host_args")
    return SDKSettings(
        network=chain.name if chain is not None else chosen,
        hosts=tuple(host_list),
        rpc_url=url,
        local_backend=backend,
        local_hosts=count,
        local_host_args=tuple(host_args),
        chain=chain,
    )


class FabstirSDK:
    """The entry point: a network, its hosts, and the managers that use them.

    Args:
        network: ``"local"`` (default: a local chain and hosts started here), ``"static"``
            (``hosts`` only), ``"base-sepolia"`` (its registry; discovery only for now), or a dict
            ``{"rpc_url": ..., "chain_id": ..., "addresses": {"node_registry": ..., ...}}`` for
            another registry (``"provider"`` instead of ``rpc_url`` takes an in-process web3;
            ``"name"`` names it). On chain networks inference is refused (spec/PROTOCOL.md §10).
        hosts: host URLs, used besides the network's; alone they mean ``network="static"``.
        config: client settings shared by the managers.
        rpc_url: the chain network's JSON-RPC URL (else ``FABSTIR_RPC_URL``, else the config file).
        local_backend: ``"llama-cpp"`` (the embedded model) or ``"scripted"`` for the local network.
        local_hosts: how many local host processes to start.
        usage: where usage records go (default: the ledger of ``config.usage_db``).

    Raises:
        InvalidOptions: bad settings (``field`` names which).
    """

    def __init__(
        self,
        network: NetworkSpec | None = None,
        hosts: Sequence[str] | None = None,
        *,
        config: InferenceConfig | None = None,
        rpc_url: str | None = None,
        local_backend: str | None = None,
        local_hosts: int | None = None,
        usage: Any = None,
    ) -> None:
        self.settings = load_settings(network, hosts, rpc_url=rpc_url, local_backend=local_backend,
                                      local_hosts=local_hosts)
        base = config or InferenceConfig()
        self.config = base.replace(network=self.settings.network)
        self._network: LocalNetwork | None = None
        self._lock = threading.RLock()
        self._account: Any = None
        self._usage = usage
        self._host_manager: HostManager | None = None
        self._inference: InferenceManager | None = None
        self._closed = False
        key = os.environ.get("FABSTIR_PRIVATE_KEY")
        if key:
            self.authenticate(key)

    def __repr__(self) -> str:
        who = f" address={self.address}" if self.address else ""
        return f"<FabstirSDK network={self.settings.network} hosts={len(self.host_urls)}{who}>"

    # ------------------------------------------------------------------ identity

    def authenticate(self, private_key: str) -> str:
        """Use an Ethereum private key for this SDK; return its address. The key is never shown.

        Raises:
            AuthFailed: the key is not a valid secp256k1 private key (the message does not echo it).
        """
        try:
            from eth_account import Account
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise AuthFailed("authenticate() needs eth-account: pip install 'fabstir-jupyter[chain]'") from exc
        try:
            self._account = Account.from_key(private_key)
        except Exception:
            raise AuthFailed("the private key is not valid (expected 32 bytes of hex)") from None
        return self._account.address  # type: ignore[no-any-return]

    @property
    def address(self) -> str | None:
        """The authenticated address, if any."""
        return None if self._account is None else self._account.address

    # ------------------------------------------------------------------ hosts and managers

    @property
    def local_network(self) -> LocalNetwork | None:
        """The local network, once started (``network="local"`` only)."""
        return self._network

    @property
    def _processes(self) -> list[HostProcess]:
        # the local hosts' processes (the notebook layer and its tests look at them)
        return [] if self._network is None else self._network.processes

    @property
    def host_urls(self) -> list[str]:
        """The host URLs known so far: local hosts, static hosts, then hosts found on chain."""
        urls = [] if self._network is None else self._network.urls
        urls += [u for u in self.settings.hosts if u not in urls]
        if self._host_manager is not None and self.settings.chain is not None:
            known = set(urls)
            urls += [h.ws_url for h in self._host_manager.hosts if h.ws_url not in known]
        return urls

    def _start_local_network(self) -> LocalNetwork:
        with self._lock:
            if self._closed:
                raise ConnectionFailed("sdk is closed")
            if self._network is None:
                try:
                    from .local.network import LocalNetwork  # deferred: web3 and py-evm are heavy
                except ImportError as exc:
                    raise InvalidOptions(
                        f"network 'local' needs the local chain, which is not installed (no module {exc.name}): "
                        "install the 'local' extra, pip install 'fabstir-jupyter[local]'",
                        field="network",
                        hint="pip install 'fabstir-jupyter[local]' (add 'host' for the embedded model), "
                             "or use hosts=[...] for hosts you run yourself",
                    ) from exc
                self._network = LocalNetwork(self.settings.local_hosts, self.settings.local_backend,
                                             host_args=self.settings.local_host_args)
            return self._network

    def get_host_manager(self) -> HostManager:
        """The host manager (on ``network="local"`` the first call starts the local network).

        Blocks while the local network starts; from async code ``await sdk.astart()`` first.

        Raises:
            ConnectionFailed: a local host did not start, or the SDK is closed.
            InvalidOptions: ``network="local"`` without the ``local`` extra installed.
        """
        with self._lock:
            if self._closed:
                raise ConnectionFailed("sdk is closed")
            if self._host_manager is None:
                sources = []
                if self.settings.network == "local":
                    sources.append(self._start_local_network().source())
                elif self.settings.chain is not None and self.settings.chain.reachable:
                    sources.append(self.settings.chain.source())
                self._host_manager = HostManager(list(self.settings.hosts), sources=sources, config=self.config)
                if self._network is not None:
                    self._network.supervise(self._host_manager)
            return self._host_manager

    def get_inference_manager(self) -> InferenceManager:
        """The inference manager for this network (refusing inference on chain networks).

        Raises:
            ConnectionFailed: a local host did not start, or the SDK is closed.
        """
        with self._lock:
            if self._closed:
                raise ConnectionFailed("sdk is closed")
            if self._inference is None:
                self._inference = InferenceManager(self.get_host_manager(), self.config, usage=self._usage)
            return self._inference

    @property
    def inference_manager(self) -> InferenceManager | None:
        """The inference manager once :meth:`get_inference_manager` created it, else ``None``.

        Reading it starts nothing (no network, no hosts): use it to look at what already runs.
        """
        return self._inference

    def get_session_manager(self) -> SessionManager:
        """The session manager (shares the inference manager's hosts, pool and usage)."""
        return self.get_inference_manager().sessions

    async def astart(self) -> FabstirSDK:
        """Start the local network (if any) in a worker thread, so the event loop stays free; return self."""
        if self.settings.network == "local":
            await asyncio.to_thread(self.get_host_manager)
        return self

    # ------------------------------------------------------------------ lifecycle

    def _stop_network(self) -> None:
        with self._lock:
            network, self._network = self._network, None
        if network is not None:
            network.stop()

    async def aclose(self) -> None:
        """Close the managers and stop the local network. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._inference is not None:
                await self._inference.aclose()
            elif self._host_manager is not None:
                await self._host_manager.aclose()
        finally:
            await asyncio.to_thread(self._stop_network)

    def close(self) -> None:
        """Blocking :meth:`aclose`, for scripts."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._inference is not None:
                self._inference.close()
        finally:
            self._stop_network()

    async def __aenter__(self) -> FabstirSDK:
        return await self.astart()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __enter__(self) -> FabstirSDK:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


#: The brief's name for the SDK entry point.
FabstirSDKCore = FabstirSDK
