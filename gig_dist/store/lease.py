"""One driver per run: an exclusive lease on the store with a fencing generation, on local disks
and object stores alike.

The lease is a folder of small JSON records beside the store's ``zarr.json``,
``gig-dist.lease/<generation>``, one per driver that ever held it, numbered 1, 2, 3, ...: the
record with the highest number is the current lease, and its number is the *generation*, the
fencing token. A record holds the owner's host and pid, a token, a heartbeat the owner refreshes
every ``timeout / 6`` seconds, its timeout, and ``released`` once it is given back.

* **Taking it is one atomic create.** A driver reads the current record; when there is none, or it
  is released, or stale (no heartbeat for its timeout, or it names a process of this host that no
  longer exists), it creates the next generation's record with an exclusive create: ``os.link``
  of a finished temporary file on local disks (it fails when the name exists), a conditional put
  (``If-None-Match: *``, fsspec's ``mode="create"``) on object stores. Of two drivers that start
  at once, exactly one creates the record; the other finds it and refuses, naming the owner.
* **Fencing.** Every write of a run passes its :class:`Fence` (the generation it holds): before a
  commit (a unit's completion, the manifest, a stage's record, a delete) the fence lists the
  lease folder and stops the writer with :class:`LeaseLost` when a later generation exists. Plain
  data writes re-check once the last confirmation is older than ``timeout / 3``; a driver paused
  longer than that (Ctrl-Z, a stalled VM) checks before its next byte. Once lost, a fence refuses
  every later write at once.
* **Takeover.** A stale lease is taken by creating the next generation, saying so. Workers of the
  old generation (Ray actors of a paused driver) may have confirmed it just before: the new
  driver waits ``timeout / 3`` before it writes, by which time every one of them checks again.

What no lease can stop without the storage's help: a write already under way at the moment its
process was paused lands when it resumes. The check just before each write keeps that window to
one chunk's write.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import socket
import threading
import time
import uuid
import warnings
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from gig_dist.store.errors import LeaseLost, StoreError
from gig_dist.store.location import filesystem

#: The folder of lease records, beside the store's root ``zarr.json``.
LEASE_DIR = "gig-dist.lease"
#: A record's name: its generation, zero-padded so that names sort as numbers.
_RECORD = re.compile(r"\d{12}")
#: Temporary files of a local exclusive create (``os.link`` makes them the record).
_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{32}")
#: Seconds without a heartbeat after which a lease may be taken over (``store.lease_timeout_s``).
DEFAULT_TIMEOUT_S = 60.0


def is_lease_key(key: str) -> bool:
    """Whether ``key`` (relative to the store's root) is one of the lease's own objects: a
    record, a local create's temporary file, or the single lease file of gig-dist before
    generations (format 3 stores written until then)."""
    if key == LEASE_DIR:
        return True
    folder, _, name = key.partition("/")
    return folder == LEASE_DIR and bool(_RECORD.fullmatch(name) or _TEMPORARY.fullmatch(name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def _generations(fs: fsspec.AbstractFileSystem, folder: str) -> list[int]:
    """The generations recorded in ``folder``, ascending, listed afresh (object stores' clients
    cache listings; another driver's record must never be missed)."""
    fs.invalidate_cache(folder)
    try:
        names = fs.ls(folder, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [name.rstrip("/").rsplit("/", 1)[-1] for name in names]
    return sorted(int(name) for name in found if _RECORD.fullmatch(name))


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    """A record; None when there is none; {} when it cannot be read (torn or foreign)."""
    try:
        data = fs.cat_file(path)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    try:
        found = json.loads(data)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


class Fence:
    """The generation of the lease a run's writes are made under: the driver's own, and a copy
    in every worker (it pickles without its confirmation, so a worker checks before its first
    write). :meth:`check` lists the lease folder; :meth:`guard` does so only when the last
    confirmation is older than ``validity_s``."""

    def __init__(self, url: str, generation: int, validity_s: float) -> None:
        self.url = url
        self.generation = generation
        self.validity_s = validity_s
        self._confirmed = float("-inf")  # time.monotonic() of the last confirmation
        self._lost: str | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "generation": self.generation, "validity_s": self.validity_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["generation"], state["validity_s"])

    def confirm(self, when: float) -> None:
        """Record a confirmation made at ``when`` (monotonic) by someone who listed the folder."""
        with self._lock:
            self._confirmed = max(self._confirmed, when)

    def lose(self, why: str) -> None:
        self._lost = why

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this generation is still the store's current one."""
        if self._lost is not None:
            raise LeaseLost(self._lost)
        started = time.monotonic()
        fs, root = filesystem(self.url)
        current = _generations(fs, f"{root}/{LEASE_DIR}")
        latest = current[-1] if current else 0
        if latest != self.generation:
            holder = _read_json(fs, f"{root}/{LEASE_DIR}/{latest:012d}") or {} if latest else {}
            who = f"pid {holder.get('pid')} on host {holder.get('host')}" if holder else "nobody (the lease was removed)"
            self.lose(f"{self.url}: this run lost its lease (generation {self.generation}; the store's is now "
                      f"{latest}, held by {who}); it stops here and writes nothing more")
            raise LeaseLost(self._lost)
        self.confirm(started)

    def fresh(self) -> bool:
        """Whether a write may go ahead without a check (confirmed recently, and not lost)."""
        return self._lost is None and time.monotonic() - self._confirmed <= self.validity_s

    def guard(self) -> None:
        """Before a data write: check again once the last confirmation has grown old."""
        if not self.fresh():
            self.check()


class Lease:
    """The lease this process holds on the store at ``url``; :meth:`release` gives it back."""

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.url = url
        self.timeout_s = float(timeout_s)
        self.fs, root = filesystem(url)
        self.folder = f"{root}/{LEASE_DIR}"
        self.legacy = f"{root}/{LEASE_DIR}"  # the one lease file of stores written before generations
        self.record: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                                       "started": time.time(), "heartbeat": time.time(), "timeout_s": self.timeout_s,
                                       "generation": 0, "released": False}
        self.fence: Fence | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def generation(self) -> int:
        return int(self.record["generation"])

    @property
    def path(self) -> str:
        return f"{self.folder}/{self.generation:012d}"

    @property
    def heartbeat_s(self) -> float:
        return self.timeout_s / 6

    @property
    def validity_s(self) -> float:
        return self.timeout_s / 3

    # -- taking it -------------------------------------------------------------------------------------

    @classmethod
    def acquire(cls, url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Lease:
        """Take the lease, or raise :class:`StoreError` naming the live run that holds it."""
        lease = cls(url, timeout_s)
        lease._clear_legacy()
        current = _generations(lease.fs, lease.folder)
        latest = current[-1] if current else 0
        path = f"{lease.folder}/{latest:012d}"
        held = _read_json(lease.fs, path) if latest else None
        why = lease._refuse_or_explain(held, path, latest)
        lease.record["generation"] = latest + 1
        lease._create()
        if why and why != "its process is gone":
            # Workers of a stalled driver check again within validity_s: none writes after this.
            time.sleep(lease.validity_s)
        lease.fence = Fence(url, lease.generation, lease.validity_s)
        lease.fence.confirm(time.monotonic())
        lease._prune(latest)
        lease._thread = threading.Thread(target=lease._beat, name="gig-dist-lease", daemon=True)
        lease._thread.start()
        atexit.register(lease.release)  # a driver that ends without run()'s own release gives it back too
        return lease

    def _live(self, held: dict[str, Any], path: str) -> tuple[bool, str]:
        """Whether the record ``held`` (read from ``path``) is a live lease, and if not, why it
        may be taken. One that cannot be read counts as live until its file is a timeout old."""
        if not held:
            return time.time() - self._modified(path) <= self.timeout_s, "it cannot be read"
        if held.get("released"):
            return False, "released"
        timeout = float(held.get("timeout_s", DEFAULT_TIMEOUT_S))
        age = time.time() - float(held.get("heartbeat", 0))
        if held.get("host") == self.record["host"] and not _alive(int(held.get("pid", -1))):
            return False, "its process is gone"
        return age <= timeout, f"its last heartbeat was {age:.0f} s ago"

    def _refuse_or_explain(self, held: dict[str, Any] | None, path: str, generation: int) -> str | None:
        """Refuse a live lease; say why a stale one is taken over, and return why (None: there
        was no lease, or it was given back)."""
        if held is None:
            return None
        live, why = self._live(held, path)
        if live:
            age = time.time() - float(held.get("heartbeat", 0)) if held else 0.0
            owner = f"pid {held.get('pid')} on host {held.get('host')}" if held else "an unknown driver"
            timeout = float(held.get("timeout_s", DEFAULT_TIMEOUT_S)) if held else self.timeout_s
            raise StoreError(
                f"{self.url} is in use by another gig-dist run: {owner} (its heartbeat {age:.0f} s ago). Wait for it "
                f"to finish, or stop it; a lease whose heartbeat is older than {timeout:.0f} s is taken over")
        if why == "released":
            return None
        what = f" (generation {generation})" if generation else ""
        warnings.warn(f"taking over the lease of pid {held.get('pid')} on host {held.get('host')} on {self.url}{what}: "
                      f"{why}", stacklevel=3)
        return why

    def _modified(self, path: str) -> float:
        try:
            found = self.fs.modified(path)
            return found.timestamp()
        except (OSError, NotImplementedError, AttributeError):
            return 0.0

    def _clear_legacy(self) -> None:
        """A lease file of gig-dist before generations: refuse it while live, else remove it."""
        if not self.fs.isfile(self.legacy):
            return
        held = _read_json(self.fs, self.legacy) or {}
        self._refuse_or_explain({**held, "timeout_s": DEFAULT_TIMEOUT_S} if held else held, self.legacy, 0)
        try:
            self.fs.rm_file(self.legacy)
        except FileNotFoundError:
            pass

    def _create(self) -> None:
        """Create this generation's record, exclusively: if it exists, another driver took it."""
        data = json.dumps(self.record).encode()
        try:
            if isinstance(self.fs, LocalFileSystem):
                os.makedirs(self.folder, exist_ok=True)
                temporary = f"{self.folder}/.tmp-{uuid.uuid4().hex}"  # a name the store knows as the lease's
                with open(temporary, "wb") as file:
                    file.write(data)
                try:
                    os.link(temporary, self.path)  # atomic, and fails when the name exists
                finally:
                    os.unlink(temporary)
            else:
                self.fs.makedirs(self.folder, exist_ok=True)
                self.fs.pipe_file(self.path, data, mode="create")  # If-None-Match: * on S3
        except FileExistsError:
            raise self._lost_race() from None
        # A server that ignored the condition would let both drivers write: read back the token.
        if (_read_json(self.fs, self.path) or {}).get("token") != self.record["token"]:
            raise self._lost_race()

    def _lost_race(self) -> StoreError:
        held = _read_json(self.fs, self.path) or {}
        return StoreError(f"{self.url} is in use by another gig-dist run: pid {held.get('pid')} on host "
                          f"{held.get('host')} took its lease at the same moment (generation {self.generation})")

    def _prune(self, below: int) -> None:
        """Remove records older than the one before this (the newest two decide everything)."""
        for generation in _generations(self.fs, self.folder):
            if generation < below:
                try:
                    self.fs.rm_file(f"{self.folder}/{generation:012d}")
                except FileNotFoundError:
                    pass

    # -- holding it -------------------------------------------------------------------------------------

    def read(self) -> dict[str, Any] | None:
        """This generation's record (None: there is none)."""
        return _read_json(self.fs, self.path)

    def _write(self) -> None:
        self.record["heartbeat"] = time.time()
        data = json.dumps(self.record).encode()
        if isinstance(self.fs, LocalFileSystem):  # never a torn record: write beside, then rename
            temporary = f"{self.folder}/.tmp-{uuid.uuid4().hex}"
            with open(temporary, "wb") as file:
                file.write(data)
            os.replace(temporary, self.path)
        else:
            self.fs.pipe_file(self.path, data)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.fence.check()
                self._write()
            except LeaseLost:
                return  # never write a lease that is not ours; every later write is refused
            except OSError:
                continue  # a passing storage error; the next beat tries again

    def release(self) -> None:
        """Stop the heartbeat, then mark the record released if it is still the current one."""
        self._stop.set()
        atexit.unregister(self.release)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self.fence is None or self.record["released"]:
            return
        try:
            self.fence.check()
        except LeaseLost:
            return
        self.record["released"] = True
        self._write()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
