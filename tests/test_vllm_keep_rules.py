"""Per-layer keep rules load in vLLM 0.33.0 (its own loader on CPU, trunk and MTP drafter, as
tests/test_vllm_conformance.py): q/k/v kept BF16 in layers 0 and 4 and the routed experts in layer 2, in each config
family vLLM reads (compressed-tensors `ignore`, native fp8 `modules_to_not_convert`, ModelOpt `exclude_modules`).

Found by this check: kept routed experts were listed under their checkpoint names only, and vLLM built NVFP4
parameters for the layer's FusedMoE (`moe.experts`), which the BF16 stacks never filled.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from convert.fixtures import BUNDLED_FIXTURE
from convert.safetensors_export import RECIPES_DIR
from eval.vllm_conformance import VllmEnvError, ensure_vllm_env, summary, verify_vllm
from stepq.quantize import quantize

KEEP = [{"layers": [0, 4], "roles": ["attn_q", "attn_k", "attn_v"]},
        {"layers": [2], "roles": ["experts_gate", "experts_up", "experts_down"]}]
QUANT_METHOD = {"nvfp4a16": "compressed-tensors", "fp8-block-all": "fp8", "nvfp4-modelopt": "modelopt_fp4"}


@pytest.fixture(scope="module")
def reports(tmp_path_factory, constant_stats) -> dict[str, dict]:
    try:
        python = ensure_vllm_env()
    except VllmEnvError as e:  # never skipped: a missing env is a failure with its reason
        pytest.fail(f"vLLM env: {e}", pytrace=False)
    tmp = tmp_path_factory.mktemp("vllm-keep")
    futures = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for base in QUANT_METHOD:
            recipe = {**yaml.safe_load((RECIPES_DIR / f"{base}.yaml").read_text()), "name": f"{base}-keep", "keep": KEEP}
            path = tmp / f"{base}-keep.yaml"
            path.write_text(yaml.safe_dump(recipe))
            stats = constant_stats if base == "nvfp4-modelopt" else None
            art = quantize(BUNDLED_FIXTURE, base, tmp / "out", recipe_file=str(path), stats=stats)
            futures[base] = pool.submit(verify_vllm, art, 300, python)
        return {base: f.result() for base, f in futures.items()}


@pytest.mark.parametrize("base", list(QUANT_METHOD))
def test_per_layer_kept_modules_load_in_vllm(reports, base):
    report = reports[base]
    assert report["ok"], summary(report)
    trunk = report["trunk"]
    assert trunk["quant_method"] == QUANT_METHOD[base] and trunk["warnings"] == [], summary(report)
    assert trunk["skipped_tensors"] == [], summary(report)  # the kept BF16 stacks went into the unquantized MoE
