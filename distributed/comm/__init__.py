"""Connections between processes: one ``Comm`` interface, addressed by URI.

``tcp://host:port`` is the only transport; a bare ``host:port`` means tcp.
"""
from .core import Comm, CommClosedError, Listener, connect, listen, parse_address, normalize_address

__all__ = ["Comm", "CommClosedError", "Listener", "connect", "listen", "parse_address",
           "normalize_address"]
