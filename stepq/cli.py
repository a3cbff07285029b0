"""The `stepq` command: one subcommand per stage. Exit codes: 0 ok, 1 failed check, 2 bad input."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from convert.errors import BadInput


def _cmd_inspect(args) -> int:
    from convert.checkpoint import open_checkpoint
    from convert.hub import resolve_model
    from convert.summary import render, summarize

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
            "all_experts": bool(args.all_experts), "device": args.device, "dtype": args.dtype}


def _cmd_calibrate(args) -> int:
    from convert.hub import resolve_model
    from stepq.calibrate import calibrate

    folder = resolve_model(args.model, args.revision)
    cluster = _cluster(args, folder)
    print(calibrate(folder, out_root=args.out, force=args.force, cluster=cluster, **_calibration_settings(args)))
    return 0


def _cluster(args, folder, also: list | None = None):
    """`--executor ray`: join (or start) the cluster and check that every node sees the source (and `also`) before
    anything is written -> the ray module; None for the local executor."""
    from pathlib import Path

    if args.executor != "ray":
        if args.ray_address:
            raise BadInput("--ray-address: applies to --executor ray")
        return None
    from convert.ray_executor import check_nodes_see, connect

    ray = connect(args.ray_address)
    folder = Path(folder)
    check_nodes_see([folder / "config.json", *sorted(folder.glob("*.safetensors")), *(also or [])])
    return ray


# Flags that only mean something for GGUF, for the safetensors schemes, or when calibration statistics are used:
# given where they do not apply, they are refused rather than silently ignored.
GGUF_ONLY = {"qtype": "--qtype", "no_mtp": "--no-mtp", "mtp_only": "--mtp-only", "imatrix": "--imatrix"}
SAFETENSORS_ONLY = {"recipe": "--recipe", "method": "--method", "allow_nonfinite": "--allow-nonfinite"}
CALIBRATION = {"stats": "--stats", "dataset": "--dataset", "num_samples": "--num-samples", "seq_len": "--seq-len",
               "all_experts": "--all-experts", "device": "--device", "dtype": "--dtype"}


def _given(args, flags: dict[str, str]) -> list[str]:
    return [flag for dest, flag in flags.items() if getattr(args, dest) not in (None, False)]


def _refuse(flags: list[str], why: str) -> None:
    if flags:
        raise BadInput(f"{', '.join(flags)}: {'does' if len(flags) == 1 else 'do'} not apply {why}")


def _cmd_quantize(args) -> int:
    from pathlib import Path

    from calib.stats import CalibStats
    from convert.hub import resolve_model
    from convert.safetensors_export import load_recipe
    from quant.layouts import NEEDS_ACTIVATION_STATS
    from stepq.calibrate import calibrate
    from stepq.quantize import quantize

    if args.scheme == "gguf":
        _refuse(_given(args, SAFETENSORS_ONLY), "to --scheme gguf (its recipe is --qtype)")
        if not args.imatrix:
            _refuse(_given(args, CALIBRATION), "to --scheme gguf without --imatrix (no calibration is used)")
    else:
        _refuse(_given(args, GGUF_ONLY), f"to --scheme {args.scheme} (GGUF only)")
        method = args.method or "rtn"
        if load_recipe(args.scheme, args.recipe).scheme not in NEEDS_ACTIVATION_STATS and method == "rtn":
            _refuse(_given(args, CALIBRATION), f"to --scheme {args.scheme} with --method rtn (data-free)")
    folder = resolve_model(args.model, args.revision)
    if args.stats:  # a file the user named: refuse one computed from another model before any work
        CalibStats.load(args.stats).check_source(folder)
    cluster = _cluster(args, folder, [Path(args.stats)] if args.stats else [])
    executor = None
    if cluster is not None:
        from convert.ray_executor import RayExecutor

        executor = RayExecutor()
    if args.scheme == "gguf":
        from convert.gguf_job import export_gguf

        imatrix = None
        if args.imatrix:
            imatrix = CalibStats.load(args.stats or calibrate(folder, out_root=args.out, cluster=cluster,
                                                              **_calibration_settings(args)))
        out = export_gguf(folder, args.out, qtype=args.qtype or "Q4_K_M", mtp=not args.no_mtp, force=args.force,
                          max_shard_bytes=args.max_shard_size, source_id=args.model, revision=args.revision,
                          imatrix=imatrix, mtp_only=args.mtp_only, executor=executor)
        if args.mtp_only:  # a draft-only file is not a release to eval on its own: keep pointing at the last one
            print(out)
        else:
            _remember(out)
        return 0
    stats = None
    if load_recipe(args.scheme, args.recipe).scheme in NEEDS_ACTIVATION_STATS or method != "rtn":
        # Reuses out/<model>-calib/stats.safetensors when source, dataset and settings match; else calibrates.
        path = args.stats or calibrate(folder, out_root=args.out, cluster=cluster, **_calibration_settings(args))
        stats = CalibStats.load(path)
        if cluster is not None and not args.stats:  # computed here (OUT/<model>-calib/): the workers read it too
            from convert.ray_executor import check_nodes_see

            check_nodes_see([Path(path)])
    out = quantize(folder, args.scheme, args.out, recipe_file=args.recipe, force=args.force,
                   max_shard_bytes=args.max_shard_size, source_id=args.model, revision=args.revision, stats=stats,
                   method=method, allow_nonfinite=args.allow_nonfinite, device=args.device, dtype=args.dtype,
                   executor=executor)
    _remember(out)
    return 0


def _remember(artifact) -> None:
    """Print the artifact and note it as OUT/.last-artifact: `make eval/gate/publish` default to it."""
    from pathlib import Path

    print(artifact)
    (Path(artifact).parent / ".last-artifact").write_text(f"{artifact}\n")


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


def _cmd_gate(args) -> int:
    from eval.gate import gate

    result = gate(args.artifact, policy=args.policy, baseline=args.baseline, endpoint=args.endpoint)
    print("\n".join(result.lines() + [result.summary()]))
    return 0 if result.passed else 1


def _cmd_publish(args) -> int:
    from eval.publish import PublishError, publish

    repo_id = args.repo_id
    if repo_id is None:
        if not args.dry_run:
            raise BadInput(f"{args.artifact}: publishing needs --repo-id org/name (REPO_ID= with make)")
        from pathlib import Path

        repo_id = f"your-namespace/{Path(args.artifact).resolve().name}"  # a dry run only shows the plan
    try:
        result = publish(args.artifact, repo_id, revision=args.revision, dry_run=args.dry_run,
                         private=args.private, create_pr=args.create_pr, endpoint=args.endpoint)
    except PublishError as e:
        print(f"stepq publish: {e}", file=sys.stderr)
        return 1
    print("\n".join(result.lines))
    return 0


def _cmd_eval(args) -> int:
    from convert.hub import resolve_model
    from stepq.evaluate import evaluate

    folder = resolve_model(args.model, args.revision)
    tasks = None if args.tasks is None else [t for t in args.tasks.split(",") if t]
    print(evaluate(args.artifact, folder, args.out, dataset=args.dataset, n=args.num_samples, seq_len=args.seq_len,
                   seed=args.seed, tasks=tasks, task_limit=args.task_limit, speed=not args.no_speed,
                   engine_check=not args.no_engine_check, force=args.force, device=args.device, dtype=args.dtype))
    return 0


def _add_calibration_args(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("calibration (schemes with static activation scales)")
    g.add_argument("--dataset", help="local .jsonl/.json/.parquet/.txt file or folder, or a Hub dataset id "
                                      "(default: the bundled held-out text for the fixture, ultrachat for real models); "
                                      "Step-3.7: image + text samples, a .jsonl of {image, text} rows or a folder of "
                                      "image + .txt pairs")
    g.add_argument("--num-samples", type=int, help="N calibration sequences")
    g.add_argument("--seq-len", type=int, help="L tokens per sequence")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--all-experts", action="store_true", default=None,
                   help="every token also reaches every expert, for statistics only (routing stays top-k)")
    _add_compute_args(g)


def _add_executor_args(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("scale out (Ray: pip install -e '.[ray]')")
    g.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local (default): this process; ray: conversion pieces and calibration shards run as Ray "
                        "tasks, same bytes, same resume. The source must be at the same path on every node")
    g.add_argument("--ray-address", help="the cluster to join, host:port as `ray start --head` prints it (default: "
                                         "RAY_ADDRESS; neither: start a local Ray on this machine)")


def _add_compute_args(g) -> None:
    g.add_argument("--device", help="where the layer-streamed forward runs: auto (default: a CUDA GPU if there is "
                                    "one, else the CPU), cpu, cuda, cuda:N")
    g.add_argument("--dtype",
                   help="activations between operations: bfloat16 (default; GEMMs accumulate in fp32, statistics "
                        "are fp32) or float32 (for comparisons)")


# ---- stepq sensitivity ------------------------------------------------------------------------------------------
def _cmd_sensitivity(args) -> int:
    from convert.hub import resolve_model
    from stepq.sensitivity import sensitivity, summary

    folder = resolve_model(args.model, args.revision)
    report = sensitivity(folder, args.scheme, args.out, budget_gb=args.budget_gb, budget_bpw=args.budget_bpw,
                         force=args.force, **_calibration_settings(args))
    print(summary(report))
    return 0


def _add_sensitivity_parser(sub) -> None:
    s = sub.add_parser("sensitivity", help="KLD cost of quantizing each (layer, role group) alone -> "
                                           "OUT/<model>-sensitivity/{sensitivity.json, heatmap.png}; with a budget, "
                                           "recipe.yaml keeping the most sensitive ones BF16")
    s.add_argument("model")
    s.add_argument("--scheme", default="nvfp4", help="a bundled safetensors recipe (default nvfp4: W4A4, measured "
                                                     "with the engine's activation quantization)")
    s.add_argument("--out", default="out", help="writes OUT/<model>-sensitivity/ (statistics: OUT/<model>-calib/)")
    s.add_argument("--revision")
    s.add_argument("--budget-gb", type=float,
                   help="write recipe.yaml: artifact weights within this many GB (decimal), most KLD per byte first")
    s.add_argument("--budget-bpw", type=float,
                   help="write recipe.yaml: at most this many bits per weight over the quantizable linears")
    s.add_argument("--force", action="store_true", help="measure again even when sensitivity.json matches")
    _add_calibration_args(s)
    s.set_defaults(run=_cmd_sensitivity)


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
    _add_executor_args(s)
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
    s.add_argument("--mtp-only", action="store_true",
                   help="GGUF: only the MTP head (+ token_embd, output_norm, output), a draft for llama.cpp's "
                        "--spec-draft-model next to a --no-mtp trunk -> OUT/<model>-GGUF-<QTYPE>-MTP/mtp-*.gguf")
    s.add_argument("--imatrix", action="store_true",
                   help="GGUF K/IQ types: quantize with an importance matrix from stepq's calibration statistics")
    s.add_argument("--force", action="store_true", help="replace an existing artifact; start over instead of "
                                                        "resuming an interrupted run")
    s.add_argument("--allow-nonfinite", action="store_true",
                   help="convert weights holding NaN/Inf (a warning per tensor) instead of refusing them")
    s.add_argument("--max-shard-size", type=_size, default=None, help="cap per output shard, e.g. 5GB (default)")
    s.add_argument("--stats", help="a statistics file from `stepq calibrate` (default: calibrate or reuse)")
    s.add_argument("--method", choices=["rtn", "search", "gptq", "gptq+search"],
                   help="safetensors schemes; rtn (default for data-free schemes): round to nearest, bit-identical "
                        "to compressed-tensors; search (NVFP4): per-group FP8 scale search weighted by calibration "
                        "importance; gptq: llm-compressor's GPTQ, layer by layer on the calibration data; "
                        "gptq+search (NVFP4): GPTQ on the searched scales. Same format for all")
    _add_calibration_args(s)
    _add_executor_args(s)
    s.set_defaults(run=_cmd_quantize)

    s = sub.add_parser("verify", help="load artifacts with an engine's own loader (trunk and MTP drafter)")
    s.add_argument("artifacts", nargs="+")
    s.add_argument("--engine", choices=["vllm"], default="vllm",
                   help="vllm: vLLM's loader on CPU, in its own cached venv (`make vllm-env`)")
    s.set_defaults(run=_cmd_verify)

    s = sub.add_parser("gate", help="apply a policy to an artifact's eval report -> pass/fail, eval/gate.json")
    s.add_argument("artifact")
    s.add_argument("--policy", help="policy YAML (default: eval/policies/fixture.yaml for the bundled fixture, "
                                    "eval/policies/step35-flash.yaml otherwise)")
    s.add_argument("--baseline", help="the last release's report for regression rules: a report.json, an artifact "
                                      "folder, or a Hub repo id org/name[@revision] (its eval/report.json)")
    s.add_argument("--endpoint", help="Hub endpoint for a --baseline repo id (default: HF_ENDPOINT or huggingface.co)")
    s.set_defaults(run=_cmd_gate)

    s = sub.add_parser("publish", help="upload a gated artifact + its model card; refuses ungated or changed ones")
    s.add_argument("artifact")
    s.add_argument("--repo-id", help="org/name on the Hub (created if missing); optional with --dry-run")
    s.add_argument("--revision", help="branch to commit to (created from main if missing; default main)")
    s.add_argument("--dry-run", action="store_true", help="print the exact operations; send and write nothing")
    s.add_argument("--private", action="store_true", help="create the repo private (an existing repo is unchanged)")
    s.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing directly")
    s.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    s.set_defaults(run=_cmd_publish)

    s = sub.add_parser("eval", help="accuracy (KLD, top-1, PPL, MTP acceptance, tasks) and speed of an artifact "
                                     "against its BF16 source -> ARTIFACT/eval/report.{json,md} + plots")
    s.add_argument("artifact")
    s.add_argument("--model", required=True, help="the BF16 source: local folder or Hub id")
    s.add_argument("--revision")
    s.add_argument("--out", default="out", help="where the BF16 reference outputs are cached (OUT/<model>-evalref/)")
    s.add_argument("--dataset", help="held-out text: local file or Hub dataset id (default: the fixture's eval.txt, "
                                      "ultrachat test_sft for real models); an image set (Step-3.7) adds "
                                      "image-conditioned figures, the text ones then use the default text")
    s.add_argument("--num-samples", type=int, help="N eval sequences")
    s.add_argument("--seq-len", type=int, help="L tokens per sequence")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tasks", help="comma-separated lm-eval tasks (default: the fixture's local tasks; none for "
                                    "real models, whose tasks need vLLM); '' for none")
    s.add_argument("--task-limit", type=int, help="items per task (lm-eval --limit)")
    s.add_argument("--no-speed", action="store_true", help="skip llama-bench")
    s.add_argument("--no-engine-check", action="store_true", help="skip the vLLM load check")
    s.add_argument("--force", action="store_true", help="start over instead of resuming an interrupted eval")
    _add_compute_args(s)
    s.set_defaults(run=_cmd_eval)

    _add_sensitivity_parser(sub)
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
