"""The `stepq` command: one subcommand per stage. Exit codes: 0 ok, 1 failed check, 2 bad input."""

from __future__ import annotations

import argparse
import json
import sys

from convert.errors import BadInput

NOT_YET = {
    "calibrate": "layer-streamed calibration",
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


def _cmd_quantize(args) -> int:
    from convert.hub import resolve_model
    from stepq.quantize import quantize

    if args.scheme == "gguf":
        print("stepq quantize --scheme gguf: GGUF export is not implemented yet (tracked in the GGUF issue)",
              file=sys.stderr)
        return 2
    folder = resolve_model(args.model, args.revision)
    out = quantize(folder, args.scheme, args.out, recipe_file=args.recipe, force=args.force,
                   max_shard_bytes=args.max_shard_size, source_id=args.model, revision=args.revision)
    print(out)
    return 0


def _size(text: str) -> int:
    """'5GB', '500MB', '123' -> bytes (decimal units, as the Hub counts them)."""
    t = text.strip().upper()
    for unit, mult in (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(float(t))


def _not_yet(name: str):
    def run(args) -> int:
        print(f"stepq {name}: {NOT_YET[name]} is not implemented yet", file=sys.stderr)
        return 2
    return run


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

    s = sub.add_parser("quantize", help="write one quantized variant")
    s.add_argument("model")
    s.add_argument("--scheme", required=True,
                   help="bundled recipe: fp8-block, fp8-block-all, fp8-dynamic, nvfp4a16 (gguf: later)")
    s.add_argument("--recipe", help="a YAML recipe file instead of the bundled one")
    s.add_argument("--out", default="out", help="artifacts land in OUT/<model>-<VARIANT>/")
    s.add_argument("--revision")
    s.add_argument("--qtype", help="GGUF quant type (GGUF export: later)")
    s.add_argument("--force", action="store_true", help="replace an existing artifact")
    s.add_argument("--max-shard-size", type=_size, default=None, help="cap per output shard, e.g. 5GB (default)")
    s.set_defaults(run=_cmd_quantize)

    for name in NOT_YET:
        s = sub.add_parser(name, help=f"{NOT_YET[name]} (not implemented yet)")
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(run=_not_yet(name))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BadInput as e:
        print(f"stepq: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
