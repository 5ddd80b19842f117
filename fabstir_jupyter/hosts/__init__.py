"""Hosts: what the client knows about them, where they come from, and which one to use."""

from .discovery import DiscoverySource, HostManager, StaticSource, hosts_from_env
from .info import HostInfo, HostKey, resolve_model
from .keys import HostKeys
from .probe import HostProber
from .selection import eligible_hosts, score_host, select_host

__all__ = [
    "DiscoverySource",
    "HostInfo",
    "HostKey",
    "HostKeys",
    "HostManager",
    "HostProber",
    "StaticSource",
    "eligible_hosts",
    "hosts_from_env",
    "resolve_model",
    "score_host",
    "select_host",
]
