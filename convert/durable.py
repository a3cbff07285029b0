"""Durable writes, the only ones the project makes: a file or a folder appears under its final name whole or not at
all, and survives a crash once the call returns.

- `write_atomic(path, data)`: bytes or text through a temporary file beside `path`, fsynced, renamed, folder fsynced.
- `replace_durably(tmp, path)`: the same for a file the caller wrote itself (a safetensors file, a memory map).
- `AtomicDir`: a folder built under a hidden temporary name and published by rename (or swapped in for an older
  one in one atomic exchange) when complete.
- `swap_in(new, final)`: a finished folder in place of `final`, the old one dropped.
Write errors (disk full, file size limit, I/O) become `WriteFailed`: one line naming the file, exit code 2.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

from convert.errors import BadInput, WriteFailed

__all__ = ["AtomicDir", "WriteFailed", "fsync_path", "replace_durably", "swap_in", "write_atomic"]


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it to `path`, fsync the folder: a crash leaves the old `path` or the new one."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """`data` as the file `path` (parents created), via `.<name>.tmp-<pid>` beside it: readers see the old file or
    the new one, never a part. An OSError names the file (a failed write() names none); nothing is left behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    raw = data.encode() if isinstance(data, str) else data
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view, done = memoryview(raw), 0
            while done < len(view):
                done += os.write(fd, view[done:])
        finally:
            os.close(fd)
        replace_durably(tmp, path)
    except OSError as e:
        e.filename = e.filename or str(tmp)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def swap_in(new: Path, final: Path) -> None:
    """Publish the fsynced folder `new` as `final` (same filesystem). An existing `final` is exchanged for it in one
    step where the system can; elsewhere it is moved aside first. The old folder is removed afterwards."""
    fsync_path(new)
    if final.exists():
        if _exchange(new, final):
            fsync_path(final.parent)
            shutil.rmtree(new, ignore_errors=True)  # now the old folder
            return
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        new.rename(final)
        fsync_path(final.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    new.rename(final)
    fsync_path(final.parent)


class AtomicDir:
    """Build a folder under a hidden temporary name; publish it by rename only when complete and fsynced. An
    existing folder is replaced only with `force`, and stays until its replacement is complete.

    Temporary name: `.<name>.partial-<pid>`, removed on any error; with `resumable`, `.<name>.partial`, kept on
    an error that is not bad input once `keep_on_error` is set (by a writer that finished some work), so the same
    command can resume. `force` always starts from an empty temporary folder."""

    def __init__(self, final_dir: str | Path, force: bool = False, resumable: bool = False):
        self.final, self.force, self.resumable = Path(final_dir), force, resumable
        suffix = "partial" if resumable else f"partial-{os.getpid()}"
        self.tmp = self.final.parent / f".{self.final.name}.{suffix}"
        self.keep_on_error = False
        self.resuming = False
        self.scratch: list[str] = []  # bookkeeping files of the temporary folder, dropped just before the rename

    def __enter__(self) -> Path:
        if self.final.exists() and not self.force:
            raise BadInput(f"{self.final}: output already exists (pass --force, or FORCE=1 to make, to replace it)")
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            if self.resumable and not self.force and self.tmp.is_dir():
                self.resuming = True  # whoever resumes checks what is inside
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp.mkdir()
        except OSError as e:
            raise WriteFailed(f"{e.filename or self.tmp}: cannot create the output folder ({e.strerror})")
        return self.tmp

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            bad_input = issubclass(exc_type, BadInput) and not issubclass(exc_type, WriteFailed)
            if bad_input or not self.keep_on_error:
                self.discard()
            return
        try:
            self.publish()
        except OSError as e:
            if not self.keep_on_error:
                self.discard()
            raise WriteFailed(f"{e.filename or self.final}: cannot publish the output ({e.strerror})")
        except BaseException:
            if not self.keep_on_error:
                self.discard()
            raise

    def publish(self) -> None:
        for p in self.tmp.iterdir():
            fsync_path(p)
        # Last moment before the rename, so a crash anywhere earlier still finds the bookkeeping to resume with.
        for name in self.scratch:
            (self.tmp / name).unlink(missing_ok=True)
        swap_in(self.tmp, self.final)
