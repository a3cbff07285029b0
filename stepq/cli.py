"""The `stepq` command: one subcommand per stage. Exit codes: 0 ok, 1 failed check, 2 bad input."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from convert.errors import BadInput

NOT_YET = {
    "eval": "accuracy and speed evals",
    "gate": "the publishing gate",
    "publish": "Hub publishing",
}


def _cmd_inspect(args) -> int:
    from convert.checkpoint import open_checkpoint
    from convert.hub import resolve_model
    from stepq.inspect import render, summarize

    ckpt = open_checkpoint(resolve_model(args.model, args.revision))
    try:
        s = summarize(ckpt)
    finally:
        ckpt.close()
    print(json.dumps(s, indent=2) if args.json else render(s))
    return 0


def _cmd_pull(args) -> int:
    from convert.hub import pull

    print(pull(args.model, args.revision, args.cache_dir))
    return 0


def _calibration_settings(args) -> dict:
    return {"dataset": args.dataset, "n": args.num_samples, "seq_len": args.seq_len, "seed": args.seed,
            "all_experts": args.all_experts}


def _cmd_calibrate(args) -> int:
    from convert.hub import resolve_model
    from stepq.calibrate import calibrate

    folder = resolve_model(args.model, args.revision)
    print(calibrate(folder, out_root=args.out, force=args.force, **_calibration_settings(args)))
    return 0


def _cmd_quantize(args) -> int:
    from calib.stats import CalibStats
    from convert.hub import resolve_model
    from quant.layouts import NEEDS_ACTIVATION_STATS
    from stepq.calibrate import calibrate
    from stepq.quantize import load_recipe, quantize

    folder = resolve_model(args.model, args.revision)
    if args.scheme == "gguf":
        from stepq.gguf import export_gguf

        imatrix = None
        if args.imatrix:
            imatrix = args.stats or calibrate(folder, out_root=args.out, **_calibration_settings(args))
        print(export_gguf(folder, args.out, qtype=args.qtype or "Q4_K_M", mtp=not args.no_mtp, force=args.force,
                          max_shard_bytes=args.max_shard_size, source_id=args.model, revision=args.revision,
                          imatrix=imatrix))
        return 0
    stats = None
    if load_recipe(args.scheme, args.recipe).scheme in NEEDS_ACTIVATION_STATS or args.method == "search":
        # Reuses out/<model>-calib/stats.safetensors when source, dataset and settings match; else calibrates.
        path = args.stats or calibrate(folder, out_root=args.out, **_calibration_settings(args))
        stats = CalibStats.load(path)
    out = quantize(folder, args.scheme, args.out, recipe_file=args.recipe, force=args.force,
                   max_shard_bytes=args.max_shard_size, source_id=args.model, revision=args.revision, stats=stats,
                   method=args.method)
    print(out)
    return 0


def _size(text: str) -> int:
    """'5GB', '500MB', '123' -> bytes (decimal units, as the Hub counts them)."""
    t = text.strip().upper()
    for unit, mult in (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(float(t))


def _cmd_verify(args) -> int:
    from eval.vllm_conformance import VllmEnvError, ensure_vllm_env, summary, verify_vllm

    try:
        ensure_vllm_env()
    except VllmEnvError as e:
        raise BadInput(str(e))
    ok = True
    for artifact in args.artifacts:
        report = verify_vllm(artifact)
        print(summary(report))
        ok = ok and bool(report.get("ok"))
    return 0 if ok else 1


def _not_yet(name: str):
    def run(args) -> int:
        print(f"stepq {name}: {NOT_YET[name]} is not implemented yet", file=sys.stderr)
        return 2
    return run


def _add_calibration_args(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("calibration (schemes with static activation scales)")
    g.add_argument("--dataset", help="local .jsonl/.json/.parquet/.txt file or folder, or a Hub dataset id "
                                      "(default: the bundled held-out text for the fixture, ultrachat for real models)")
    g.add_argument("--num-samples", type=int, help="N calibration sequences")
    g.add_argument("--seq-len", type=int, help="L tokens per sequence")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--all-experts", action="store_true",
                   help="every token also reaches every expert, for statistics only (routing stays top-k)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stepq", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="roles, counts, dtypes and bytes of a checkpoint")
    s.add_argument("model", help="local folder or Hub id")
    s.add_argument("--revision")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(run=_cmd_inspect)

    s = sub.add_parser("pull", help="download safetensors + config + tokenizer (never pickles), or check a folder")
    s.add_argument("model")
    s.add_argument("--revision")
    s.add_argument("--cache-dir")
    s.set_defaults(run=_cmd_pull)

    s = sub.add_parser("calibrate", help="layer-streamed calibration -> statistics reused by every format")
    s.add_argument("model")
    s.add_argument("--out", default="out", help="writes OUT/<model>-calib/stats.safetensors")
    s.add_argument("--revision")
    s.add_argument("--force", action="store_true", help="recompute even when a matching statistics file exists")
    _add_calibration_args(s)
    s.set_defaults(run=_cmd_calibrate)

    s = sub.add_parser("quantize", help="write one quantized variant")
    s.add_argument("model")
    s.add_argument("--scheme", required=True,
                   help="bundled recipe: fp8-block, fp8-block-all, fp8-dynamic, fp8-static, nvfp4, nvfp4a16, "
                        "nvfp4-modelopt, gguf (with --qtype)")
    s.add_argument("--recipe", help="a YAML recipe file instead of the bundled one")
    s.add_argument("--out", default="out", help="artifacts land in OUT/<model>-<VARIANT>/")
    s.add_argument("--revision")
    s.add_argument("--qtype", help="GGUF type with --scheme gguf: Q4_K_M (default), Q5_K_M, Q6_K, IQ4_XS, Q8_0, BF16, ...")
    s.add_argument("--no-mtp", action="store_true", help="GGUF: drop the MTP layers (kept as blk.N.nextn.* by default)")
    s.add_argument("--imatrix", action="store_true",
                   help="GGUF K/IQ types: quantize with an importance matrix from stepq's calibration statistics")
    s.add_argument("--force", action="store_true", help="replace an existing artifact")
    s.add_argument("--max-shard-size", type=_size, default=None, help="cap per output shard, e.g. 5GB (default)")
    s.add_argument("--stats", help="a statistics file from `stepq calibrate` (default: calibrate or reuse)")
    s.add_argument("--method", choices=["rtn", "search"], default="rtn",
                   help="rtn: round to nearest, bit-identical to compressed-tensors; search (NVFP4): per-group FP8 "
                        "scale search weighted by calibration importance, same format, lower error")
    _add_calibration_args(s)
    s.set_defaults(run=_cmd_quantize)

    s = sub.add_parser("verify", help="load artifacts with an engine's own loader (trunk and MTP drafter)")
    s.add_argument("artifacts", nargs="+")
    s.add_argument("--engine", choices=["vllm"], default="vllm",
                   help="vllm: vLLM's loader on CPU, in its own cached venv (`make vllm-env`)")
    s.set_defaults(run=_cmd_verify)

    for name in NOT_YET:
        s = sub.add_parser(name, help=f"{NOT_YET[name]} (not implemented yet)")
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(run=_not_yet(name))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="stepq: %(message)s")
    try:
        return args.run(args)
    except BadInput as e:
        print(f"stepq: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
