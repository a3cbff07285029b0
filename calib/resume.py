"""Per-layer checkpoints of a calibration run: re-running a killed `stepq calibrate` continues after the last layer it
finished and writes the very statistics an uninterrupted run writes.

They live in the output's temporary folder, `<model>-calib/.stats.safetensors.partial/` (the output lock keeps runs
apart), and are written layer by layer, each file under a temporary name, fsynced and renamed into place:
- `stats-NNN.safetensors`: the statistics layer NNN added (`StatsCollector.take_state`: raw accumulators);
- `act-NNN.bin`: the layer's output, the next layer's input. Only the last finished layer's is kept. When the run
  spills activations to disk, it is the very file the layer wrote through its memory map, renamed;
- `progress.jsonl`: a header with the run's key (sha256 of everything the statistics depend on), then one line per
  finished layer with the sha256 of both files, appended and fsynced once they are in place.

A re-run with the same key checks the files against their recorded hashes and continues after the last layer whose
files (and every earlier layer's statistics) are intact; a damaged file is redone with everything after it (back to
the embedding when the activations to redo it from are gone). Another key, or `force`, starts over.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from calib.stats import StatsCollector
from calib.stream import Activations
from convert.hashing import file_sha256
from convert.durable import write_atomic
from convert.writer import read_progress

log = logging.getLogger("stepq.calibrate")
PROGRESS_NAME = "progress.jsonl"
PROGRESS_VERSION = 1


class LayerCheckpoints:
    """`calib.stream.Checkpoints` for one calibration output, restoring into and saving from `collector`."""

    def __init__(self, folder: Path):
        self.dir = Path(folder)
        self.opened = False  # this run has taken the folder over (before that, an error leaves it alone)
        self.kept = False    # it holds finished layers: an interrupted run leaves it for a resume
        self._collector: StatsCollector | None = None
        self._chain: list[dict] = []  # an earlier run's intact layer records, in layer order

    def open(self, key: str, collector: StatsCollector, force: bool) -> None:
        """Take up an earlier run's folder if it has the same key (never with `force`), else start an empty one."""
        self._collector = collector
        records = read_progress(self.dir / PROGRESS_NAME)
        header = {"stepq_calibration_progress": PROGRESS_VERSION, "key": key}
        if force and records:
            log.info("%s: starting over (--force)", self.dir)
        elif records and records[0] == header:
            self._chain = self._intact_chain(records[1:])
        elif records:
            log.info("%s: the interrupted run was for other inputs or settings; starting over", self.dir)
        self._keep_only(self._chain)
        write_atomic(self.dir / PROGRESS_NAME, "".join(_line(r) for r in [header, *self._chain]).encode())
        self.opened, self.kept = True, bool(self._chain)

    def _intact_chain(self, layers: list[dict]) -> list[dict]:
        """The longest run of records from layer 0 whose statistics files are intact and whose last activations
        file is, too (earlier layers' activations are gone by design)."""
        chain = []
        for n, r in enumerate(layers):
            if not (_well_formed(r, n) and self._intact(r["stats"])):
                break
            chain.append(r)
        while chain and not self._intact(chain[-1]["activations"]):
            chain.pop()
        if len(chain) < len(layers):
            log.warning("%s: %d of %d finished layers intact; redoing the rest", self.dir, len(chain), len(layers))
        return chain

    def _intact(self, entry: dict) -> bool:
        path = self.dir / entry["file"]
        if not path.is_file():
            return False
        if file_sha256(path) != entry["sha256"]:
            log.warning("%s: damaged (sha256 differs from %s)", path, PROGRESS_NAME)
            return False
        return True

    def _keep_only(self, chain: list[dict]) -> None:
        """Remove what `chain` does not use: later layers, temporary and spilled files of a killed run."""
        keep = {r["stats"]["file"] for r in chain} | ({chain[-1]["activations"]["file"]} if chain else set())
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name not in keep:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)

    def resume(self, spill_bytes: int) -> tuple[int, Activations] | None:
        """Restore the statistics of the intact layers; -> (the last of them, its output) or None (start over)."""
        if not self._chain:
            return None
        for r in self._chain:
            self._collector.restore_state(load_file(self.dir / r["stats"]["file"]))
        last = self._chain[-1]
        act = last["activations"]
        output = Activations(act["shape"], getattr(torch, act["dtype"]), spill_bytes, file=self.dir / act["file"],
                             create=False)
        log.info("resumed: %d layers reused from the interrupted run (%s); continuing at layer %d",
                 len(self._chain), self.dir, last["layer"] + 1)
        return last["layer"], output

    def spill_file(self, layer: int) -> Path:
        return self.dir / f"act-{layer:03d}.bin.tmp"

    def commit(self, layer: int, output: Activations) -> None:
        """Persist what `layer` added to the statistics and its output, then record both; earlier outputs go."""
        stats, act = self.dir / f"stats-{layer:03d}.safetensors", self.dir / f"act-{layer:03d}.bin"
        write_atomic(stats, save(self._collector.take_state()))
        output.save(act)
        record = {"layer": layer, "stats": {"file": stats.name, "sha256": file_sha256(stats)},
                  "activations": {"file": act.name, "sha256": file_sha256(act), "shape": list(output.shape),
                                  "dtype": str(output.dtype).removeprefix("torch.")}}
        with open(self.dir / PROGRESS_NAME, "a") as f:
            f.write(_line(record))
            f.flush()
            os.fsync(f.fileno())
        self.kept = True
        self._drop_outputs_before(act)

    def _drop_outputs_before(self, act: Path) -> None:
        """The next layer starts from `act`: earlier outputs are no longer needed (a run killed before this point
        leaves two, and resumes from the older one if the newer is damaged)."""
        for old in self.dir.glob("act-*.bin"):
            if old != act:
                old.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _line(record: dict) -> str:
    return json.dumps(record, separators=(",", ":")) + "\n"


def _well_formed(record, layer: int) -> bool:
    return (isinstance(record, dict) and record.get("layer") == layer
            and all(isinstance(record.get(k), dict) and {"file", "sha256"} <= record[k].keys()
                    for k in ("stats", "activations")))
