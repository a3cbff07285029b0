"""The resume ledger: what a job finished, recorded in its temporary folder, so the same command resumes after a
kill and redoes only what is missing, damaged or out of date.

One append-only JSON-lines file per job. The first line names the job (its kind, the ledger version and whatever
the whole job depends on, e.g. the output plan or the calibration run's key); then one record per finished unit:

    {"unit": "<name>", "key": "<sha256 of everything the unit's output depends on>", "outputs": {<name>: <check>}}

and memos `{"memo": kind, "key": k, "value": v}` for slow derived facts (a 5 GB shard's sha256). The last record
of a unit wins; a line cut short by a crash (only the last can be) is dropped. A file whose first line is not this
job's is started over. A unit is reused only when its key is unchanged and its outputs still pass their check.

- `Stages`: units whose outputs are whole files in the job folder, checked by size + sha256 (GGUF export stages,
  eval stages, calibration layers). A unit's files are written in a temporary subfolder, fsynced, moved into the
  job folder and only then recorded (the record fsynced too): a file under its own name is always whole, and a
  record never outlives its data.
- `convert.writer.ArtifactWriter`: the specialisation for byte ranges. Its units are tensors at planned offsets of
  shared shard files, checked by an XXH3-128 digest of each range; records are appended without fsync (a record
  that outlived its data fails the digest and its unit is redone).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from convert.durable import WriteFailed, fsync_path
from convert.hashing import file_sha256

LEDGER_NAME = ".progress.jsonl"
TEMP_MARK = ".tmp-"  # in the names of files and folders being written: a run that died left them half-done
log = logging.getLogger("stepq.ledger")


def read_records(path: Path) -> list[dict]:
    """The JSON-object lines of a ledger (missing or unreadable: none); a line cut short by a crash is dropped."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError, numbers too long to convert, absurd nesting
            continue
        if isinstance(r, dict):
            records.append(r)
    return records


class Ledger:
    """The records of one job, `path` its ledger file and `header` its first line. `resumed`: the file was this
    job's, and its units and memos are loaded; otherwise `start` (called by the first write) begins a new file.
    `sync`: fsync every record, opening the file for each (few, large units whose record must not outlive their
    data); without it the file stays open and records are plain appends (many units, checked on reuse), until
    `close`."""

    def __init__(self, path: Path, header: dict, sync: bool = True):
        self.path, self.header, self.sync = Path(path), header, sync
        self.units: dict[str, dict] = {}
        self.memos: dict[tuple[str, str], object] = {}
        self._fd: int | None = None
        self._started = False
        records = read_records(self.path)
        self.resumed = bool(records) and records[0] == header
        if self.resumed:
            for r in records[1:]:
                if _unit_record(r):
                    self.units[r["unit"]] = r
                elif isinstance(r.get("memo"), str) and isinstance(r.get("key"), str):
                    self.memos[(r["memo"], r["key"])] = r.get("value")

    def start(self) -> None:
        """Begin the file with this job's header: a resumed file is appended to, any other one replaced."""
        if self._started:
            return
        self._started = True
        if not self.resumed:
            self.units, self.memos = {}, {}
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            self._append(self.header)

    def _append(self, record: dict) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        fd = self._fd if self._fd is not None else os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line)
            if self.sync:
                os.fsync(fd)
        finally:
            if self.sync:
                os.close(fd)
            else:
                self._fd = fd

    def record(self, unit: str, key: str | None, outputs: dict, **extra) -> dict:
        """`unit` finished under `key`; `outputs` maps each output to what checks it."""
        self.start()
        rec = {"unit": unit, "key": key, "outputs": outputs, **extra}
        self._append(rec)
        self.units[unit] = rec
        return rec

    def memo(self, kind: str, key: str, compute: Callable[[], object]):
        """`compute()`, remembered under (kind, key) for a resumed run."""
        if (kind, key) not in self.memos:
            value = compute()
            self.start()
            self._append({"memo": kind, "key": key, "value": value})
            self.memos[(kind, key)] = value
        return self.memos[(kind, key)]

    @property
    def has_work(self) -> bool:
        """Whether a finished unit with outputs is recorded: worth keeping the folder for a resume."""
        return any(r["outputs"] for r in self.units.values())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _unit_record(r: dict) -> bool:
    """A record of the shape `Ledger.record` writes; anything else (a damaged or edited line) is ignored, so its
    unit is redone."""
    outputs = r.get("outputs")
    return (isinstance(r.get("unit"), str) and (r.get("key") is None or isinstance(r.get("key"), str))
            and isinstance(outputs, dict) and all(isinstance(v, (str, dict)) for v in outputs.values()))


def file_name_ok(name: str) -> bool:
    """A plain file name inside the job folder: what `Stages` writes, and all a record may name (a record is read
    from disk: it must not point at, or delete, anything else)."""
    return (name == Path(name).name and name not in ("", ".", "..") and "\0" not in name
            and len(name.encode("utf-8", "surrogatepass")) <= 255)


def file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


class Stages:
    """Units made of whole files in `folder` (created if missing), recorded in its ledger. Open it under the job's
    lock: temporary files of a run that died are removed on opening. `header` identifies the job (default: any
    run of the same kind; each stage's key then says whether its files are still right)."""

    def __init__(self, folder: Path, header: dict | None = None):
        self.folder = Path(folder)
        self.reused: list[str] = []
        self.made: list[str] = []
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for p in self.folder.iterdir():
                if TEMP_MARK in p.name:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError as e:
            raise WriteFailed(f"{e.filename or self.folder}: cannot prepare the temporary folder ({e.strerror})")
        self.ledger = Ledger(self.folder / LEDGER_NAME, header or {"stepq_ledger": "stages", "version": 1})

    @property
    def has_work(self) -> bool:
        return self.ledger.has_work

    def intact(self, stage: str, key: str) -> bool:
        """Whether `stage` finished under `key` and its files still hash as recorded."""
        rec = self.ledger.units.get(stage)
        if rec is None or not rec["outputs"]:  # never finished, or its files were consumed (`forget`)
            return False
        if rec.get("key") != key:
            log.info("%s: inputs or settings changed since the earlier run; doing it again", stage)
            return False
        for name, want in rec["outputs"].items():
            if not file_name_ok(name):
                log.warning("%s: the record of %s names %r, not a file of this folder; doing it again",
                            self.ledger.path, stage, name)
                return False
            f = self.folder / name
            if want is None or not f.is_file() or file_record(f) != want:
                log.warning("%s: damaged or missing (not what the earlier run recorded); doing %s again", f, stage)
                return False
        return True

    def reuse(self, stage: str, key: str) -> list[Path] | None:
        """The files of `stage` when an earlier run finished it under `key` and they still hash as recorded."""
        if not self.intact(stage, key):
            return None
        self.reused.append(stage)
        return [self.folder / name for name in self.ledger.units[stage]["outputs"]]

    def make(self, stage: str, key: str, write: Callable[[Path], object], **extra) -> list[Path]:
        """Run `write(tmp)`, which puts the stage's files under their final names into the empty folder `tmp`; they
        are then fsynced, moved into the job folder and recorded under `key` (with `extra` in the record)."""
        tmp = self.folder / f".{stage}{TEMP_MARK}{os.getpid()}"
        try:
            tmp.mkdir()
            write(tmp)
            files = self._commit(stage, key, sorted(tmp.iterdir()), extra)
        except OSError as e:
            raise self._write_failed(e, tmp) from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.made.append(stage)
        return files

    def obtain(self, stage: str, key: str, write: Callable[[Path], object]) -> list[Path]:
        """`reuse`, else `make`."""
        files = self.reuse(stage, key)
        return files if files is not None else self.make(stage, key, write)

    def recorded(self, files: list[Path]) -> dict[str, dict]:
        """{name: {"size", "sha256"}} of finished stages' files, as recorded (not hashed again)."""
        by_name = {n: r for rec in self.ledger.units.values() for n, r in rec["outputs"].items()}
        return {f.name: by_name[f.name] for f in files}

    def forget(self, *stages: str) -> None:
        """Remove the files of finished stages that a later, recorded stage consumed (e.g. a 400 GB intermediate)."""
        for stage in stages:
            if stage in self.ledger.units:
                names = self.ledger.units[stage]["outputs"]
                self.ledger.record(stage, None, {})
                for name in filter(file_name_ok, names):
                    (self.folder / name).unlink(missing_ok=True)

    def _commit(self, stage: str, key: str, written: list[Path], extra: dict) -> list[Path]:
        for f in written:
            fsync_path(f)
        outputs = {f.name: file_record(f) for f in written}
        files = [self.folder / f.name for f in written]
        for f, dst in zip(written, files):
            os.replace(f, dst)
        fsync_path(self.folder)
        self.ledger.record(stage, key, outputs, **extra)
        return files

    def close(self) -> None:
        self.ledger.close()

    def _write_failed(self, e: OSError, where: Path) -> WriteFailed:
        kept = (f"finished work kept in {self.folder}: re-run the same command to resume, --force to start over"
                if self.has_work else "nothing kept")
        return WriteFailed(f"{e.filename or where}: cannot write ({e.strerror}); {kept}")
