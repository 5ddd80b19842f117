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
``FABSTIR_RPC_URL``, ``FABSTIR_LOCAL_BACKEND``, ``FABSTIR_LOCAL_HOSTS``), then ``config.json`` in
the user's config dir, resolved once by :func:`fabstir_jupyter.settings.load_settings`;
``FABSTIR_PRIVATE_KEY`` is read here, for :meth:`FabstirSDK.authenticate`, and never stored.
Importing this module loads neither web3 nor the chain: they load when a network needs them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .config import InferenceConfig
from .errors import AuthFailed, ConnectionFailed, InvalidOptions
from .hosts import HostManager
from .inference import InferenceManager
from .local import HostProcess
from .sessions import SessionManager
from .settings import NETWORKS, NetworkSpec, SDKSettings, load_settings

if TYPE_CHECKING:
    from .local.network import LocalNetwork

__all__ = ["FabstirSDK", "FabstirSDKCore", "SDKSettings", "NETWORKS", "load_settings"]

logger = logging.getLogger("fabstir_jupyter.sdk")


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
        progress: called with a short description of each step while the local network starts
            ("starting the local chain and 1 host", "starting host 1/1 (loading MODEL)"...), from
            the thread that starts it (see :class:`~fabstir_jupyter.local.network.LocalNetwork`).

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
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = load_settings(network, hosts, rpc_url=rpc_url, local_backend=local_backend,
                                      local_hosts=local_hosts)
        base = config or InferenceConfig()
        self.config = base.replace(network=self.settings.network)
        self._network: LocalNetwork | None = None
        self._lock = threading.RLock()
        self._account: Any = None
        self._usage = usage
        self._progress = progress
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
        if self._inference is not None:
            self._inference.use_signer(self._signer())
        return self._account.address  # type: ignore[no-any-return]

    def _signer(self) -> Any:
        """The authenticated key as the signer of encrypted session inits (``None``: the manager makes its own)."""
        if self._account is None:
            return None
        try:
            from .crypto import PrivateKey
        except ImportError:  # pragma: no cover - the crypto extra comes with eth-account's
            return None
        return PrivateKey.from_bytes(bytes(self._account.key))

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
                                             host_args=self.settings.local_host_args, progress=self._progress)
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
                    from .hosts.registry import ChainRegistrySource  # deferred: web3 and eth-abi are heavy

                    sources.append(ChainRegistrySource.for_network(self.settings.chain))
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
                self._inference = InferenceManager(self.get_host_manager(), self.config, usage=self._usage,
                                                   signer=self._signer())
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
