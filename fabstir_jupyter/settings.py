"""Settings: one resolver for every setting, recording where each value came from.

Each setting (:data:`SETTINGS`) is looked up in these layers, the first that has it winning:

1. explicit values: the SDK's arguments, or the notebook's ``%config`` (the caller names the layer);
2. the environment (``FABSTIR_NETWORK``, ``FABSTIR_HOSTS``...);
3. the user's config file, ``config.json`` in the user config directory (:func:`config_file_path`);
4. the default.

:func:`load_settings` reads them once, validates every value in one place, and returns an
:class:`SDKSettings` whose ``sources`` say where each value came from; a bad value is refused with an
:class:`~fabstir_jupyter.errors.InvalidOptions` naming its setting and its source
(``max_tokens from $FABSTIR_MAX_TOKENS must be ...``). Nothing here does I/O beyond reading that
file, and nothing imports web3.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeAlias
from urllib.parse import urlsplit

from .config import validate_usage_db
from .errors import InvalidOptions
from .networks import NETWORKS as CHAIN_NETWORKS, NetworkPreset, resolve_network
from .urls import ws_url

__all__ = [
    "NETWORKS",
    "LOCAL_BACKENDS",
    "SETTINGS",
    "Setting",
    "SDKSettings",
    "SettingsSources",
    "config_file_path",
    "hosts_from_env",
    "load_settings",
]

#: The networks known by name (a chain network may also be given as a dict).
NETWORKS = ("local", "static", *CHAIN_NETWORKS)
#: The backends the local network's host processes can run.
LOCAL_BACKENDS = ("llama-cpp", "scripted")

NetworkSpec: TypeAlias = str | Mapping[str, Any] | NetworkPreset


@dataclass(frozen=True)
class Setting:
    """One setting: its name (also its key in the config file), environment variable and default."""

    name: str
    env: str | None
    default: Any = None


#: Every setting the resolver knows.
SETTINGS: tuple[Setting, ...] = (
    Setting("network", "FABSTIR_NETWORK"),
    Setting("hosts", "FABSTIR_HOSTS", ()),
    Setting("rpc_url", "FABSTIR_RPC_URL"),
    Setting("local_backend", "FABSTIR_LOCAL_BACKEND", "llama-cpp"),
    Setting("local_hosts", "FABSTIR_LOCAL_HOSTS", 1),
    Setting("local_host_args", None, ()),  # the config file only
    Setting("default_model", "FABSTIR_DEFAULT_MODEL"),
    Setting("max_tokens", "FABSTIR_MAX_TOKENS"),
    Setting("usage_db", "FABSTIR_USAGE_DB"),
    # paid sessions (spec/PROTOCOL.md §10); the key itself is read by the SDK from FABSTIR_PRIVATE_KEY
    Setting("budget", "FABSTIR_BUDGET"),
    Setting("payment_token", "FABSTIR_PAYMENT_TOKEN", "stable"),
    Setting("key_file", "FABSTIR_KEY_FILE"),
    Setting("local_paid", "FABSTIR_LOCAL_PAID", True),
)
_BY_NAME = {s.name: s for s in SETTINGS}


def config_file_path() -> Path:
    """The user's config file: ``config.json`` in the user config directory (``$XDG_CONFIG_HOME``...)."""
    from platformdirs import user_config_dir

    return Path(user_config_dir("fabstir-jupyter")) / "config.json"


def hosts_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """Read ``FABSTIR_HOSTS`` (comma- or whitespace-separated URLs).

    Each entry must be a host URL with a scheme (``http://h:1``, ``wss://h``...) or a bare
    ``host:port``: a word with neither is taken for a piece of a mistyped value, not for a host on
    port 80.

    Raises:
        InvalidOptions: an entry is not a usable host URL; the message names ``$FABSTIR_HOSTS``,
            the entry and the whole value (``field="hosts"``).
    """
    raw = (environ if environ is not None else os.environ).get("FABSTIR_HOSTS", "")
    entries = [part for part in raw.replace(",", " ").split() if part]
    for entry in entries:
        try:
            ws_url(entry)
            if "://" not in entry and urlsplit("ws://" + entry).port is None:
                raise InvalidOptions(f"host url {entry!r} has neither a scheme nor a port", field="host_url")
        except InvalidOptions as exc:
            raise InvalidOptions(
                f"$FABSTIR_HOSTS: {exc.message}; the whole value is {raw.strip()[:200]!r}",
                field="hosts",
                hint="FABSTIR_HOSTS holds host urls separated by commas or spaces, "
                     "e.g. http://127.0.0.1:8080,wss://host.example",
            ) from None
    return entries


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, (list, tuple)) and not value)


class SettingsSources:
    """The layers settings are read from, unvalidated: explicit values, environment, config file.

    Args:
        explicit: values set by the caller; ``None`` counts as not set.
        explicit_source: what to call that layer in messages (``"argument"``, ``"%config"``).
        environ: the environment (default ``os.environ``).
        config_file: the config file (default :func:`config_file_path`); read once, on first use.
    """

    def __init__(self, explicit: Mapping[str, Any] | None = None, *, explicit_source: str = "argument",
                 environ: Mapping[str, str] | None = None, config_file: Path | None = None) -> None:
        self.explicit = {k: v for k, v in (explicit or {}).items() if v is not None}
        self.explicit_source = explicit_source
        self.environ = os.environ if environ is None else environ
        self.path = config_file if config_file is not None else config_file_path()
        self._stored: dict[str, Any] | None = None

    @property
    def stored(self) -> dict[str, Any]:
        """The config file's contents (``{}`` when there is none).

        Raises:
            InvalidOptions: the file is not JSON, or not a JSON object; the message names it.
        """
        if self._stored is None:
            self._stored = _read_config(self.path)
        return self._stored

    def lookup(self, name: str) -> tuple[Any, str]:
        """Return the winning value of setting ``name`` and its source: the explicit layer's name,
        ``$VARIABLE``, ``config file`` or ``default``.

        A blank value in the config file counts as set for ``usage_db``, so that its mistake is
        reported rather than silently replaced by the default.
        """
        setting = _BY_NAME[name]
        if name in self.explicit:
            return self.explicit[name], self.explicit_source
        if setting.env is not None and self.environ.get(setting.env, "").strip():
            return self.environ[setting.env], f"${setting.env}"
        stored = self.stored.get(name)
        if not _unset(stored) or (name == "usage_db" and stored is not None):
            return stored, "config file"
        return setting.default, "default"

    def where(self, source: str) -> str:
        """The source as a message says it (the config file with its path)."""
        return f"config file {self.path}" if source == "config file" else source


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


@dataclass(frozen=True)
class SDKSettings:
    """Resolved settings (never the private key: see :meth:`FabstirSDK.authenticate`).

    ``network`` is a name: ``"local"``, ``"static"``, a preset's, or a custom network's (``chain``
    then says where its registry is). ``default_model``, ``max_tokens`` and ``usage_db`` are request
    and ledger defaults that the notebook applies; ``None`` means "the package default".
    ``budget`` (whole tokens of ``payment_token``: ``"stable"``, i.e. USDC, or ``"native"``) and
    ``key_file`` (a file holding the wallet's key) configure paid sessions; ``local_paid`` makes
    the local network's hosts paid (the default) or free. ``sources`` maps each setting to where
    its value came from.
    """

    network: str = "local"
    hosts: tuple[str, ...] = ()
    rpc_url: str | None = field(default=None, repr=False)  # may carry an API key
    local_backend: str = "llama-cpp"
    local_hosts: int = 1
    local_host_args: tuple[str, ...] = field(default=())
    chain: NetworkPreset | None = None
    default_model: str | None = None
    max_tokens: int | None = None
    usage_db: str | None = None
    budget: Decimal | None = None
    payment_token: str = "stable"
    key_file: str | None = None
    local_paid: bool = True
    sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), compare=False, repr=False)


def load_settings(
    network: NetworkSpec | None = None,
    hosts: Sequence[str] | None = None,
    *,
    rpc_url: str | None = None,
    local_backend: str | None = None,
    local_hosts: int | None = None,
    default_model: str | None = None,
    max_tokens: int | None = None,
    usage_db: str | None = None,
    budget: Any = None,
    payment_token: str | None = None,
    key_file: str | None = None,
    local_paid: bool | None = None,
    source: str = "argument",
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> SDKSettings:
    """Resolve every setting: the given values (the ``source`` layer), then the environment, then the
    config file, then the defaults; validate each once.

    Raises:
        InvalidOptions: an unknown network or local backend, a chain network without an RPC URL
            (and no static hosts), a host URL in ``$FABSTIR_HOSTS`` or the config file that is not
            usable, a bad ``max_tokens``, ``usage_db`` or ``default_model``, or an unreadable config
            file; ``field`` names the setting, the message where the bad value came from.
    """
    explicit = {
        "network": network, "hosts": None if hosts is None else tuple(hosts), "rpc_url": rpc_url,
        "local_backend": local_backend, "local_hosts": local_hosts, "default_model": default_model,
        "max_tokens": max_tokens, "usage_db": usage_db, "budget": budget, "payment_token": payment_token,
        "key_file": key_file, "local_paid": local_paid,
    }
    layers = SettingsSources(explicit, explicit_source=source, environ=environ, config_file=config_file)
    sources: dict[str, str] = {}

    def pick(name: str) -> Any:
        value, sources[name] = layers.lookup(name)
        return value

    host_list = _hosts(pick("hosts"), sources["hosts"], layers)
    chosen = pick("network")
    if chosen is None:
        chosen, sources["network"] = ("static" if host_list else "local"), "default"
    url = pick("rpc_url")
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
            f"FABSTIR_RPC_URL, or put \"rpc_url\" in {layers.path}",
            field="rpc_url",
        )
    if chosen == "static" and not host_list:
        raise InvalidOptions("network 'static' needs hosts=[...] or FABSTIR_HOSTS", field="hosts")
    backend = pick("local_backend")
    if backend not in LOCAL_BACKENDS:
        raise InvalidOptions(f"unknown local backend {backend!r}; choose {', '.join(LOCAL_BACKENDS)}",
                             field="local_backend")
    count = pick("local_hosts")
    try:
        count = int(count)
    except (TypeError, ValueError):
        raise InvalidOptions(f"local_hosts must be an integer, not {count!r}", field="local_hosts") from None
    if not 1 <= count <= 16:
        raise InvalidOptions("local_hosts must be between 1 and 16", field="local_hosts")
    host_args = pick("local_host_args")
    if not isinstance(host_args, (list, tuple)) or not all(isinstance(a, str) for a in host_args):
        raise InvalidOptions(f"local_host_args in {layers.path} must be a list of strings", field="local_host_args")
    model = pick("default_model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise InvalidOptions(f"default_model from {layers.where(sources['default_model'])} must be a model name, "
                             f"not {model!r}", field="default_model")
    return SDKSettings(
        network=chain.name if chain is not None else chosen,
        hosts=tuple(host_list),
        rpc_url=url,
        local_backend=backend,
        local_hosts=count,
        local_host_args=tuple(host_args),
        chain=chain,
        default_model=model,
        max_tokens=_max_tokens(pick("max_tokens"), layers.where(sources["max_tokens"])),
        usage_db=validate_usage_db(pick("usage_db"), layers.where(sources["usage_db"])),
        budget=_budget(pick("budget"), layers.where(sources["budget"])),
        payment_token=_payment_token(pick("payment_token"), layers.where(sources["payment_token"])),
        key_file=_key_file(pick("key_file"), layers.where(sources["key_file"])),
        local_paid=_flag(pick("local_paid"), "local_paid", layers.where(sources["local_paid"])),
        sources=MappingProxyType(sources),
    )


def _budget(value: Any, where: str) -> Decimal | None:
    """``budget`` as a setting: ``None`` or an amount above 0 (whole tokens)."""
    if value is None:
        return None
    try:
        amount = Decimal(str(value).strip()) if not isinstance(value, bool) else Decimal("nan")
    except InvalidOperation:
        amount = Decimal("nan")
    if not amount.is_finite() or amount <= 0:
        raise InvalidOptions(f"budget from {where} must be an amount above 0 (whole tokens), not {value!r}",
                             field="budget")
    return amount


def _payment_token(value: Any, where: str) -> str:
    token = {"usdc": "stable", "eth": "native"}.get(str(value).strip().lower(), str(value).strip().lower())
    if token not in ("stable", "native"):
        raise InvalidOptions(f"payment_token from {where} must be 'stable' (USDC) or 'native', not {value!r}",
                             field="payment_token")
    return token


def _key_file(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidOptions(f"key_file from {where} must be a file path", field="key_file")
    return os.path.expanduser(value.strip())


def _flag(value: Any, name: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InvalidOptions(f"{name} from {where} must be true or false, not {value!r}", field=name)


def _hosts(value: Any, source: str, layers: SettingsSources) -> list[str]:
    """The host list from its layer: the environment's is parsed, the config file's checked."""
    if source.startswith("$"):
        return hosts_from_env(layers.environ)
    if source != "config file":
        return list(value)
    if not isinstance(value, list) or not all(isinstance(url, str) for url in value):
        raise InvalidOptions(f"hosts in config file {layers.path} must be a list of url strings, not {value!r}",
                             field="hosts")
    for url in value:
        try:
            ws_url(url)
        except InvalidOptions as exc:
            raise InvalidOptions(f"hosts in config file {layers.path}: {exc.message}", field="hosts") from None
    return value


def _max_tokens(value: Any, where: str) -> int | None:
    """``max_tokens`` as a setting: ``None`` (the package default) or an integer >= 1."""
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1:
        raise InvalidOptions(f"max_tokens from {where} must be an integer >= 1, not {value!r}", field="max_tokens")
    return number
