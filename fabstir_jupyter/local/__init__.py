"""The embedded default: host processes (and, later, a local chain) started on this machine."""

from .process import HostProcess

__all__ = ["HostProcess"]
