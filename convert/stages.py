"""Stage-level resume for jobs made of a few large files (GGUF export, eval): what a stage finished is kept, checked,
and reused by the next run of the same command.

The job's temporary folder holds `.progress.jsonl` (the name and record shape of the safetensors writer's per-unit
progress, `convert.writer`): one line per finished stage, `{"unit": stage, "key": ..., "outputs": {file: {"size",
"sha256"}}}`, where the key is the sha256 of everything the stage's output depends on (its inputs' identities, the
settings, the upstream stages' keys, tool versions). A stage is reused only when its key is unchanged and its files
still hash to what was recorded; otherwise it is made again. A stage writes into a temporary subfolder; its files
are fsynced, renamed into the job folder, and only then recorded (the record fsynced too), so a file under its own
name is always whole, and a record never outlives its data. The last record of a stage wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from convert.hashing import file_sha256
from convert.durable import WriteFailed, fsync_path
from convert.writer import PROGRESS_NAME, read_progress

log = logging.getLogger("stepq.stages")
TEMP_MARK = ".tmp-"  # in the names of files and folders being written: a run that died left them half-done


def digest(obj) -> str:
    """sha256 of a JSON-able description (a stage key)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


class StageProgress:
    """The finished stages recorded in `folder` (created if missing). Open it under the job's lock: temporary files
    of a run that died are removed on opening."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / PROGRESS_NAME
        self.reused: list[str] = []
        self.made: list[str] = []
        self._records = {r["unit"]: r for r in read_progress(self.path)
                         if isinstance(r.get("unit"), str) and isinstance(r.get("outputs"), dict)}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for p in self.folder.iterdir():
                if TEMP_MARK in p.name:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError as e:
            raise WriteFailed(f"{e.filename or self.folder}: cannot prepare the temporary folder ({e.strerror})")

    @property
    def has_work(self) -> bool:
        """Whether anything finished is recorded here (by this run or an earlier one): worth keeping on a failure."""
        return any(r["outputs"] for r in self._records.values())

    def reuse(self, stage: str, key: str) -> list[Path] | None:
        """The files of `stage` when an earlier run finished it under `key` and they still hash as recorded."""
        rec = self._records.get(stage)
        if rec is None or not rec["outputs"]:  # never finished, or its files were consumed (`forget`)
            return None
        if rec.get("key") != key:
            log.info("%s: inputs or settings changed since the earlier run; doing it again", stage)
            return None
        files = [self.folder / name for name in rec["outputs"]]
        for f in files:
            if not f.is_file() or file_record(f) != rec["outputs"][f.name]:
                log.warning("%s: %s differs from what the earlier run recorded (damaged or missing); doing it again",
                            stage, f)
                return None
        self.reused.append(stage)
        return files

    def make(self, stage: str, key: str, write: Callable[[Path], object]) -> list[Path]:
        """Run `write(tmp)`, which puts the stage's files under their final names into the empty folder `tmp`; they
        are then fsynced, moved into the job folder and recorded under `key`."""
        tmp = self.folder / f".{stage}{TEMP_MARK}{os.getpid()}"
        try:
            tmp.mkdir()
            write(tmp)
            files = self._commit(stage, key, sorted(tmp.iterdir()))
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
        by_name = {n: r for rec in self._records.values() for n, r in rec["outputs"].items()}
        return {f.name: by_name[f.name] for f in files}

    def forget(self, *stages: str) -> None:
        """Remove the files of finished stages that a later, recorded stage consumed (e.g. a 400 GB intermediate)."""
        for stage in stages:
            if stage in self._records:
                self._append({"unit": stage, "key": None, "outputs": {}})
                for name in self._records.pop(stage)["outputs"]:
                    (self.folder / name).unlink(missing_ok=True)

    def _commit(self, stage: str, key: str, written: list[Path]) -> list[Path]:
        for f in written:
            fsync_path(f)
        record = {"unit": stage, "key": key, "outputs": {f.name: file_record(f) for f in written}}
        files = [self.folder / f.name for f in written]
        for f, dst in zip(written, files):
            os.replace(f, dst)
        fsync_path(self.folder)
        self._append(record)
        self._records[stage] = record
        return files

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as out:
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())

    def _write_failed(self, e: OSError, where: Path) -> WriteFailed:
        kept = (f"finished work kept in {self.folder}: re-run the same command to resume, --force to start over"
                if self.has_work else "nothing kept")
        return WriteFailed(f"{e.filename or where}: cannot write ({e.strerror}); {kept}")
