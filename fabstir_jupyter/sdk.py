"""The SDK facade: pick a network, hold the managers, own their lifecycle.

``FabstirSDK()`` with no arguments runs the embedded default, ``network="local"``: host processes
started on this machine (the embedded SmolLM2 model by default, or the scripted backend), which
live as long as the SDK object (and die with this process, however it ends). A static host list
(``hosts=[...]`` or ``FABSTIR_HOSTS``) uses those hosts instead. On ``base-sepolia`` discovery and
probing work but inference is refused until paid sessions exist (spec/PROTOCOL.md §10).

Settings come from arguments, then the environment (``FABSTIR_NETWORK``, ``FABSTIR_HOSTS``,
``FABSTIR_RPC_URL``, ``FABSTIR_PRIVATE_KEY``, ``FABSTIR_LOCAL_BACKEND``, ``FABSTIR_LOCAL_HOSTS``),
then ``config.json`` in the user's config dir.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import InferenceConfig
from .errors import AuthFailed, InvalidOptions
from .hosts import HostManager, hosts_from_env
from .inference import InferenceManager
from .local import HostProcess
from .sessions import SessionManager

__all__ = ["FabstirSDK", "FabstirSDKCore", "SDKSettings", "NETWORKS", "load_settings"]

logger = logging.getLogger("fabstir_jupyter.sdk")

NETWORKS = ("local", "static", "base-sepolia")
LOCAL_BACKENDS = ("llama-cpp", "scripted")


@dataclass(frozen=True)
class SDKSettings:
    """Resolved SDK settings (never holds the private key: see :meth:`FabstirSDK.authenticate`)."""

    network: str = "local"
    hosts: tuple[str, ...] = ()
    rpc_url: str | None = None
    local_backend: str = "llama-cpp"
    local_hosts: int = 1
    local_host_args: tuple[str, ...] = field(default=())


def _config_file() -> Path:
    from platformdirs import user_config_dir

    return Path(user_config_dir("fabstir-jupyter")) / "config.json"


def load_settings(
    network: str | None = None,
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
        InvalidOptions: an unknown network or local backend, or an unreadable config file.
    """
    env = os.environ if environ is None else environ
    path = config_file if config_file is not None else _config_file()
    stored: dict[str, Any] = {}
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidOptions(f"config file {path} is not valid JSON: {exc}", field="config_file") from None
        if not isinstance(stored, dict):
            raise InvalidOptions(f"config file {path} must hold a JSON object", field="config_file")

    def pick(arg: Any, env_name: str, key: str, default: Any) -> Any:
        if arg is not None:
            return arg
        if env.get(env_name):
            return env[env_name]
        return stored.get(key, default)

    host_list = list(hosts) if hosts is not None else hosts_from_env(dict(env)) or list(stored.get("hosts", []))
    chosen = pick(network, "FABSTIR_NETWORK", "network", None) or ("static" if host_list else "local")
    if chosen not in NETWORKS:
        raise InvalidOptions(f"unknown network {chosen!r}; choose one of {', '.join(NETWORKS)}", field="network")
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
    return SDKSettings(
        network=chosen,
        hosts=tuple(host_list),
        rpc_url=pick(rpc_url, "FABSTIR_RPC_URL", "rpc_url", None),
        local_backend=backend,
        local_hosts=count,
    )


class FabstirSDK:
    """The entry point: a network, its hosts, and the managers that use them.

    Args:
        network: ``"local"`` (default: hosts started here), ``"static"`` (``hosts``), or
            ``"base-sepolia"`` (discovery only for now).
        hosts: host URLs; implies ``network="static"`` when no network is given.
        config: client settings shared by the managers.
        local_backend: ``"llama-cpp"`` (the embedded model) or ``"scripted"`` for the local network.
        local_hosts: how many local host processes to start.
    """

    def __init__(
        self,
        network: str | None = None,
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
        self._processes: list[HostProcess] = []
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
    def host_urls(self) -> list[str]:
        """The static or local host URLs known so far."""
        if self.settings.network == "local":
            return [p.url for p in self._processes if p.url]
        return list(self.settings.hosts)

    def _start_local_hosts(self) -> list[str]:
        while len(self._processes) < self.settings.local_hosts:
            process = HostProcess(self.settings.local_backend, self.settings.local_host_args)
            self._processes.append(process)
            process.start()
        return self.host_urls

    def get_host_manager(self) -> HostManager:
        """The host manager (starting the local hosts on first use of ``network="local"``)."""
        if self._host_manager is None:
            urls = self._start_local_hosts() if self.settings.network == "local" else self.host_urls
            self._host_manager = HostManager(urls, config=self.config)
        return self._host_manager

    def get_inference_manager(self) -> InferenceManager:
        """The inference manager for this network."""
        if self._inference is None:
            self._inference = InferenceManager(self.get_host_manager(), self.config, usage=self._usage)
        return self._inference

    def get_session_manager(self) -> SessionManager:
        """The session manager (shares the inference manager's hosts, pool and usage)."""
        return self.get_inference_manager().sessions

    # ------------------------------------------------------------------ lifecycle

    def _stop_processes(self) -> None:
        for process in self._processes:
            process.stop()
        self._processes.clear()

    async def aclose(self) -> None:
        """Close the managers and stop local hosts. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._inference is not None:
            await self._inference.aclose()
        elif self._host_manager is not None:
            await self._host_manager.aclose()
        self._stop_processes()

    def close(self) -> None:
        """Blocking :meth:`aclose`, for scripts."""
        if self._closed:
            return
        self._closed = True
        if self._inference is not None:
            self._inference.close()
        self._stop_processes()

    async def __aenter__(self) -> FabstirSDK:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __enter__(self) -> FabstirSDK:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


#: The brief's name for the SDK entry point.
FabstirSDKCore = FabstirSDK
