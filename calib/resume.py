"""Per-layer checkpoints of a calibration run: re-running a killed `stepq calibrate` continues after the last layer it
finished and writes the very statistics an uninterrupted run writes.

They live in the output's temporary folder, `<model>-calib/.stats.safetensors.partial/` (the output lock keeps runs
apart), as units of the job's resume ledger (`convert.ledger.Stages`, whose header holds the run's key: the sha256 of
everything the statistics depend on). Per layer NNN, two units:
- `stats-NNN`: `stats-NNN.safetensors`, the statistics layer NNN added (`StatsCollector.take_state`: raw
  accumulators), kept until the end;
- `act-NNN`: `act-NNN.bin`, the layer's output, the next layer's input, with its shape and dtype in the record. Only
  the last finished layer's is kept (earlier ones are forgotten). When the run spills activations to disk, it is the
  very file the layer wrote through its memory map, renamed.

A re-run with the same key continues after the last layer whose statistics (and every earlier layer's) and output
are intact; a damaged file is redone with everything after it (back to the embedding when the activations to redo
it from are gone). Another key, or `force`, starts over.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from calib.compute import Compute
from calib.data import CalibData
from calib.stats import FORMAT_VERSION, StatsCollector
from calib.stream import Activations
from convert.durable import WriteFailed
from convert.ledger import LEDGER_NAME, Stages
from convert.provenance import digest, versions

log = logging.getLogger("stepq.calibrate")
LEDGER_VERSION = 2  # 2: the common ledger (1: calibration's own progress.jsonl)
ACTIVATION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_key(source: dict, data: CalibData, all_experts: bool, compute: Compute, spill_bytes: int,
            micro_batch_tokens: int, executor: dict | None = None) -> str:
    """sha256 of everything the statistics file depends on (but where the model lives and the run's timings): a
    run continues an interrupted one only under the same key."""
    inputs = {
        "source": {k: source[k] for k in ("config_sha256", "shards")}, "dataset": data.dataset,
        "token_ids_sha256": hashlib.sha256(data.ids.numpy().tobytes()).hexdigest(),
        "tokens_drawn_from": data.tokens_drawn_from, "n": data.n, "seq_len": data.seq_len, "seed": data.seed,
        "all_experts": all_experts, "format_version": FORMAT_VERSION,
        # the device type and GEMM dtype round differently: a resumed run continues only on the same kind
        "compute": {**compute.label, "device": compute.device.type},
        # micro-batches set how squares are summed; the spill size shows in the metadata
        "micro_batch_tokens": micro_batch_tokens, "spill_bytes": spill_bytes, "versions": versions("stepq", "torch", "transformers"),
    }
    if executor is not None:  # sharded sums of squares may round apart from a local run's: never mixed in one file
        inputs["executor"] = executor
    return digest(inputs)


def _stats(layer: int) -> str:
    return f"stats-{layer:03d}"


def _act(layer: int) -> str:
    return f"act-{layer:03d}"


class LayerCheckpoints:
    """`calib.stream.Checkpoints` for one calibration output, restoring into and saving from `collector`."""

    def __init__(self, folder: Path):
        self.dir = Path(folder)
        self.opened = False  # this run has taken the folder over (before that, an error leaves it alone)
        self.kept = False    # it holds finished layers: an interrupted run leaves it for a resume
        self._collector: StatsCollector | None = None
        self._stages: Stages | None = None
        self._key = ""
        self._chain: list[int] = []  # an earlier run's intact layers, 0..n

    def open(self, key: str, collector: StatsCollector, force: bool) -> None:
        """Take up an earlier run's folder if it has the same key (never with `force`), else start an empty one."""
        self._collector, self._key = collector, key
        if force and self.dir.is_dir():
            log.info("%s: starting over (--force)", self.dir)
            shutil.rmtree(self.dir)
        existed = (self.dir / LEDGER_NAME).is_file()
        self._stages = Stages(self.dir, {"stepq_ledger": "calibration", "version": LEDGER_VERSION, "key": key})
        if self._stages.ledger.resumed:
            self._chain = self._intact_chain()
        elif existed:
            log.info("%s: the interrupted run was for other inputs or settings; starting over", self.dir)
        self._keep_only(self._chain)
        self.opened, self.kept = True, bool(self._chain)

    def _intact_chain(self) -> list[int]:
        """The layers from 0 whose statistics files are intact, up to the last whose output is intact, too (earlier
        layers' outputs are gone by design)."""
        recorded = sum(1 for u, r in self._stages.ledger.units.items() if u.startswith("stats-") and r["outputs"])
        chain = []
        while self._stages.intact(_stats(len(chain)), self._key):
            chain.append(len(chain))
        while chain and not (self._stages.intact(_act(chain[-1]), self._key) and self._activations(chain[-1])):
            chain.pop()
        if len(chain) < recorded:
            log.warning("%s: %d of %d finished layers intact; redoing the rest", self.dir, len(chain), recorded)
        return chain

    def _activations(self, layer: int) -> tuple[list[int], torch.dtype] | None:
        """(shape, dtype) of `layer`'s recorded output when they describe its file exactly, else None (redo it)."""
        rec = self._stages.ledger.units[_act(layer)]
        shape, dtype = rec.get("shape"), ACTIVATION_DTYPES.get(rec.get("dtype"))
        size = (rec["outputs"].get(f"{_act(layer)}.bin") or {}).get("size")
        if (dtype is None or not isinstance(shape, list) or len(shape) != 3
                or not all(type(d) is int and 0 < d < 2**40 for d in shape)
                or math.prod(shape) * dtype.itemsize != size):
            log.warning("%s: the record of %s does not describe its file; redoing it", self._stages.ledger.path,
                        _act(layer))
            return None
        return shape, dtype

    def _keep_only(self, chain: list[int]) -> None:
        """Remove what `chain` does not use: later layers, temporary and spilled files of a killed run."""
        keep = {LEDGER_NAME} | {f"{_stats(n)}.safetensors" for n in chain}
        if chain:
            keep.add(f"{_act(chain[-1])}.bin")
        for p in self.dir.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def resume(self, spill_bytes: int) -> tuple[int, Activations] | None:
        """Restore the statistics of the intact layers; -> (the last of them, its output) or None (start over)."""
        if not self._chain:
            return None
        for n in self._chain:
            path = self.dir / f"{_stats(n)}.safetensors"
            if hasattr(self._collector, "restore_file"):  # a collector that reads its finished layers in place
                self._collector.restore_file(path)
            else:
                self._collector.restore_state(load_file(path))
        last = self._chain[-1]
        shape, dtype = self._activations(last)
        output = Activations(shape, dtype, spill_bytes, file=self.dir / f"{_act(last)}.bin", create=False)
        log.info("resumed: %d layers reused from the interrupted run (%s); continuing at layer %d",
                 len(self._chain), self.dir, last + 1)
        return last, output

    def spill_file(self, layer: int) -> Path:
        return self.dir / f"{_act(layer)}.bin.tmp"

    def commit(self, layer: int, output: Activations) -> None:
        """Persist what `layer` added to the statistics and its output, then record both; earlier outputs go."""
        stats, act = f"{_stats(layer)}.safetensors", f"{_act(layer)}.bin"
        state = save(self._collector.take_state())
        try:
            self._stages.make(_stats(layer), self._key, lambda d: (d / stats).write_bytes(state))
            self._stages.make(_act(layer), self._key, lambda d: output.save(d / act), layer=layer,
                              shape=list(output.shape), dtype=str(output.dtype).removeprefix("torch."))
        except WriteFailed as e:  # the caller says what a failed write of the statistics keeps
            raise (e.__cause__ if isinstance(e.__cause__, OSError) else e) from None
        if output.on_disk:
            output.file = self.dir / act  # moved there with its record; still the same memory-mapped file
        self.kept = True
        self._drop_outputs_before(self.dir / act)

    def _drop_outputs_before(self, act: Path) -> None:
        """The next layer starts from `act`: earlier outputs are no longer needed (a run killed before this point
        leaves two, and resumes from the older one if the newer is damaged)."""
        older = [u for u, r in self._stages.ledger.units.items() if u.startswith("act-") and r["outputs"]
                 and f"{u}.bin" != act.name]
        self._stages.forget(*older)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
