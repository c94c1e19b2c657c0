"""One writer per table: an advisory file lock that readers never take."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from cytostore.errors import StoreLockedError


class WriterLock:
    """Exclusive ``fcntl`` lock on ``STORE/.locks/<table>.lock``.

    The lock dies with its process (even under SIGKILL), so a crashed ingest never
    leaves a stale lock behind. Object-store URIs have no lock: one writer at a time
    is then the user's job, and ingest says so.
    """

    def __init__(self, root: str | Path, table: str):
        self.path = Path(root) / ".locks" / f"{table}.lock"
        self._fh = None

    def acquire(self, wait: bool = False, poll_s: float = 1.0, timeout_s: float | None = None) -> "WriterLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait or (timeout_s is not None and time.monotonic() - start > timeout_s):
                    fh.seek(0)
                    holder = fh.read().strip() or "{}"
                    fh.close()
                    raise StoreLockedError(
                        f"table {self.path.stem!r} is being written by another process {holder}; "
                        "wait for it to finish (or pass --wait), then run again"
                    ) from None
                time.sleep(poll_s)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        import fcntl

        if self._fh is not None:
            self._fh.seek(0)
            self._fh.truncate()
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
