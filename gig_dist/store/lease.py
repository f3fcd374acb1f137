"""One driver per run: a lease on the store, on local disks and fsspec stores alike.

The lease is one small JSON object, ``gig-dist.lease``, beside the store's ``zarr.json``: the
owner's host and pid, a token, when it started, and a heartbeat the owner refreshes every
``HEARTBEAT_S`` seconds from a daemon thread. A second driver finds it and refuses, naming the
owner. A lease is stale, and may be taken over (saying so), when its heartbeat is older than
``STALE_AFTER_S``, or at once when it names a process of this host that no longer exists (a
killed run). The same process may take its own lease again. Ray actors of a run write under the
driver's lease: they never take one.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
import warnings
from typing import Any

from gig_dist.store.core import LEASE_KEY, StoreError, _fs

HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """The lease this process holds on the store at ``url``; :meth:`release` gives it back."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, root = _fs(url)
        self.path = f"{root}/{LEASE_KEY}"
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                       "started": time.time(), "heartbeat": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, url: str) -> Lease:
        """Take the lease, or raise :class:`StoreError` naming the live run that holds it."""
        lease = cls(url)
        held = lease.read()
        if held is not None and not lease._mine(held):
            age = time.time() - float(held.get("heartbeat", 0))
            gone = held.get("host") == lease.record["host"] and not _alive(int(held.get("pid", -1)))
            if not gone and age <= STALE_AFTER_S:
                raise StoreError(
                    f"{url} is in use by another gig-dist run: pid {held.get('pid')} on host {held.get('host')} "
                    f"(its heartbeat {age:.0f} s ago). Wait for it to finish, or stop it; a lease whose "
                    f"heartbeat is older than {STALE_AFTER_S:.0f} s is taken over")
            why = "its process is gone" if gone else (f"its last heartbeat was {age:.0f} s ago" if held else
                                                      "it cannot be read")
            warnings.warn(f"taking over the lease of pid {held.get('pid')} on host {held.get('host')} on {url}: {why}",
                          stacklevel=2)
        lease._write()
        lease._thread = threading.Thread(target=lease._beat, name="gig-dist-lease", daemon=True)
        lease._thread.start()
        atexit.register(lease.release)  # a driver that ends without run()'s own release gives it back too
        return lease

    def _mine(self, held: dict[str, Any]) -> bool:
        return held.get("host") == self.record["host"] and held.get("pid") == self.record["pid"]

    def read(self) -> dict[str, Any] | None:
        """The lease record; None when there is none (or its place cannot exist, a file in the
        path); other storage errors propagate."""
        try:
            data = self.fs.cat_file(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return json.loads(data)
        except ValueError:
            return {}  # unreadable: held by someone unknown, stale after its timeout

    def _write(self) -> None:
        self.record["heartbeat"] = time.time()
        parent = self.path.rsplit("/", 1)[0]
        if parent and not self.fs.exists(parent):
            self.fs.makedirs(parent, exist_ok=True)
        self.fs.pipe_file(self.path, json.dumps(self.record).encode())

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                held = self.read()
                if held is None or held.get("token") != self.record["token"]:
                    return  # given back, or taken over: never write a lease that is not ours
                self._write()
            except OSError:
                continue  # a passing storage error; the next beat tries again

    def release(self) -> None:
        """Stop the heartbeat and remove the lease, if it is still ours."""
        self._stop.set()
        atexit.unregister(self.release)
        held = self.read()
        if held is not None and held.get("token") == self.record["token"]:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
