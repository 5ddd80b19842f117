"""The SDK facade: pick a network, hold the managers, own their lifecycle.

``FabstirSDK()`` with no arguments runs the embedded default, ``network="local"``: a
:class:`~fabstir_jupyter.local.network.LocalNetwork` (an in-process chain with the registry
deployed, and host processes registered on it: the embedded SmolLM2 model by default, or the
scripted backend), which lives as long as the SDK object and dies with this process however it
ends. Hosts are found on that chain's registry, as in production, plus any static ``hosts=[...]``.

Chain networks read a real registry through its RPC endpoint: ``"base-sepolia"`` (a preset of
:mod:`fabstir_jupyter.networks`) or a dict ``{"rpc_url": ..., "chain_id": ..., "addresses": {...}}``.
A static host list alone (``hosts=[...]`` or ``FABSTIR_HOSTS``) is ``network="static"``.

Inference on a registered host is paid (spec/PROTOCOL.md §10; :mod:`fabstir_jupyter.payments`):
every request is billed to a job opened from the user's :attr:`FabstirSDK.wallet`, within a
budget. The wallet's key comes from ``FABSTIR_PRIVATE_KEY``, a key file (``key_file=`` or
``FABSTIR_KEY_FILE``, readable by its owner only) or :meth:`FabstirSDK.authenticate`; on the local
network, from its funded test account unless one is given explicitly (``authenticate()`` or
``key_file=``). The budget comes from ``budget=`` or ``FABSTIR_BUDGET`` (whole tokens of the payment
token, USDC by default); the local network's test money has a default budget of
:data:`LOCAL_BUDGET`, a registry network none: without a key and a budget, inference there is
``PAYMENT_REQUIRED`` (saying what to set), while discovery and probing work. The local network's
hosts are paid by default (``paid=False`` or ``FABSTIR_LOCAL_PAID=0`` starts free ones).

Settings come from arguments, then the environment (``FABSTIR_NETWORK``, ``FABSTIR_HOSTS``,
``FABSTIR_RPC_URL``, ``FABSTIR_LOCAL_BACKEND``, ``FABSTIR_LOCAL_HOSTS``, ``FABSTIR_BUDGET``...),
then ``config.json`` in the user's config dir, resolved once by
:func:`fabstir_jupyter.settings.load_settings`; ``FABSTIR_PRIVATE_KEY`` is read here and never
stored or shown. Importing this module loads neither web3 nor the chain: they load when a network
needs them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .config import InferenceConfig
from .errors import ConnectionFailed, InvalidOptions
from .hosts import HostManager
from .inference import InferenceManager
from .local.process import HostProcess
from .sessions import SessionManager
from .settings import NETWORKS, NetworkSpec, SDKSettings, load_settings
from .wallet import Wallet

if TYPE_CHECKING:
    from .local.network import LocalNetwork
    from .networks import NetworkPreset
    from .payments import Payments

__all__ = ["FabstirSDK", "FabstirSDKCore", "SDKSettings", "NETWORKS", "LOCAL_BUDGET", "load_settings"]

logger = logging.getLogger("fabstir_jupyter.sdk")

#: The local network's default budget (its test account holds 10 000 mock USDC): whole tokens.
LOCAL_BUDGET = 1000


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
        budget: the most this SDK may hold in deposits and spend, in whole tokens of the payment
            token (else ``FABSTIR_BUDGET``; the local network defaults to :data:`LOCAL_BUDGET`).
        payment_token: ``"stable"`` (USDC, the default) or ``"native"``.
        key_file: a file holding the wallet's key (else ``FABSTIR_KEY_FILE``); mode 0600.
        paid: whether the local network's hosts are paid (default ``True``).
        payments: finer payment settings (a :class:`~fabstir_jupyter.payments.PaymentConfig`); its
            token and budget yield to ``payment_token`` and ``budget`` when those are set.

    Raises:
        InvalidOptions: bad settings (``field`` names which), or an unusable key file.
        AuthFailed: ``FABSTIR_PRIVATE_KEY`` holds no valid key.
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
        budget: Any = None,
        payment_token: str | None = None,
        key_file: str | None = None,
        paid: bool | None = None,
        payments: Any = None,
    ) -> None:
        self.settings = load_settings(network, hosts, rpc_url=rpc_url, local_backend=local_backend,
                                      local_hosts=local_hosts, budget=budget, payment_token=payment_token,
                                      key_file=key_file, local_paid=paid)
        base = config or InferenceConfig()
        self.config = base.replace(network=self.settings.network)
        self._payment_config = payments
        self._network: LocalNetwork | None = None
        self._lock = threading.RLock()
        self._usage = usage
        self._progress = progress
        self._host_manager: HostManager | None = None
        self._inference: InferenceManager | None = None
        self._closed = False
        # The wallet: authenticate() or a key file given here beat the local network's test account;
        # FABSTIR_PRIVATE_KEY and FABSTIR_KEY_FILE configure registry networks (on the local network
        # a key from elsewhere would hold no test money).
        self._explicit_wallet: Wallet | None = Wallet.from_file(key_file) if key_file else None
        self._configured_wallet: Wallet | None = None
        if self._explicit_wallet is None:
            self._configured_wallet = Wallet.from_environment(key_file=self.settings.key_file)

    def __repr__(self) -> str:
        who = f" address={self.address}" if self.address else ""
        return f"<FabstirSDK network={self.settings.network} hosts={len(self.host_urls)}{who}>"

    # ------------------------------------------------------------------ identity

    def authenticate(self, private_key: str) -> str:
        """Pay (and sign encrypted session inits) with this Ethereum private key; return its address.

        The key is never shown. On the local network it replaces the funded test account: it must
        hold the local chain's test money to pay.

        Raises:
            AuthFailed: the key is not a valid secp256k1 private key (the message does not echo it).
            InvalidOptions: jobs paid by the previous wallet are still open (end them first).
        """
        wallet = Wallet.from_hex(private_key, "authenticate()")
        self._use_wallet(wallet)
        self._explicit_wallet = wallet
        return wallet.address

    def _use_wallet(self, wallet: Wallet) -> None:
        manager = self._inference
        if manager is None:
            return
        if manager.payments is not None:
            if manager.payments.open_jobs:
                raise InvalidOptions("jobs opened by the previous wallet are still open: end the sessions (or close "
                                     "the SDK) before switching wallets", field="private_key")
            manager.payments.use_wallet(wallet)
        else:
            payments = self._make_payments(wallet, manager)
            if payments is not None:
                manager.use_payments(payments)
        manager.use_signer(wallet._key)

    @property
    def wallet(self) -> Wallet | None:
        """The wallet that pays: explicit (``authenticate()``, ``key_file=``), else the local network's
        test account once it runs, else the environment's (``FABSTIR_PRIVATE_KEY``, ``FABSTIR_KEY_FILE``)."""
        if self._explicit_wallet is not None:
            return self._explicit_wallet
        if self.settings.network == "local":
            if self._network is not None and self._network.paid:
                return Wallet(self._network.user_key, "the local network's test account")
            return None
        return self._configured_wallet

    def _signer(self) -> Any:
        """The wallet's key, as the signer of encrypted session inits (``None``: the manager makes its own)."""
        wallet = self.wallet
        return None if wallet is None else wallet._key

    @property
    def address(self) -> str | None:
        """The wallet's address, if there is a wallet (on the local network: once it runs)."""
        wallet = self.wallet
        return None if wallet is None else wallet.address

    @property
    def payments(self) -> Payments | None:
        """The inference manager's payments once it exists (``None`` on unpaid networks); starts nothing."""
        return None if self._inference is None else self._inference.payments

    def _chain_network(self) -> NetworkPreset | None:
        """The chain network payments use: the local network's chain, or the registry network's."""
        if self.settings.network == "local":
            if self._network is None or not self._network.paid:
                return None
            from .networks import ADDRESS_KEYS, NetworkPreset

            addresses = {k: v for k, v in self._network.addresses.items() if k in ADDRESS_KEYS}
            return NetworkPreset(name="local", chain_id=self._network.chain_id, addresses=addresses,
                                 rpc_url=self._network.rpc_url)
        return self.settings.chain

    def _make_payments(self, wallet: Wallet | None, manager: InferenceManager) -> Payments | None:
        """Payments for ``wallet`` on this network, or ``None`` when the network is unpaid or a key or a
        budget is missing (inference on a registry network then says what to set)."""
        network = self._chain_network()
        if network is None or wallet is None:
            return None
        local = self.settings.network == "local"
        budget = self.settings.budget if self.settings.budget is not None else (LOCAL_BUDGET if local else None)
        if budget is None:
            return None
        from .payments import PaymentConfig, Payments

        base = self._payment_config or PaymentConfig()
        token = self.settings.payment_token if self.settings.sources.get("payment_token") != "default" else base.token
        config = dataclasses.replace(base, token=token, budget=budget)
        return Payments(wallet, network, config, usage=manager.usage, local=local)

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
                                             host_args=self.settings.local_host_args, paid=self.settings.local_paid,
                                             progress=self._progress)
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
        """The inference manager for this network; on a paid network it pays from :attr:`wallet`
        (``manager.payments``), on a registry network without a key or a budget it refuses inference.

        Raises:
            ConnectionFailed: a local host did not start, or the SDK is closed.
        """
        with self._lock:
            if self._closed:
                raise ConnectionFailed("sdk is closed")
            if self._inference is None:
                host_manager = self.get_host_manager()
                manager = InferenceManager(host_manager, self.config, usage=self._usage, signer=self._signer())
                payments = self._make_payments(self.wallet, manager)
                if payments is not None:
                    manager.use_payments(payments)
                self._inference = manager
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
