"""Is a Ray cluster address reachable? Checked before any work (and without importing Ray): an
unreachable address used to cost a created store and a minute of GCS retries."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from gig_dist.settings import ConfigError


def check_reachable(address: str | None, timeout: float = 3.0) -> None:
    """Raise :class:`ConfigError` when nothing answers at ``host:port`` (or ``ray://host:port``).
    ``None`` and ``auto`` (a local or job cluster Ray finds itself) are not checked."""
    if address is None or address == "auto" or address == "local":
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise ConfigError(f"runtime.address = {address!r} is not host:port (e.g. 127.0.0.1:6379), ray://host:port or auto")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"runtime.address = {address}: no Ray cluster answers there ({reason}); start it, "
                          "or fix the address") from None
