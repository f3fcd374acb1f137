"""Fault injection for tests of crash safety: ``GIG_DIST_FAILPOINT=<name>:<n>`` makes the process
SIGKILL itself the n-th time it passes the named point, exactly as a crash or an OOM kill would;
``<name>:<n>:stop`` makes it SIGSTOP itself there instead (Ctrl-Z, a stalled machine), to be
continued by a SIGCONT. ``...@<file>`` fires in one process only, the first to create ``<file>``
(so a restarted or replacement worker does not die again). Unset (always, outside tests), a
failpoint costs one dictionary lookup."""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "GIG_DIST_FAILPOINT"
_hits: Counter[str] = Counter()


def failpoint(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    spec, _, once_file = spec.partition("@")
    target, _, count = spec.partition(":")
    count, _, action = count.partition(":")
    if target != name:
        return
    _hits[name] += 1
    if _hits[name] < int(count or 1):
        return
    if once_file:
        try:
            os.close(os.open(once_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)
