"""One writer per output folder: an exclusive `flock` on `OUT/.<name>.lock`, beside the folder it protects.

The lock file holds who took it (pid, host, command, start time), so a second run can say whom it is waiting for.
`flock` belongs to the open file, and the kernel drops it when the holder dies however it dies (SIGKILL, OOM, power
loss on a local disk), so a lock file left behind by a dead process is simply unlocked: the next run takes it over
and says so. The file is removed on release; since a waiting process may have opened it just before, a lock only
counts once the locked file is still the one at the path (otherwise two processes could each lock a different inode).
On NFS, Linux maps `flock` to POSIX byte-range locks, which the server arbitrates, so this still holds.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from convert.errors import BadInput

log = logging.getLogger("stepq.lock")


def lock_path(target: str | Path) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.lock"


def _holder_text(record: dict) -> str:
    since = record.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return (f"pid {record.get('pid', '?')} on {record.get('host', '?')} ({record.get('command', '?')}), "
            f"since {when}")


def _read_record(fd: int) -> dict | None:
    raw = os.pread(fd, 65536, 0)
    try:
        record = json.loads(raw) if raw.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


class OutputLock:
    """`with OutputLock(out_dir):` -> exclusive use of `out_dir` (and its temporary folders), or BadInput naming the
    holder. Non-blocking: a second run refuses at once instead of queueing behind a multi-hour conversion."""

    def __init__(self, target: str | Path, command: str | None = None):
        self.target = Path(target)
        self.path = lock_path(self.target)
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # O_CLOEXEC: child tools never inherit it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = _read_record(fd)
                os.close(fd)
                who = _holder_text(record) if record else "another process (it has not written its details yet)"
                raise BadInput(f"{self.target}: in use by {who}; lock file {self.path}")
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and removed the file between our open and our flock: retry
        stale = _read_record(fd)
        if stale:
            log.warning("taking over the lock of %s: that process is gone", _holder_text(stale))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlink first, while still holding the lock: see the module doc
        finally:
            os.close(self._fd)
            self._fd = None
