"""GGUF conversion cost: stepq's export vs llama.cpp's own converter on the same checkpoint.

For BF16 and Q8_0, each in a child process: wall time, peak RSS (VmHWM: includes the memory-mapped safetensors
pages it touched) and peak anonymous memory (RssAnon: the memory the process allocates itself), both read from
/proc every 10 ms (VmHWM is a high-water mark, so only the last 10 ms can escape it). Not wait4's ru_maxrss: Linux
folds the parent's high-water mark into an exec'd child's, so every child would report this script's RSS. For
  - stepq `write_gguf` (convert.gguf_export: the same file as the converter, which is checked byte for byte),
  - `stepq quantize --scheme gguf --qtype T` (the whole command: + sha256 of the source files, stepq.json with every
    tensor's type read back, atomic folder),
  - llama.cpp's `convert_hf_to_gguf.py --outtype bf16|q8_0` (the vendored tree's, with its gguf-py),
  - `python -c "import torch, gguf"`: the start-up floor both pay.
Default input: the bundled fixture (24 MB, so start-up dominates); `--random` also builds a larger random
Step-3.5-shaped checkpoint (convert.fixtures; 64 experts of 512 x 1024, ~0.7 GB BF16); any MODEL folder works,
e.g. bench/gen_real_shaped.py's real-shaped ones (given the fixture's tokenizer when they have none).

Writes bench/results/gguf_convert.json and prints the table.
Usage: .venv/bin/python bench/gguf_convert.py [MODEL] [--random] [--outtypes BF16,Q8_0]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convert.fixtures import BUNDLED_FIXTURE, fixture_config, write_random_checkpoint
from convert.gguf_tools import reference_converter_cmd

# larger than the fixture, same layout: 3 MoE layers of 64 experts, 2 dense + 2 MTP layers
RANDOM_DIMS = {"hidden_size": 1024, "intermediate_size": 2048, "moe_num_experts": 64, "moe_top_k": 4,
               "moe_intermediate_size": 512, "share_expert_dim": 512}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmHWM", "RssAnon"):
                out[key] = int(line.split()[1])
    except OSError:  # exited between two samples
        pass
    return out


def measured(cmd: list[str], log: Path, cwd: Path = ROOT) -> dict:
    """Run `cmd`; -> seconds, peak RSS (VmHWM) and peak RssAnon of the child, sampled every 10 ms."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
    peak = {"VmHWM": 0, "RssAnon": 0}

    def sample():
        while p.poll() is None:
            for k, v in _status_kib(p.pid).items():
                peak[k] = max(peak[k], v)
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    p.wait()
    seconds = time.perf_counter() - t0
    th.join()
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {p.returncode}:\n{log.read_text()[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(peak["VmHWM"] / 1024, 1),
            "peak_rss_anon_mib": round(peak["RssAnon"] / 1024, 1)}


def best_of(n: int, cmd: list[str], log: Path, cleanup: Path) -> dict:
    """`n` runs (this box is shared): the fastest time, the largest memory figures, every time."""
    runs = []
    for _ in range(n):
        if cleanup.is_dir():  # the previous run's output: stepq refuses to overwrite an artifact folder
            shutil.rmtree(cleanup)
        else:
            cleanup.unlink(missing_ok=True)
        runs.append(measured(cmd, log))
    return {"seconds": min(r["seconds"] for r in runs), "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "peak_rss_anon_mib": max(r["peak_rss_anon_mib"] for r in runs), "all_seconds": [r["seconds"] for r in runs]}


def bench_model(model: Path, outtypes: list[str], work: Path, repeat: int) -> dict:
    source_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    py = sys.executable
    write = "import sys; from convert.gguf_export import write_gguf; write_gguf(sys.argv[1], sys.argv[2], sys.argv[3])"
    res = {"model": str(model), "source_bytes": source_bytes,
           "startup": best_of(repeat, [py, "-c", "import torch, gguf"], work / "startup.log", work / "none"),
           "outtypes": {}}
    for outtype in outtypes:
        o = work / outtype
        o.mkdir()
        rows = {
            "stepq write_gguf": best_of(repeat, [py, "-c", write, str(model), str(o / "stepq.gguf"), outtype],
                                        o / "stepq.log", o / "stepq.gguf"),
            "stepq quantize (CLI)": best_of(repeat, [py, "-m", "stepq.cli", "quantize", str(model), "--scheme", "gguf",
                                                     "--qtype", outtype, "--out", str(o / "cli")], o / "cli.log",
                                            o / "cli"),
            "llama.cpp convert_hf_to_gguf.py": best_of(
                repeat, reference_converter_cmd(model, o / "ref.gguf", "--outtype", outtype.lower()), o / "ref.log",
                o / "ref.gguf"),
        }
        identical = filecmp.cmp(o / "stepq.gguf", o / "ref.gguf", shallow=False)  # chunked: files are GBs
        res["outtypes"][outtype] = {"gguf_bytes": (o / "ref.gguf").stat().st_size,
                                    "stepq_identical_to_converter": identical, "runs": rows}
        shutil.rmtree(o)
    return res


def with_tokenizer(model: Path, work: Path) -> Path:
    """`model` itself, or for a checkpoint without a tokenizer (bench/gen_real_shaped.py writes none) a folder of
    hard links to its files (stepq refuses symlinks leaving a model folder; a copy where linking fails) plus the
    fixture's tokenizer, which both converters pad to config.json's vocab_size with `[PAD<i>]` tokens. The source
    folder is never written to."""
    if (model / "tokenizer.json").is_file():
        return model
    view = work / f"{model.name}+fixture-tokenizer"
    view.mkdir()
    for f in model.iterdir():
        if f.is_file() and not f.name.startswith("."):
            try:
                os.link(f, view / f.name)
            except OSError:
                shutil.copy(f, view / f.name)
    for f in TOKENIZER_FILES:
        if (BUNDLED_FIXTURE / f).is_file() and not (view / f).exists():
            shutil.copy(BUNDLED_FIXTURE / f, view / f)
    return view


def random_checkpoint(work: Path) -> Path:
    d = write_random_checkpoint(work / "random-step35", fixture_config(**RANDOM_DIMS), num_shards=2)
    for f in TOKENIZER_FILES:
        if (BUNDLED_FIXTURE / f).is_file():
            shutil.copy(BUNDLED_FIXTURE / f, d / f)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=str(BUNDLED_FIXTURE))
    ap.add_argument("--random", action="store_true", help="also a ~0.6 GB random checkpoint (RANDOM_DIMS)")
    ap.add_argument("--outtypes", default="BF16,Q8_0")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each command: fastest time, largest memory")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gguf_convert.json"))
    args = ap.parse_args()
    outtypes = args.outtypes.split(",")
    results = {"cpus": os.cpu_count(), "repeat": args.repeat, "models": []}
    with tempfile.TemporaryDirectory(prefix="gguf-convert-") as tmp:
        work = Path(tmp)
        models = [Path(args.model)] + ([random_checkpoint(work)] if args.random else [])
        for i, model in enumerate(models):
            (work / str(i)).mkdir()
            results["models"].append(bench_model(with_tokenizer(model, work), outtypes, work / str(i), args.repeat))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for m in results["models"]:
        s = m["startup"]
        print(f"\n{m['model']}: {m['source_bytes'] / 1e6:.1f} MB of safetensors; start-up floor (import torch, "
              f"gguf) {s['seconds']:.1f} s, RSS {s['peak_rss_mib']:.0f} MiB, RssAnon {s['peak_rss_anon_mib']:.0f} MiB")
        print(f"{'type':5s} {'tool':33s} {'time s':>7s} {'peak RSS MiB':>13s} {'peak RssAnon MiB':>17s}")
        for outtype, r in m["outtypes"].items():
            for tool_name, x in r["runs"].items():
                print(f"{outtype:5s} {tool_name:33s} {x['seconds']:7.1f} {x['peak_rss_mib']:13.0f} "
                      f"{x['peak_rss_anon_mib']:17.0f}")
            print(f"      {r['gguf_bytes'] / 1e6:.1f} MB GGUF; stepq byte-identical to the converter: "
                  f"{r['stepq_identical_to_converter']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
