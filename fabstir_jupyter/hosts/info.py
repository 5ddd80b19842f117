"""What the client knows about one host: identity, offer, and measured behaviour."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import protocol
from ..errors import FabstirError, HostBusy, ModelNotAvailable

if TYPE_CHECKING:
    from ..crypto import PublicKey

__all__ = ["HostInfo", "HostKey", "resolve_model"]

# What to send as ``model`` to a host that lists no models when the caller named none.
UNLISTED_DEFAULT_MODEL = "default"

# Weight of the newest latency sample in the moving average.
_LATENCY_SMOOTHING = 0.3


@dataclass(frozen=True)
class HostKey:
    """What the client knows of one host's encryption key.

    Attributes:
        public_key: the key to encrypt to (it derives the host's registered address), or ``None``.
        source: ``"metadata"`` (published) or ``"registration"`` (recovered from a transaction the
            host signed) when there is a key.
        problem: why there is no usable key, ``None`` when there is one: a lower-case verb phrase
            about the host ("publishes no publicKey").
        suspicious: the host publishes a key that is not its own (or a malformed one): refuse it.
        checked_at: ``time.monotonic()`` when this was found out.
    """

    public_key: PublicKey | None
    source: str | None = None
    problem: str | None = None
    suspicious: bool = False
    checked_at: float = 0.0

    @property
    def usable(self) -> bool:
        """Whether there is a checked key to encrypt to."""
        return self.public_key is not None


@dataclass(eq=False)
class HostInfo:
    """A host as discovered, probed and used.

    Identity and offer come from discovery (a static URL, later the chain registry); ``latency_ms``,
    ``health``, ``features`` and the request counters are measured by probes and by every real
    request. Prices are per model: ``{model_id: {"native": int, "stable": int}}`` in raw units with
    the registry's precision factor of 1000.

    ``health`` is ``"unknown"`` (not probed), ``"ok"``, ``"busy"`` (alive, but refused the last
    connection with ``HOST_BUSY``: still selectable, after the others) or ``"unreachable"``.
    ``last_error`` keeps why the last probe or request to the host failed (``None`` after a success),
    so "no host is usable" can say, per host, why. ``encryption_key`` caches what
    :class:`~fabstir_jupyter.hosts.keys.HostKeys` found out about the host's encryption key
    (``None`` until it was first needed). ``overbilled_tokens`` counts the tokens this host proved on
    settled jobs beyond what its own reports of the answers imply (:mod:`fabstir_jupyter.payments`):
    such a host is chosen only when no other fits.
    """

    api_url: str
    address: str | None = None
    models: tuple[str, ...] = ()
    model_names: dict[str, str] = field(default_factory=dict)  # alias → host model id
    region: str | None = None
    stake: float | None = None
    prices: dict[str, dict[str, int]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None
    health: str = "unknown"  # unknown | ok | busy | unreachable
    features: frozenset[str] = frozenset()
    version: str | None = None
    context_window: int | None = None
    max_concurrent_streams: int | None = None  # as the host states it (``/v1/version``)
    requests: int = 0
    failures: int = 0
    overbilled_tokens: int = 0
    last_error: FabstirError | None = field(default=None, repr=False)
    encryption_key: HostKey | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.ws_url = protocol.ws_url(self.api_url)
        self.api_url = protocol.http_url(self.api_url)

    @classmethod
    def from_url(cls, url: str, **fields: Any) -> HostInfo:
        """Build a host from any URL form (``http(s)://``, ``ws(s)://…/v1/ws``, ``host:port``)."""
        return cls(api_url=url, **fields)

    @property
    def key(self) -> str:
        """The identity used to deduplicate hosts: the registry address, else the WebSocket URL."""
        return (self.address or self.ws_url).lower()

    @property
    def success_rate(self) -> float | None:
        """Share of real requests that succeeded, ``None`` before the first one."""
        return None if self.requests == 0 else (self.requests - self.failures) / self.requests

    @property
    def stream_capacity(self) -> int | None:
        """Streams the host runs at once (more get ``HOST_BUSY``), ``None`` when nothing says.

        The host's own figure (``max_concurrent_streams`` in ``/v1/version``) wins over what its
        registry metadata advertises (``maxConcurrent``); only a positive integer counts.
        """
        for figure in (self.max_concurrent_streams, self.metadata.get("maxConcurrent")):
            if _positive_int(figure):
                return figure
        return None

    @property
    def reachable(self) -> bool:
        return self.health != "unreachable"

    def record_latency(self, seconds: float) -> None:
        """Fold one measured latency into the moving average."""
        sample = seconds * 1000.0
        self.latency_ms = sample if self.latency_ms is None else (
            (1 - _LATENCY_SMOOTHING) * self.latency_ms + _LATENCY_SMOOTHING * sample
        )

    def record_request(self, ok: bool, *, reachable: bool | None = True, error: FabstirError | None = None) -> None:
        """Count one real request; a failed connection marks the host unreachable until it answers again.

        ``reachable=None`` (a connection that broke mid-way) leaves the health as it was. ``error``
        (why a failed request failed) becomes :attr:`last_error`; a ``HostBusy`` error marks the host
        ``"busy"``.
        """
        self.requests += 1
        if not ok:
            self.failures += 1
        if reachable is not None:
            self.health = "ok" if reachable else "unreachable"
        if ok or error is not None:
            self.record_error(error if not ok else None)

    def record_error(self, error: FabstirError | None) -> None:
        """Keep ``error`` as :attr:`last_error` (``None`` clears it); ``HostBusy`` marks the host busy.

        A copy is kept, without the traceback and foreign cause, so a host record holds no frames
        or sockets alive.
        """
        self.last_error = None if error is None else copy.copy(error)
        if isinstance(error, HostBusy):
            self.health = "busy"

    def adopt_served_models(self, ids: list[str], names: dict[str, str]) -> None:
        """Take the model ids the host itself lists (``/v1/models``), keeping registry names working.

        A registry model the host serves under another id (same file name, or the host's only
        model) becomes an alias of that id, and its prices move to it; the host's own names become
        aliases too.
        """
        registry, old_aliases = list(self.models), dict(self.model_names)
        self.models = tuple(ids)
        self.model_names.update(names)
        for name in registry:
            if name in ids:
                continue
            matches = [i for i in ids if _normalised(i) == _normalised(name)]
            target = matches[0] if len(matches) == 1 else (ids[0] if len(ids) == 1 else None)
            if target is None:
                continue  # never alias one model to another by guess
            self.model_names[name] = target
            self.model_names.update({alias: target for alias, model in old_aliases.items() if model == name})
            if name in self.prices and target not in self.prices:
                self.prices[target] = self.prices.pop(name)

    def cost(self, model: str, tokens: int) -> tuple[float | None, str | None]:
        """Return ``(cost, unit)`` of ``tokens`` of ``model`` at this host's price, or ``(None, None)``.

        Prices carry a precision factor of 1000 (spec/PROTOCOL.md §8): the stable price is in USDC
        units (6 decimals), the native one in wei. The stable price wins when both are set.
        """
        price = self.prices.get(model) or {}
        if price.get("stable"):
            return tokens * price["stable"] / 1000 / 1e6, "USDC"
        if price.get("native"):
            return tokens * price["native"] / 1000 / 1e18, "ETH"
        return None, None

    def __repr__(self) -> str:
        who = self.address or self.api_url
        latency = "?" if self.latency_ms is None else f"{self.latency_ms:.0f} ms"
        return f"<HostInfo {who} models={list(self.models)} {self.health} {latency}>"


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _file_part(name: str) -> str:
    for sep in (":", "/"):
        if sep in name:
            name = name.rsplit(sep, 1)[1]
    return name


def _normalised(name: str) -> str:
    return _file_part(name).lower().removesuffix(".gguf")


def resolve_model(name: str | None, host: HostInfo, default: str | None = None) -> str:
    """Return the host's own id for a model name (spec/PROTOCOL.md §3a).

    ``name`` may be the host id, an alias the host lists, ``repo/file`` or ``repo:file`` whose file
    part the host serves. With no name, ``default`` is used, else the host's first model. A host
    that lists no models gets the name as given, or ``"default"`` when there is none (production
    hosts serve their default model for an id they do not know).

    Raises:
        ModelNotAvailable: the host lists models and none matches; the message lists them.
    """
    wanted = name or default
    if not host.models:
        return wanted or UNLISTED_DEFAULT_MODEL
    if wanted is None:
        return host.models[0]
    lowered = {m.lower(): m for m in host.models}
    aliases = {alias.lower(): model for alias, model in host.model_names.items()}
    for candidate in (wanted, _file_part(wanted), _file_part(wanted).removesuffix(".gguf")):
        key = candidate.lower()
        if key in lowered:
            return lowered[key]
        if key in aliases:
            return aliases[key]
    raise ModelNotAvailable(
        f"model {wanted!r} is not served; available: {', '.join(host.models)}", host=host.api_url
    )
