"""vLLM load check for Step-3.7 (issue 17): the tiny Step-3.7 fixture and every safetensors variant stepq writes of
it load with vLLM 0.33.0's own loader on CPU as `Step3p7ForConditionalGeneration` (vision tower, projector and
language model) and as the MTP drafter (`Step3p5MTP`), with the strictness of the Step-3.5 check
(tests/test_vllm_conformance.py): every parameter written (sentinels), every checkpoint tensor consumed, the vision
tower and projector built BF16 because the ignore list names them as vLLM runs them; and the check fails on broken
Step-3.7 artifacts.

One vLLM subprocess per artifact (trunk and drafter in it), two at a time, started as soon as an artifact is
written so they overlap the quantization.
"""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from convert.fixtures import STEP37_FIXTURE
from convert.safetensors_export import RECIPES_DIR
from eval.vllm_conformance import summary, verify_vllm, vllm_hf_overrides
from stepq.cli import main as stepq_main

QUANT_METHOD = {"bf16": None, "fp8-block": "fp8", "fp8-block-all": "fp8", "fp8-dynamic": "compressed-tensors",
                "fp8-static": "compressed-tensors", "nvfp4a16": "compressed-tensors", "nvfp4": "compressed-tensors",
                "nvfp4-modelopt": "modelopt_fp4", "nvfp4-mtp": "compressed-tensors"}
SCHEMES = [v for v in QUANT_METHOD if v != "bf16"]
VARIANTS = ["bf16", *SCHEMES]
INDEX = "model.safetensors.index.json"
VISION_PARTS = ("vision_model", "vit_large_projector")  # vLLM's top-level modules; BF16 in every variant
IGNORE_KEYS = ("ignore", "modules_to_not_convert", "exclude_modules")
# What vLLM raises for a compressed-tensors drafter without the MTP layers' kv-cache scales (see the Step-3.5 test).
KNOWN_CT_MTP_FAILURE = re.compile(r"^RuntimeError: Some parameters like model\.layers\.\d+\.mtp_block\.self_attn\.attn\."
                                  r"[qkv]_(scale|zero_point) are not in the checkpoint")


# ---- artifacts --------------------------------------------------------------------------------------------------
def _weight_map(art: Path) -> dict[str, str]:
    return json.loads((art / INDEX).read_text())["weight_map"]


def _rewrite(art: Path, drop=lambda name: False, add: dict[str, torch.Tensor] | None = None) -> None:
    """Remove tensors from an artifact's shards and index, and/or add tensors in an extra shard."""
    index = json.loads((art / INDEX).read_text())
    wm = index["weight_map"]
    dropped = {n for n in wm if drop(n)}
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


def _ignore_list(q: dict) -> list[str]:
    return next(q[k] for k in IGNORE_KEYS if k in q)


def _edit_ignore(art: Path, keep) -> None:
    """Keep only the ignore entries `keep(name)` accepts, in config.json (and hf_quant_config.json for ModelOpt)."""
    cfg = json.loads((art / "config.json").read_text())
    q = cfg["quantization_config"]
    key = next(k for k in IGNORE_KEYS if k in q)
    q[key] = [m for m in q[key] if keep(m)]
    (art / "config.json").write_text(json.dumps(cfg, indent=2))
    modelopt = art / "hf_quant_config.json"
    if modelopt.is_file():
        hq = json.loads(modelopt.read_text())
        hq["quantization"]["exclude_modules"] = [m for m in hq["quantization"]["exclude_modules"] if keep(m)]
        modelopt.write_text(json.dumps(hq, indent=2))


def _is_vision(module: str) -> bool:
    return module.startswith(VISION_PARTS)


def vision_ignored_under_checkpoint_names(art: Path) -> dict:
    """The vision linears ignored only as the checkpoint names them (`attn.in_proj`, `mlp.c_fc`, ...): vLLM's
    mapper renames `.mlp.c_fc`/`.mlp.c_proj` inside ignore entries too, but `attn.in_proj` is only renamed as
    `.attn.in_proj_weight`, so vLLM quantizes the fused `attn.qkv_proj` it runs and finds no scales for it."""
    _edit_ignore(art, lambda m: not _is_vision(m) or not m.endswith(("qkv_proj", "q_proj", "k_proj", "v_proj",
                                                                     "fc1", "fc2")))
    return {"role": "trunk", "needle": "vision_model.transformer.resblocks.0.attn.qkv_proj.weight_scale"}


def vision_not_ignored(art: Path) -> dict:
    """No ignore entry for the vision side (native fp8, exact matching): vLLM builds FP8 vision linears and
    projector and nothing in the BF16 checkpoint fills their scales."""
    _edit_ignore(art, lambda m: not _is_vision(m))
    return {"role": "trunk", "needle": "vit_large_projector.weight_scale_inv"}


def missing_vision_tensors(art: Path) -> dict:
    """One vision layer-scale vector and the projector gone: their parameters keep the sentinel."""
    gone = ("vision_model.transformer.resblocks.1.ls_2.gamma", "vit_large_projector.weight")
    _rewrite(art, drop=lambda n: n in gone)
    return {"role": "trunk", "needle": gone}


def quantized_projector(art: Path) -> dict:
    """A scale for the projector, which the config keeps BF16 (a quantizer that ignored its own ignore list)."""
    _rewrite(art, add={"vit_large_projector.weight_global_scale": torch.tensor([448.0 * 6])})
    return {"role": "trunk", "needle": "vit_large_projector.weight_global_scale"}


def without_mtp_kv_scales(art: Path) -> dict:
    """A compressed-tensors artifact without the MTP attention kv-cache scales: the drafter fails (Step-3.5's
    finding holds for Step-3.7's drafter too)."""
    _rewrite(art, drop=lambda n: ".self_attn.attn." in n)
    return {"role": "mtp"}


def mtp_ignored_under_checkpoint_names(art: Path) -> dict:
    """Native fp8 ignore entries naming the MTP modules only as the checkpoint does: the drafter (`mtp_block.*`,
    `shared_head.head`) builds FP8 parameters for them."""
    _edit_ignore(art, lambda m: ".mtp_block." not in m and not m.endswith(".shared_head.head"))
    return {"role": "mtp", "needle": "are not in the checkpoint"}


DERIVED = {  # name: (base variant, mutation)
    "vision-ignore-checkpoint-names": ("fp8-dynamic", vision_ignored_under_checkpoint_names),
    "vision-not-ignored": ("fp8-block", vision_not_ignored),
    "missing-vision-tensors": ("nvfp4", missing_vision_tensors),
    "quantized-projector": ("nvfp4a16", quantized_projector),
    "without-mtp-kv-scales": ("nvfp4a16", without_mtp_kv_scales),
    "mtp-ignore-checkpoint-names": ("fp8-block", mtp_ignored_under_checkpoint_names),
}


@dataclass
class Loaded:
    paths: dict[str, Path]  # variant or derived name -> artifact folder
    expect: dict[str, dict]  # derived name -> what its mutation should make fail
    reports: dict[str, dict]  # name -> verify_vllm's result


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, vllm_python) -> Loaded:
    """Quantize the Step-3.7 fixture into every scheme, derive the broken artifacts, load each with vLLM."""
    source = STEP37_FIXTURE
    out = tmp_path_factory.mktemp("vllm-step37")
    paths, expect, futures = {"bf16": source}, {}, {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        def submit(name):
            futures[name] = pool.submit(verify_vllm, paths[name], 300, vllm_python)

        submit("bf16")
        for scheme in SCHEMES:
            assert stepq_main(["quantize", str(source), "--scheme", scheme, "--out", str(out)]) == 0, scheme
            paths[scheme] = out / f"{source.name}-{scheme.upper()}"
            submit(scheme)
            for name, (base, mutate) in DERIVED.items():
                if base == scheme:
                    paths[name] = shutil.copytree(paths[scheme], out / name)
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


def _count(art: Path, prefix: str) -> int:
    return sum(n.startswith(prefix + ".") for n in _weight_map(art))


# ---- every variant loads ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_trunk_loads(loaded, variant):
    report = loaded.reports[variant]
    r = _role(loaded.reports, variant, "trunk")
    assert r["ok"], summary(report)
    assert r["class"] == "Step3p7ForConditionalGeneration"
    assert r["quant_method"] == QUANT_METHOD[variant]
    assert r["warnings"] == [], summary(report)
    assert r["checkpoint_tensors_seen"] == len(_weight_map(loaded.paths[variant]))
    if variant.startswith("nvfp4"):
        assert r["int_params"] > 0  # the packed FP4 bytes were checked with the integer sentinel
    language = r["parts"]["language_model"]
    assert (language["quant_params"] > 0) == (variant != "bf16"), r["parts"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_vision_tower_and_projector_load_bf16(loaded, variant):
    """vLLM built one BF16 parameter per checkpoint tensor of the tower and the projector (the fused qkv_proj
    takes `in_proj_weight` whole), each checked against its sentinel, none quantized."""
    parts = _role(loaded.reports, variant, "trunk")["parts"]
    for part in VISION_PARTS:
        assert parts[part]["params"] == _count(loaded.paths[variant], part) > 0, (part, parts)
        assert parts[part]["int_params"] == parts[part]["fp8_params"] == parts[part]["quant_params"] == 0, parts


@pytest.mark.parametrize("variant", VARIANTS)
def test_drafter_loads(reports, variant):
    r = _role(reports, variant, "mtp")
    assert r["ok"], summary(reports[variant])
    assert r["class"] == "Step3p5MTP"
    assert r["quant_method"] == QUANT_METHOD[variant]
    assert r["warnings"] == [], summary(reports[variant])
    assert (r["int_params"] > 0) == (variant == "nvfp4-mtp")  # only nvfp4-mtp quantizes the MTP blocks
    assert reports[variant]["ok"]


@pytest.mark.parametrize("variant", SCHEMES)
def test_ignore_list_names_the_vision_side_as_vllm_runs_it(loaded, variant):
    """vLLM's runtime names for every vision linear and the projector are in the artifact's ignore list (the
    loads above show vLLM honours them; vision-ignore-checkpoint-names below shows the checkpoint's own names
    are not enough)."""
    art = loaded.paths[variant]
    cfg = json.loads((art / "config.json").read_text())
    lists = [_ignore_list(cfg["quantization_config"])]
    if (art / "hf_quant_config.json").is_file():
        lists.append(json.loads((art / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"])
    layers = cfg["vision_config"]["layers"]
    runtime = ["vit_large_projector"] + [f"vision_model.transformer.resblocks.{i}.{m}" for i in range(layers)
                                         for m in ("attn.qkv_proj", "attn.out_proj", "mlp.fc1", "mlp.fc2")]
    for ignore in lists:
        assert not [m for m in runtime if m not in ignore], ignore


def test_every_bundled_recipe_is_checked():
    assert sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) == sorted(SCHEMES)


def test_vision_config_names_passed_as_hf_overrides(reports):
    """vLLM's Perception Encoder reads `vision_config.width/layers/heads/ls_init_value`, which transformers'
    Step3p7VisionConfig renames: the load passes the artifact's own values back, and the summary tells a user
    the `--hf-overrides` to pass."""
    vision = json.loads((STEP37_FIXTURE / "config.json").read_text())["vision_config"]
    for variant in VARIANTS:
        report = reports[variant]
        assert report["hf_overrides"] == {"vision_config": {k: vision[k] for k in
                                                            ("width", "layers", "heads", "ls_init_value")}}
        assert "--hf-overrides" in summary(report)
    assert any(o.startswith("get_hf_text_config") for o in reports["bf16"]["overrides"])


# ---- and the check fails on broken Step-3.7 artifacts -----------------------------------------------------------
def _problems(report: dict, role: str) -> list[str]:
    return (report.get(role) or {}).get("problems", [])


def test_vision_ignored_under_checkpoint_names_fails(loaded):
    report = loaded.reports["vision-ignore-checkpoint-names"]
    needle = loaded.expect["vision-ignore-checkpoint-names"]["needle"]
    assert not report["ok"] and report["mtp"]["ok"], summary(report)
    problems = _problems(report, "trunk")
    assert any(p.startswith(f"unwritten parameter {needle}") for p in problems), summary(report)
    assert all(".attn.qkv_proj." in p for p in problems), problems  # the MLP entries were mapped by vLLM


def test_vision_not_ignored_fails(loaded):
    report = loaded.reports["vision-not-ignored"]
    needle = loaded.expect["vision-not-ignored"]["needle"]
    assert not report["ok"] and report["mtp"]["ok"], summary(report)
    problems = _problems(report, "trunk")
    assert any(p.startswith(f"unwritten parameter {needle}") for p in problems), summary(report)
    assert any(".mlp.fc1.weight_scale_inv" in p for p in problems), summary(report)


def test_missing_vision_tensors_fail(loaded):
    report = loaded.reports["missing-vision-tensors"]
    assert not report["ok"] and report["mtp"]["ok"], summary(report)
    problems = _problems(report, "trunk")
    for name in loaded.expect["missing-vision-tensors"]["needle"]:
        assert any(p.startswith(f"unwritten parameter {name}:") for p in problems), (name, problems)


def test_quantized_projector_fails(loaded):
    report = loaded.reports["quantized-projector"]
    needle = loaded.expect["quantized-projector"]["needle"]
    assert not report["ok"]
    assert any(needle in p for p in _problems(report, "trunk")), summary(report)
    assert report["mtp"]["ok"], summary(report)  # the drafter does not own vision tensors


def test_drafter_needs_the_mtp_kv_scales(reports):
    report = reports["without-mtp-kv-scales"]
    assert report["trunk"]["ok"] and not report["mtp"]["ok"], summary(report)
    assert report["mtp"]["problems"] and all(KNOWN_CT_MTP_FAILURE.match(p) for p in report["mtp"]["problems"])


def test_mtp_ignore_rule_under_checkpoint_names_fails_the_drafter(loaded):
    report = loaded.reports["mtp-ignore-checkpoint-names"]
    assert report["trunk"]["ok"] and not report["mtp"]["ok"], summary(report)
    needle = loaded.expect["mtp-ignore-checkpoint-names"]["needle"]
    assert any(needle in p and ".mtp_block." in p for p in report["mtp"]["problems"]), summary(report)


def test_every_problem_is_one_line(reports):
    for name, report in reports.items():
        for role in ("trunk", "mtp"):
            for p in (report.get(role) or {}).get("problems", []):
                assert "\n" not in p and len(p) < 800, (name, p)
        assert all("\n" not in p for p in report["problems"]), name


def test_verify_command_exit_codes(loaded, capsys):
    """`stepq verify --engine vllm` on Step-3.7 artifacts: 0 when every one loads, 1 when one does not."""
    assert stepq_main(["verify", "--engine", "vllm", str(loaded.paths["nvfp4"])]) == 0
    assert stepq_main(["verify", str(loaded.paths["bf16"]), str(loaded.paths["vision-not-ignored"])]) == 1
    out = capsys.readouterr().out
    assert "vision-not-ignored: FAILED" in out and "Step3p7ForConditionalGeneration" in out


def test_hf_overrides_from_either_spelling():
    """The overrides take the artifact's own values, whether its vision config spells them as the checkpoint does
    (`width`) or as transformers does (`hidden_size`); none for Step-3.5."""
    cfg = json.loads((STEP37_FIXTURE / "config.json").read_text())
    ours = vllm_hf_overrides(cfg)
    vision = cfg["vision_config"]
    cfg["vision_config"] = {k: v for k, v in vision.items() if k not in ("width", "layers", "heads", "ls_init_value")}
    cfg["vision_config"] |= {"hidden_size": vision["width"], "num_hidden_layers": vision["layers"],
                             "num_attention_heads": vision["heads"], "layer_scale_init_value": vision["ls_init_value"]}
    assert vllm_hf_overrides(cfg) == ours == {"vision_config": {"width": 96, "layers": 2, "heads": 2,
                                                                "ls_init_value": 0.1}}
    assert vllm_hf_overrides(json.loads((STEP37_FIXTURE.with_name("tiny-step35") / "config.json").read_text())) == {}
