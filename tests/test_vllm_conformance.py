"""vLLM conformance (issue 8): every artifact stepq writes loads with vLLM 0.33.0's own loader on CPU, as the trunk
(`Step3p5ForCausalLM`) and as the MTP drafter (`step3p5_mtp`), and the check fails on broken artifacts.

vLLM runs in its own venv (`make vllm-env`, built on first use and cached outside the repo); one subprocess per
artifact loads both models. The source is the bundled trained fixture, nothing else.
"""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file
import torch

import convert.fixtures as fixtures
from eval.vllm_conformance import VLLM_VERSION, summary, verify_vllm
from stepq.cli import main as stepq_main
from convert.safetensors_export import RECIPES_DIR

# Every bundled safetensors recipe (test_every_bundled_recipe_is_checked keeps this list complete) and the
# quantization method vLLM must pick for it.
QUANT_METHOD = {"bf16": None, "fp8-block": "fp8", "fp8-block-all": "fp8", "fp8-dynamic": "compressed-tensors",
                "fp8-static": "compressed-tensors", "nvfp4a16": "compressed-tensors", "nvfp4": "compressed-tensors",
                "nvfp4-modelopt": "modelopt_fp4", "nvfp4-mtp": "compressed-tensors"}
SCHEMES = [v for v in QUANT_METHOD if v != "bf16"]
VARIANTS = ["bf16", *SCHEMES]
INDEX = "model.safetensors.index.json"

# Found by this check: vLLM 0.33.0 loads a compressed-tensors Step-3.5 artifact as the MTP drafter only when it
# carries the MTP layers' attention kv-cache scales (CompressedTensorsKVCacheMethod creates `{q,k,v}_scale` /
# `_zero_point` with requires_grad=True, and Step3p5MTP.load_weights treats only requires_grad=False scales as
# optional). stepq writes neutral ones (quant/layouts.py `extra_tensors`); test_drafter_needs_the_mtp_kv_scales
# removes them again to show the check still catches the failure.
KNOWN_CT_MTP_FAILURE = re.compile(r"^RuntimeError: Some parameters like model\.layers\.\d+\.mtp_block\.self_attn\.attn\."
                                  r"[qkv]_(scale|zero_point) are not in the checkpoint")


# ---- artifacts --------------------------------------------------------------------------------------------------
def _weight_map(art: Path) -> dict[str, str]:
    return json.loads((art / INDEX).read_text())["weight_map"]


def _rewrite(art: Path, drop=lambda name: False, add: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Remove tensors from an artifact's shards and index, and/or add tensors in an extra shard. Returns the
    dropped names."""
    index = json.loads((art / INDEX).read_text())
    wm = index["weight_map"]
    dropped = sorted(n for n in wm if drop(n))
    for shard in sorted({wm[n] for n in dropped}):
        with safe_open(art / shard, "pt") as f:
            meta = f.metadata()
            keep = {n: f.get_tensor(n) for n in f.keys() if n not in dropped}
        save_file(keep, art / shard, metadata=meta)
    for n in dropped:
        del wm[n]
    if add:
        save_file(add, art / "model-extra.safetensors", metadata={"format": "pt"})
        wm.update({n: "model-extra.safetensors" for n in add})
    (art / INDEX).write_text(json.dumps(index, indent=2))
    return dropped


def _edit_config(art: Path, edit) -> None:
    cfg = json.loads((art / "config.json").read_text())
    edit(cfg)
    (art / "config.json").write_text(json.dumps(cfg, indent=2))


def _derive(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    return dest


def _mtp_layers(art: Path) -> list[int]:
    cfg = json.loads((art / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    return list(range(n, n + cfg.get("num_nextn_predict_layers", 0)))


def _first(names, pattern: str) -> str:
    hits = sorted(n for n in names if re.search(pattern, n))
    assert hits, f"no tensor matches {pattern}"
    return hits[0]


def broken_missing_k_proj(art: Path) -> dict:
    """(a) one layer's k_proj tensors gone: a fused qkv_proj shard never written (vLLM itself does not notice)."""
    _rewrite(art, drop=lambda n: n.startswith("model.layers.1.self_attn.k_proj."))
    return {"role": "trunk", "needle": "model.layers.1.self_attn.qkv_proj."}


def broken_missing_expert_scale(art: Path) -> dict:
    """(b) one expert stack's `weight_scale_inv` gone (native fp8): half of w13's block scales never written."""
    name = _first(_weight_map(art), r"\.moe\.up_proj\.weight_scale_inv$")
    _rewrite(art, drop=lambda n: n == name)
    layer = name.split(".moe.")[0]
    return {"role": "trunk", "needle": f"{layer}.moe.experts.routed_experts.w13_weight_scale_inv"}


def broken_missing_linear_scale(art: Path) -> dict:
    """(b) one dense linear's `weight_scale` gone (compressed-tensors FP8 channel)."""
    _rewrite(art, drop=lambda n: n == "model.layers.0.self_attn.o_proj.weight_scale")
    return {"role": "trunk", "needle": "model.layers.0.self_attn.o_proj.weight_scale"}


def broken_mtp_checkpoint_names_only(art: Path) -> dict:
    """(c) native fp8 `modules_to_not_convert` naming the MTP modules only as the checkpoint does: vLLM's drafter
    calls them `...mtp_block.*` / `shared_head.head`, matches exactly, and creates FP8 parameters for them."""
    def edit(cfg):
        q = cfg["quantization_config"]
        q["modules_to_not_convert"] = [m for m in q["modules_to_not_convert"]
                                       if ".mtp_block." not in m and not m.endswith(".shared_head.head")]
    _edit_config(art, edit)
    return {"role": "mtp", "needle": "are not in the checkpoint"}


def broken_quantized_embedding(art: Path) -> dict:
    """(d) a quantized tensor vLLM has no parameter for (a quantizer that also quantized the embedding)."""
    _rewrite(art, add={"model.embed_tokens.weight_global_scale": torch.tensor([448.0 * 6])})
    return {"role": "trunk", "needle": "model.embed_tokens.weight_global_scale"}


def gate_up_scale_mismatch(art: Path) -> dict:
    """Not a load failure but a vLLM warning: an expert whose gate and up global scales differ."""
    name = _first(_weight_map(art), r"\.moe\.experts\.0\.up_proj\.weight_global_scale$")
    with safe_open(art / _weight_map(art)[name], "pt") as f:
        value = f.get_tensor(name)
    _rewrite(art, drop=lambda n: n == name, add={name: value * 2})
    return {"role": "trunk", "needle": name.split(".moe.")[0] + ".moe.experts.routed_experts.w13_weight_global_scale"}


def without_mtp_kv_scales(art: Path) -> dict:
    """A compressed-tensors artifact as stepq wrote it before the drafter fix: no MTP attention kv-cache scales."""
    _rewrite(art, drop=lambda n: ".self_attn.attn." in n)
    return {}


DERIVED = {  # name: (base variant, mutation)
    "missing-k-proj": ("nvfp4a16", broken_missing_k_proj),
    "missing-expert-scale": ("fp8-block", broken_missing_expert_scale),
    "missing-linear-scale": ("fp8-dynamic", broken_missing_linear_scale),
    "mtp-ignore-checkpoint-names": ("fp8-block", broken_mtp_checkpoint_names_only),
    "quantized-embedding": ("fp8-block", broken_quantized_embedding),
    "gate-up-mismatch": ("nvfp4a16", gate_up_scale_mismatch),
    "nvfp4a16-without-mtp-kv-scales": ("nvfp4a16", without_mtp_kv_scales),
}


@pytest.fixture(scope="module")
def source() -> Path:
    src = fixtures.BUNDLED_FIXTURE
    if not any(src.glob("*.safetensors")):
        pytest.fail(f"{src} has no weights: train the bundled fixture first (make fixture)", pytrace=False)
    return src


@dataclass
class Loaded:
    paths: dict[str, Path]  # variant or derived name -> artifact folder
    expect: dict[str, dict]  # derived name -> what its mutation should make fail
    reports: dict[str, dict]  # name -> verify_vllm's result


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, vllm_python, source) -> Loaded:
    """Quantize the fixture into every scheme, derive the broken artifacts, and load each with vLLM: one
    subprocess per artifact (trunk and drafter in it), two at a time, started as soon as an artifact is written
    so they overlap the quantization."""
    out = tmp_path_factory.mktemp("vllm-artifacts")
    paths, expect, futures = {"bf16": source}, {}, {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        def submit(name):
            futures[name] = pool.submit(verify_vllm, paths[name], 300, vllm_python)

        submit("bf16")
        for scheme in SCHEMES:
            # the CLI, as a user runs it: static-activation schemes calibrate once and reuse the statistics
            assert stepq_main(["quantize", str(source), "--scheme", scheme, "--out", str(out)]) == 0, scheme
            paths[scheme] = out / f"{source.name}-{scheme.upper()}"
            submit(scheme)
            for name, (base, mutate) in DERIVED.items():
                if base == scheme:
                    paths[name] = _derive(paths[scheme], out / name)
                    expect[name] = mutate(paths[name])
                    submit(name)
        reports = {name: f.result() for name, f in futures.items()}
    return Loaded(paths, expect, reports)


@pytest.fixture(scope="module")
def reports(loaded) -> dict[str, dict]:
    return loaded.reports


def _role(reports, name: str, role: str) -> dict:
    report = reports[name]
    assert report.get(role), f"{name}: no {role} result\n{summary(report)}"
    return report[role]


# ---- every variant loads ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_trunk_loads(reports, variant):
    r = _role(reports, variant, "trunk")
    assert r["ok"], summary(reports[variant])
    assert r["class"] == "Step3p5ForCausalLM"
    assert r["quant_method"] == QUANT_METHOD[variant]
    assert r["params"] > 0 and r["checkpoint_tensors_seen"] > 0
    assert r["warnings"] == [], summary(reports[variant])
    if variant.startswith("nvfp4"):
        assert r["int_params"] > 0  # the packed FP4 bytes were checked with the integer sentinel


@pytest.mark.parametrize("variant", VARIANTS)
def test_drafter_loads(reports, variant):
    r = _role(reports, variant, "mtp")
    assert r["ok"], summary(reports[variant])
    assert r["class"] == "Step3p5MTP"
    assert r["warnings"] == [], summary(reports[variant])
    assert reports[variant]["ok"]


def test_drafter_needs_the_mtp_kv_scales(reports):
    report = reports["nvfp4a16-without-mtp-kv-scales"]
    assert report["trunk"]["ok"] and not report["mtp"]["ok"], summary(report)
    assert report["mtp"]["problems"] and all(KNOWN_CT_MTP_FAILURE.match(p) for p in report["mtp"]["problems"])


def test_every_bundled_recipe_is_checked():
    assert sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) == sorted(SCHEMES)


def test_runner_reports_pinned_vllm_and_its_overrides(reports):
    report = reports["bf16"]
    assert report["vllm"] == VLLM_VERSION
    assert any("process_weights_after_loading" in o for o in report["overrides"])


# ---- and the check fails on broken artifacts --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["missing-k-proj", "missing-expert-scale", "missing-linear-scale"])
def test_unwritten_parameter_fails(loaded, name):
    reports, expect = loaded.reports, loaded.expect[name]
    report = reports[name]
    r = report[expect["role"]]
    assert not report["ok"] and not r["ok"]
    hits = [p for p in r["problems"] if p.startswith("unwritten parameter") and expect["needle"] in p]
    assert hits, summary(report)


def test_missing_k_proj_caught_by_sentinels_not_by_vllm(reports):
    problems = reports["missing-k-proj"]["trunk"]["problems"]
    assert all(p.startswith("unwritten parameter") for p in problems), problems  # vLLM raised nothing
    assert any(".qkv_proj.weight_packed:" in p and "rows never written" in p for p in problems), problems
    assert any(".qkv_proj.weight_scale:" in p for p in problems), problems


def test_mtp_ignore_rule_under_checkpoint_names_fails_the_drafter(reports):
    report = reports["mtp-ignore-checkpoint-names"]
    assert report["trunk"]["ok"], summary(report)
    assert not report["mtp"]["ok"]
    assert any("are not in the checkpoint" in p and ".mtp_block." in p for p in report["mtp"]["problems"]), \
        summary(report)


def test_tensor_without_parameter_fails(reports):
    report = reports["quantized-embedding"]
    assert not report["ok"]
    trunk = report["trunk"]
    assert trunk["skipped_tensors"] == ["model.embed_tokens.weight_global_scale"], summary(report)
    # the drafter maps every `embed_tokens` tensor onto the embedding, which then fails its shape check
    assert any("model.embed_tokens.weight_global_scale" in p for p in report["mtp"]["problems"]), summary(report)


def test_gate_up_global_scale_mismatch_is_reported(loaded):
    reports, needle = loaded.reports, loaded.expect["gate-up-mismatch"]["needle"]
    trunk = reports["gate-up-mismatch"]["trunk"]
    assert trunk["ok"]  # loads; vLLM would only warn
    assert any(w.startswith(needle) and "gate/up global scales differ for 1 of" in w for w in trunk["warnings"]), \
        trunk["warnings"]


def test_every_problem_is_one_line(reports):
    for name, report in reports.items():
        for role in ("trunk", "mtp"):
            for p in (report.get(role) or {}).get("problems", []):
                assert "\n" not in p and len(p) < 800, (name, p)
        assert all("\n" not in p for p in report["problems"]), name


def test_not_an_artifact_is_one_line(tmp_path, vllm_python):
    report = verify_vllm(tmp_path, python=vllm_python)
    assert not report["ok"] and len(report["problems"]) == 1 and "no config.json" in report["problems"][0]


def test_verify_command_exit_codes(loaded, capsys):
    """`stepq verify --engine vllm`: 0 when every artifact loads as trunk and drafter, 1 when one does not."""
    assert stepq_main(["verify", "--engine", "vllm", str(loaded.paths["fp8-block"])]) == 0
    assert stepq_main(["verify", str(loaded.paths["fp8-block"]), str(loaded.paths["missing-k-proj"])]) == 1
    out = capsys.readouterr().out
    assert "missing-k-proj: FAILED" in out


def test_quantized_mtp_block_loads_quantized_in_the_drafter(reports):
    """nvfp4-mtp quantizes the MTP decoder blocks: the drafter must build NVFP4 parameters for them."""
    assert reports["nvfp4-mtp"]["mtp"]["int_params"] > 0
    assert reports["nvfp4"]["mtp"]["int_params"] == 0
