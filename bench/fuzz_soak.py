"""Fuzz soak of the readers that face untrusted files: the generator of tests/test_fuzz_readers.py for as many cases
as asked (the test runs ~10,000), spread over the readers in the test's proportions.

Usage: .venv/bin/python bench/fuzz_soak.py [--cases 200000] [--seed 0] [--reader safetensors|checkpoint|gguf|
       stepq-json|ledgers ...]
A failure prints its reader, seed and mutations; `--reader R --seed S --cases 1` replays that one case (with the
full traceback). Exit 1 when any case failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _load_fuzz():
    spec = importlib.util.spec_from_file_location("test_fuzz_readers", ROOT / "tests" / "test_fuzz_readers.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=200_000, help="total cases over the chosen readers")
    ap.add_argument("--seed", type=int, default=0, help="first seed: case i of a reader uses seed + i")
    ap.add_argument("--reader", action="append", help="only these readers (repeatable); default all")
    ap.add_argument("--memory-every", type=int, default=25, help="trace allocations of one case in N (0: none)")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs cost more than the work
    logging.disable(logging.WARNING)  # resumed ledgers log every damaged unit; failures are what matters here
    fz = _load_fuzz()
    share = dict(fz.READER_CASES, ledgers=fz.LEDGER_CASES)
    readers = args.reader or list(share)
    unknown = set(readers) - set(share)
    if unknown:
        ap.error(f"unknown reader(s) {sorted(unknown)}; known: {', '.join(share)}")
    total_share = sum(share[r] for r in readers)

    with tempfile.TemporaryDirectory(prefix="stepq-fuzz-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        R = fz.build_readers(root)
        if "ledgers" in readers:
            R.specs["ledgers"] = fz.ledger_cases(root)
        print(f"templates built in {time.perf_counter() - t0:.1f} s")
        if args.cases == 1 and len(readers) == 1:
            return _replay(fz, R, readers[0], args.seed)
        failed = 0
        print(f"{'reader':<12} {'cases':>8} {'read':>8} {'BadInput':>9} {'failed':>7} {'cases/s':>8} {'traced':>7}")
        for reader in readers:
            n = max(1, args.cases * share[reader] // total_share)
            tally = fz.run_reader(R, reader, n, first_seed=args.seed, memory_every=args.memory_every)
            failed += len(tally.failures)
            print(f"{reader:<12} {tally.cases:>8} {tally.ok:>8} {tally.bad_input:>9} {len(tally.failures):>7} "
                  f"{tally.cases / tally.seconds:>8.0f} {tally.memory_checked:>7}", flush=True)
            for f in tally.failures[:20]:
                print(f"  {f}")
            if len(tally.failures) > 20:
                print(f"  ... and {len(tally.failures) - 20} more")
    return 1 if failed else 0


def _replay(fz, R, reader: str, seed: int) -> int:
    """One case, with the reader's own traceback instead of the one-line summary."""
    make, check, names = R.specs[reader]
    ops: list[str] = []
    size, case_args = make(random.Random(f"{reader}:{seed}"), ops)
    print(f"{reader} seed={seed} ops={ops} ({size} bytes): {case_args}")
    try:
        check(*case_args)
    except fz.BadInput as e:
        ok = "\n" not in str(e) and names(str(e))
        print(f"BadInput ({'one line naming the file' if ok else 'NOT one line naming the file'}): {e}")
        return 0 if ok else 1
    except Exception:  # noqa: BLE001 - the point of a replay is the traceback
        traceback.print_exc()
        return 1
    print("read")
    return 0


if __name__ == "__main__":
    sys.exit(main())
