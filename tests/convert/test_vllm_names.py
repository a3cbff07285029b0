"""The role table's vLLM names (convert/arch/step35.py `vllm_names`) name modules vLLM 0.33.0 really builds: the
trunk (`Step3p5ForCausalLM`) and the MTP drafter (`step3p5_mtp`) from the bundled fixture, in the vLLM venv
(`make vllm-env`, as tests/test_vllm_conformance.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from convert.arch.step35 import vllm_names
from convert.checkpoint import open_checkpoint
from eval.vllm_conformance import ensure_vllm_env
from quant.roles import EXPERT_ROLES

SCRIPT = Path(__file__).with_name("vllm_module_names.py")
# vLLM's Step3p5ForCausalLM.hf_to_vllm_mapper, which it applies to ignore lists before matching them
TRUNK_MAPPER = (".share_expert.", ".moe.share_expert.")


def _vllm_modules(artifact: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"VLLM_TARGET_DEVICE": "cpu", "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "2"})
    proc = subprocess.run([str(ensure_vllm_env()), str(SCRIPT), str(artifact)], capture_output=True, text=True,
                          timeout=900, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, proc.stderr[-3000:]
    return json.loads(lines[-1])


def test_every_runtime_name_is_a_module_vllm_builds(bundled_fixture):
    built = _vllm_modules(bundled_fixture)
    assert built["ok"] and built["trunk"] and built["mtp"]
    trunk, drafter = set(built["trunk"]), set(built["mtp"])
    ckpt = open_checkpoint(bundled_fixture)
    try:
        infos = [t.info for t in ckpt.tensors.values() if t.info.name.endswith(".weight")]
    finally:
        ckpt.close()
    checked = 0
    for info in infos:
        if info.role in EXPERT_ROLES:  # one FusedMoE per layer, `moe.experts`: see the table's comment
            assert f"{info.module.rsplit('.', 1)[0]}.experts" in trunk
            continue
        runtime = vllm_names(info)[-1]
        if info.mtp:
            assert runtime in drafter, info.name
        else:
            assert runtime.replace(*TRUNK_MAPPER) in trunk, info.name
        checked += 1
    assert checked > 50
