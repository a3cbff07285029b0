"""vLLM conformance: does vLLM's own loader accept an artifact, as the trunk and as the MTP drafter?

Host side. vLLM lives in a separate venv (`make vllm-env`, outside the repo, cached by version) because it pins
transformers and compressed-tensors differently from stepq; `eval/vllm_runner.py` runs there as a subprocess and
prints one JSON object, which `verify_vllm` returns:

    {"ok": bool, "artifact", "vllm", "torch", "overrides": [...], "hf_overrides": {...}, "problems": [...],
     "trunk": {"ok", "class", "quant_method", "params", "float_params", "int_params", "elements",
               "parts": {top-level module: {"params", "int_params", "fp8_params", "quant_params"}},
               "exempt_params", "checkpoint_tensors_seen", "skipped_tensors": [...], "problems": [...],
               "warnings": [...], "vllm_log_warnings": [...], "seconds"},
     "mtp": {... the same for Step3p5MTP ...}}

The trunk is `Step3p5ForCausalLM` for Step-3.5 and `Step3p7ForConditionalGeneration` (vision tower, projector and
language model) for Step-3.7; the drafter is `Step3p5MTP` for both. `hf_overrides` is what the load needed on top
of the artifact's config.json (Step-3.7: the vision config names vLLM's Perception Encoder reads, which
transformers' config class renames); a user passes the same with `--hf-overrides`.

`problems` are failures (unwritten parameters, tensors vLLM skipped, exceptions); `warnings` are what vLLM's
post-load processing would warn about (e.g. gate/up global scales that differ); `vllm_log_warnings` are the
warnings vLLM logged while building and loading.

Every problem is one line. `python -m eval.vllm_conformance ARTIFACT...` prints a summary per artifact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "vllm_runner.py"
VLLM_VERSION = "0.33.0"
STAMP = ".stepq-vllm-env"  # written by the Makefile's vllm-env target once the env is complete
BUILD_TIMEOUT_S = 45 * 60
RUN_TIMEOUT_S = 600


# vLLM 0.33.0's Perception Encoder (Step-3.7's vision tower, models/step_vl.py) reads the checkpoint's own
# vision_config names, but the config it is handed is transformers' Step3p7VisionConfig, which pops them into its
# own names while parsing: without these the model cannot be built (`'Step3p7VisionConfig' object has no attribute
# 'width'`). Ours -> transformers' spelling.
PERCEPTION_ENCODER_NAMES = {"width": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
                            "ls_init_value": "layer_scale_init_value"}


def vllm_hf_overrides(config: dict) -> dict:
    """What vLLM 0.33.0 needs as `--hf-overrides` on top of an artifact's config.json (`config`): for Step-3.7 the
    Perception Encoder's vision config names with the artifact's own values (either spelling in config.json);
    {} for Step-3.5. The load check passes exactly this, so a user passing it loads what the check loaded."""
    vision = config.get("vision_config")
    if "Step3p7ForConditionalGeneration" not in (config.get("architectures") or []) or not isinstance(vision, dict):
        return {}
    values = {ours: vision.get(ours, vision.get(theirs)) for ours, theirs in PERCEPTION_ENCODER_NAMES.items()}
    values = {k: v for k, v in values.items() if v is not None}
    return {"vision_config": values} if values else {}


class VllmEnvError(RuntimeError):
    """The vLLM venv could not be built or used (message: one line)."""


def vllm_env_dir() -> Path:
    """`VLLM_ENV` if set, else the Makefile's default `~/.cache/stepq/vllm-<version>`."""
    env = os.environ.get("VLLM_ENV")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stepq" / f"vllm-{VLLM_VERSION}"


def ensure_vllm_env(build_timeout: float = BUILD_TIMEOUT_S) -> Path:
    """The python of the vLLM venv, built with `make vllm-env` when it is missing. Raises VllmEnvError."""
    env = vllm_env_dir()
    python = env / "bin" / "python"
    if (env / STAMP).is_file():
        if python.is_file():
            return python
        raise VllmEnvError(f"{env} has a stamp but no bin/python: delete the folder and rerun `make vllm-env`")
    cmd = ["make", "--no-print-directory", "-C", str(REPO), "vllm-env", f"VLLM_ENV={env}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=build_timeout)
    except FileNotFoundError:
        raise VllmEnvError("cannot build the vLLM env: `make` is not installed") from None
    except subprocess.TimeoutExpired:
        raise VllmEnvError(f"`make vllm-env` did not finish within {build_timeout:.0f} s ({env})") from None
    if proc.returncode != 0 or not (env / STAMP).is_file() or not python.is_file():
        raise VllmEnvError(f"`make vllm-env` failed (exit {proc.returncode}, env {env}): "
                           f"{_reason(proc.stderr) or _reason(proc.stdout) or 'no output'}")
    return python


def verify_vllm(artifact_dir: str | Path, timeout: float = RUN_TIMEOUT_S, python: Path | None = None) -> dict:
    """Load `artifact_dir` with vLLM's loader (trunk, then MTP drafter) in the vLLM venv; the runner's JSON.

    Never raises for a failing artifact: `ok` is false and `problems` says why, one line each. Raises
    VllmEnvError when the vLLM env itself cannot be built."""
    artifact = Path(artifact_dir).resolve()
    if not (artifact / "config.json").is_file():
        return _failed(artifact, f"{artifact}: not an artifact (no config.json)")
    python = python or ensure_vllm_env()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the project's venv leaks in
    env.update({"VLLM_TARGET_DEVICE": "cpu", "VLLM_LOGGING_STREAM": "ext://sys.stderr",
                "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2")})
    try:
        overrides = vllm_hf_overrides(json.loads((artifact / "config.json").read_text()))
    except (OSError, ValueError, AttributeError) as e:
        return _failed(artifact, f"{artifact / 'config.json'}: unreadable ({type(e).__name__}: {e})")
    cmd = [str(python), str(RUNNER), str(artifact), "--json"]
    if overrides:
        cmd += ["--hf-overrides", json.dumps(overrides)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return _failed(artifact, f"vLLM runner timed out after {timeout:.0f} s")
    report = _parse_json(proc.stdout)
    if report is None:
        return _failed(artifact, f"vLLM runner exited {proc.returncode} without a result: "
                                 f"{_last_line(proc.stderr) or 'no output'}")
    report.setdefault("problems", [])
    report["stderr_tail"] = proc.stderr.strip().splitlines()[-20:]
    return report


def summary(report: dict) -> str:
    """One line per loaded model, plus the artifact-level problems."""
    lines = [f"{report.get('artifact')}: {'OK' if report.get('ok') else 'FAILED'}"]
    for role in ("trunk", "mtp"):
        r = report.get(role) or {}
        if not r:
            continue
        counts = (f"params={r['params']} (float {r.get('float_params', 0)}, int {r.get('int_params', 0)})"
                  if r.get("params") else "not built")
        head = (f"  {role:5s} {'ok' if r.get('ok') else 'FAIL'} {r.get('class') or '-'} "
                f"quant={r.get('quant_method') or 'none'} {counts}")
        lines.append(head)
        lines += [f"        problem: {p}" for p in r.get("problems", [])]
        lines += [f"        warning: {w}" for w in r.get("warnings", [])]
    if report.get("hf_overrides"):
        lines.append(f"  vLLM needs --hf-overrides '{json.dumps(report['hf_overrides'], separators=(',', ':'))}'")
    lines += [f"  problem: {p}" for p in report.get("problems", [])]
    return "\n".join(lines)


def _failed(artifact: Path, problem: str) -> dict:
    return {"artifact": str(artifact), "ok": False, "problems": [problem], "trunk": None, "mtp": None}


def _parse_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _reason(text: str | None) -> str:
    """The line of a build log that says what went wrong: the last error line that is not make's own."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not ln.startswith(("make:", "make["))]
    errors = [ln for ln in lines if "error" in ln.lower() and "is ignored" not in ln]
    return (errors or lines or [""])[-1][:500]


def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m eval.vllm_conformance ARTIFACT [ARTIFACT...]")
        return 2
    try:
        python = ensure_vllm_env()
    except VllmEnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ok = True
    for artifact in args:
        report = verify_vllm(artifact, python=python)
        print(summary(report))
        ok &= bool(report.get("ok"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
