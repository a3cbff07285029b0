"""Fault-injection soak: SIGKILL `stepq quantize` at random points, re-run the same command until it finishes, and
check the artifact is byte-identical to an uninterrupted run and never appeared under its final name unfinished.

Each round starts from an empty output folder and kills successive runs of the same command; a run that is not
killed must finish (exit 0) with the reference bytes. Kill points, from a seeded RNG: after a random number of
committed units (read from the progress file, so the points spread over the whole write phase whatever the machine's
speed) plus a few milliseconds, or at a random time since the process started (imports, validation, planning,
locking). A watcher thread polls for the final folder and records what it holds the moment it appears.

`--calibrate-kills N` also kills `stepq calibrate` N times, in the same kind of rounds: each re-run resumes after the
last layer a killed run checkpointed, the finished statistics must equal an uninterrupted run's (tensors and
metadata, but the run's timings and peak memory), and the statistics file is never visible unfinished.

Usage: .venv/bin/python bench/fault_soak.py [MODEL] [--kills 200] [--calibrate-kills 20] [--seed 1]
       [--schemes fp8-block-all,nvfp4a16]
Writes bench/results/fault_soak.json. tests/test_resume.py runs the quantize rounds with 20 kills,
tests/test_resume_calibrate.py the calibrate rounds with 6.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from convert.ledger import LEDGER_NAME

ROOT = Path(__file__).resolve().parent.parent
STEPQ = [sys.executable, "-m", "stepq.cli"]
# stepq.json fields that describe the run rather than the artifact (wall times, peak memory of that process).
RUN_FIELDS = ("timings", "peak_rss_mib", "executor")  # the executor: local or Ray, same bytes (tests/test_ray.py)


def artifact_digest(folder: Path) -> dict[str, str]:
    """sha256 per file; stepq.json without its RUN_FIELDS."""
    digest = {}
    for p in sorted(folder.iterdir()):
        data = p.read_bytes()
        if p.name == "stepq.json":
            prov = json.loads(data)
            for k in RUN_FIELDS:
                prov.pop(k, None)
            data = json.dumps(prov, sort_keys=True).encode()
        digest[p.name] = hashlib.sha256(data).hexdigest()
    return digest


def _file_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class FinalWatcher(threading.Thread):
    """Polls for the final folder (or file); each time it (re)appears, records `look(final)` at that instant: by
    default the names of the folder's files."""

    def __init__(self, final: Path, every_s: float = 0.001, look=_file_names):
        super().__init__(daemon=True)
        self.final, self.every_s, self.look = final, every_s, look
        self.sightings: list = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        present = False
        while not self._stop_event.is_set():
            try:
                seen = self.look(self.final)
            except FileNotFoundError:
                present = False
            else:
                if not present:
                    self.sightings.append(seen)
                present = True
            time.sleep(self.every_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


@dataclass
class Figures:
    kills: int = 0
    runs: int = 0
    rounds: int = 0
    resumed_runs: int = 0  # runs that reused units finished by a killed one
    units_reused: int = 0
    identical_rounds: int = 0
    partial_sightings: int = 0  # final folder (statistics file) seen other than finished: must stay 0
    calibrate_kills: int = 0
    calibrate_runs: int = 0
    calibrate_rounds: int = 0
    calibrate_identical: int = 0
    calibrate_resumed_runs: int = 0  # runs that continued after layers a killed run checkpointed
    calibrate_layers_reused: int = 0
    stray_files: list[str] = field(default_factory=list)  # anything but the lock and the temp folder after a kill
    kill_points: dict[str, int] = field(default_factory=dict)


def _progress_lines(progress: Path) -> int:
    try:
        return progress.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _units_done(progress: Path, field: str = "unit", prefix: str = "") -> int:
    """Finished units in a ledger: the distinct `field` values (starting with `prefix`) of the lines that start with
    `field` (quantize: every unit; calibrate: "stats-" units, one per layer)."""
    try:
        lines = progress.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return len({v for line in lines if line.startswith(f'{{"{field}"')
                and str(v := json.loads(line)[field]).startswith(prefix)})


def _run_once(cmd: list[str], progress: Path, rng: random.Random, units: int, kill: bool, log: Path,
              startup_s: float, prefix: str = "", settle_s: float = 0.02) -> tuple[int | None, str]:
    """One run; with `kill`, SIGKILL at a random point: a random time after the start, or up to `settle_s` after a
    random number of further progress lines. -> (exit code or None if killed, kill point kind)."""
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    if not kill:
        return p.wait(), "none"
    if rng.random() < 0.25:
        kind, deadline, target = "time", time.time() + rng.uniform(0, startup_s), None
    else:
        # a run appends the header (if new), a line per unit it finishes, then a memo line per source shard:
        # aim anywhere in what is left, up to just past the last unit (provenance, publish)
        left = units - _units_done(progress, "unit", prefix)
        kind, deadline, target = "progress", None, _progress_lines(progress) + rng.randint(1, left + 1)
    while p.poll() is None:
        if (deadline is not None and time.time() >= deadline) or (
                target is not None and _progress_lines(progress) >= target):
            time.sleep(rng.uniform(0, settle_s))  # between two commits, not always right after one
            if p.poll() is not None:
                break  # it finished meanwhile: not a kill
            p.send_signal(signal.SIGKILL)
            p.wait()
            return None, kind
        time.sleep(0.001)
    return p.returncode, kind


def kill_resume_round(cmd: list[str], out: Path, final: Path, reference: dict[str, str], rng: random.Random,
                      units: int, max_kills: int, figures: Figures, startup_s: float = 6.0) -> None:
    """Kill successive runs of `cmd` (writing `final` under `out`) up to `max_kills` times, then let one finish;
    the artifact must equal `reference`. Figures are added to `figures`; mismatches raise AssertionError."""
    progress = final.parent / f".{final.name}.partial" / LEDGER_NAME
    watcher = FinalWatcher(final)
    watcher.start()
    kills = 0
    try:
        while True:
            log = out.parent / f"{final.name}-run{figures.runs}.err"
            code, kind = _run_once(cmd, progress, rng, units, kills < max_kills, log, startup_s)
            figures.runs += 1
            text = log.read_text()
            if m := re.search(r"resumed: (\d+) of \d+ units reused", text):
                figures.resumed_runs += 1
                figures.units_reused += int(m.group(1))
            if code is None:
                kills += 1
                figures.kills += 1
                figures.kill_points[kind] = figures.kill_points.get(kind, 0) + 1
                ours = {f".{final.name}.lock", f".{final.name}.partial", final.name}
                figures.stray_files += [p.name for p in out.iterdir() if final.name in p.name and p.name not in ours]
                if final.exists():
                    break  # killed after the rename: the artifact is complete, nothing left to resume
                continue
            assert code == 0, f"run exited {code}:\n{text}"
            break
    finally:
        watcher.stop()
    figures.rounds += 1
    done = sorted(reference)
    figures.partial_sightings += sum(1 for names in watcher.sightings if names != done)
    assert watcher.sightings, "the final folder never appeared"
    got = artifact_digest(final)
    assert got == reference, {k: (got.get(k), reference[k]) for k in reference if got.get(k) != reference[k]}
    figures.identical_rounds += 1
    # after a finished run nothing else is left; after a kill past the rename, only that run's (stale) lock file
    allowed = {final.name} | ({f".{final.name}.lock"} if code is None else set())
    leftovers = [p.name for p in out.iterdir() if final.name in p.name and p.name not in allowed]
    assert not leftovers, leftovers


def stats_digest(path: Path) -> str:
    """sha256 over a statistics file's tensors and its metadata without the run's timings and peak memory."""
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["stepq_calibration"])
        for k in RUN_FIELDS:
            meta.pop(k, None)
        h.update(json.dumps(meta, sort_keys=True).encode())
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            h.update(name.encode() + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _stats_look(path: Path) -> str:
    """What the watcher records of a statistics file the moment it appears: its digest, or that it is unreadable."""
    try:
        return stats_digest(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - a torn file fails to parse in many ways: that is the finding
        return f"unreadable: {e.__class__.__name__}"


def calibrate_round(cmd: list[str], stats: Path, reference: str, rng: random.Random, layers: int, max_kills: int,
                    figures: Figures, startup_s: float, layer_s: float) -> None:
    """Kill successive runs of the calibrate `cmd` (writing `stats`) up to `max_kills` times, then let one finish;
    the statistics must equal `reference`. Kills come at a random time up to `startup_s`, or up to `layer_s` after a
    random number of finished layers. Figures are added to `figures`; mismatches raise AssertionError."""
    progress = stats.parent / f".{stats.name}.partial" / LEDGER_NAME
    out = stats.parent.parent
    watcher = FinalWatcher(stats, look=_stats_look)
    watcher.start()
    kills = 0
    try:
        while True:
            log = out.parent / f"{out.name}-run{figures.calibrate_runs}.err"
            code, kind = _run_once(cmd, progress, rng, layers, kills < max_kills, log, startup_s, prefix="stats-",
                                   settle_s=layer_s)
            figures.calibrate_runs += 1
            text = log.read_text()
            if m := re.search(r"resumed: (\d+) layers reused", text):
                figures.calibrate_resumed_runs += 1
                figures.calibrate_layers_reused += int(m.group(1))
            if code is None:
                kills += 1
                figures.calibrate_kills += 1
                figures.kill_points[f"calibrate-{kind}"] = figures.kill_points.get(f"calibrate-{kind}", 0) + 1
                if stats.parent.is_dir():  # the checkpoints, a statistics file cut short: the next run takes them
                    figures.stray_files += [p.name for p in stats.parent.iterdir() if p.name != stats.name and not
                                            p.name.startswith((f".{stats.name}.partial", f".{stats.name}.tmp-"))]
                if stats.exists():
                    break  # killed after the rename: the statistics are complete
                continue
            assert code == 0, f"run exited {code}:\n{text}"
            break
    finally:
        watcher.stop()
    figures.calibrate_rounds += 1
    figures.partial_sightings += sum(1 for seen in watcher.sightings if seen != reference)
    assert watcher.sightings, "the statistics file never appeared"
    assert stats_digest(stats) == reference
    figures.calibrate_identical += 1
    # after a finished run only the statistics are left; after a kill past the rename, the checkpoints may be too
    leftovers = [p.name for p in stats.parent.iterdir() if p.name != stats.name]
    assert not leftovers or (code is None and leftovers == [f".{stats.name}.partial"]), leftovers


def calibrate_soak(model: Path, kills: int, rng: random.Random, work: Path, figures: Figures,
                   args: tuple[str, ...] = ("--num-samples", "4", "--seq-len", "64"),
                   max_kills_per_round: int = 6) -> None:
    """Kill `stepq calibrate` at random points, `kills` times in all, in rounds (`calibrate_round`) that each start
    from an empty output folder."""
    from calib.stats import CalibStats
    from convert.config import load_config

    ref = work / "calib-ref"
    t0 = time.time()
    subprocess.run([*STEPQ, "calibrate", str(model), "--out", str(ref), *args], check=True, cwd=ROOT,
                   capture_output=True)
    full_s = time.time() - t0
    (stats_ref,) = ref.glob("*-calib/stats.safetensors")
    reference = stats_digest(stats_ref)
    layers = load_config(model).num_layers
    layer_s = CalibStats.load(stats_ref).meta["timings"]["stream_s"] / layers
    r = 0
    while figures.calibrate_kills < kills:
        out = work / f"calib-round{r}"
        stats = out / stats_ref.parent.name / stats_ref.name
        cmd = [*STEPQ, "calibrate", str(model), "--out", str(out), *args]
        calibrate_round(cmd, stats, reference, rng, layers, min(max_kills_per_round, kills - figures.calibrate_kills),
                        figures, full_s, layer_s)
        r += 1


def units_of(model: Path, scheme: str) -> int:
    from convert.checkpoint import open_checkpoint
    from convert.safetensors_export import load_recipe, plan_units

    ckpt = open_checkpoint(model)
    try:
        return len(plan_units(ckpt, load_recipe(scheme)))
    finally:
        ckpt.close()


def soak(model: Path, schemes: list[str], kills: int, seed: int, work: Path, max_kills_per_round: int = 6,
         extra: tuple[str, ...] = ("--max-shard-size", "4MB")) -> tuple[Figures, dict]:
    rng = random.Random(seed)
    figures, refs = Figures(), {}
    for scheme in schemes:
        out = work / f"ref-{scheme}"
        t0 = time.time()
        subprocess.run([*STEPQ, "quantize", str(model), "--scheme", scheme, "--out", str(out), *extra], check=True,
                       cwd=ROOT, capture_output=True)
        final = next(p for p in out.iterdir() if p.is_dir())
        refs[scheme] = (artifact_digest(final), final.name, units_of(model, scheme), time.time() - t0)
    r = 0
    while figures.kills < kills:
        scheme = schemes[r % len(schemes)]
        reference, name, units, full_s = refs[scheme]
        out = work / f"round{r}"
        out.mkdir()
        cmd = [*STEPQ, "quantize", str(model), "--scheme", scheme, "--out", str(out), *extra]
        kill_resume_round(cmd, out, out / name, reference, rng, units,
                          min(max_kills_per_round, kills - figures.kills), figures, startup_s=full_s)
        r += 1
    return figures, {s: {"units": v[2], "uninterrupted_s": round(v[3], 2)} for s, v in refs.items()}


def main() -> None:
    sys.path.insert(0, str(ROOT))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "fixtures" / "tiny-step35"))
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--calibrate-kills", type=int, default=0)
    ap.add_argument("--schemes", default="fp8-block-all,nvfp4a16")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="stepq-soak-") as work:
        figures, refs = soak(Path(args.model), args.schemes.split(","), args.kills, args.seed, Path(work))
        if args.calibrate_kills:
            calibrate_soak(Path(args.model), args.calibrate_kills, random.Random(args.seed), Path(work), figures)
    result = {"model": args.model, "seed": args.seed, "schemes": refs, "wall_s": round(time.time() - t0, 1),
              **figures.__dict__, "data_lost": figures.rounds - figures.identical_rounds}
    print(json.dumps(result, indent=2))
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "fault_soak.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
