"""`stepq sensitivity` (eval/sensitivity.py, stepq/sensitivity.py) and its recipe generator (quant/keep_budget.py):
the greedy choice on synthetic figures, then the command end to end on the bundled fixture with a few calibration
tokens: files written, the recipe within its budget and loadable, sizes and numerics equal to what the export
writes, bad budgets refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from convert.artifact import ArtifactReader
from convert.checkpoint import open_checkpoint
from convert.safetensors_export import SourceReader, load_recipe
from eval.sensitivity import QuantizedGroup, candidates
from quant.keep_budget import Option, choose, keep_rules
from quant.layouts import layout_for
from quant.recipe import Recipe
from stepq.cli import main

FEW = ["--num-samples", "4", "--seq-len", "64"]  # 256 calibration tokens: seconds


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny matrices (tests/conftest.py): one thread is several times faster than two on a busy machine."""


# ---- the generator: pure ----------------------------------------------------------------------------------------
def _o(layer, kld, saved, roles=("attn_o",)):
    return Option(layer, roles, kld, saved)


def test_greedy_prefers_kld_per_byte_and_respects_the_budget():
    big = _o(0, 0.010, 1000)      # 1e-5 per byte: most KLD, least per byte
    dense = _o(1, 0.006, 200)     # 3e-5 per byte: first
    mid = _o(2, 0.004, 250)       # 1.6e-5 per byte: second
    assert choose([big, dense, mid], 450) == [dense, mid]
    assert choose([big, dense, mid], 1000) == [dense, mid]  # big no longer fits after them
    assert choose([big, dense, mid], 1450) == [dense, mid, big]
    assert choose([big, dense, mid], 199) == []
    for spare in range(0, 1600, 37):
        assert sum(o.bytes_saved for o in choose([big, dense, mid], spare)) <= spare


def test_a_candidate_that_does_not_fit_is_skipped_for_smaller_ones():
    first, too_big, small = _o(0, 0.9, 100), _o(1, 0.5, 100), _o(2, 0.01, 10)
    assert choose([too_big, small, first], 115) == [first, small]


def test_free_candidates_are_never_kept():
    assert choose([_o(0, 0.0, 10), _o(1, 1e-3, 0)], 10**9) == []


def test_keep_rules_group_layers_per_role_group():
    chosen = [_o(4, 1, 1, ("attn_q", "attn_k", "attn_v")), _o(0, 1, 1, ("mlp_down",)),
              _o(0, 1, 1, ("attn_q", "attn_k", "attn_v"))]
    assert keep_rules(chosen) == [{"layers": [0, 4], "roles": ["attn_q", "attn_k", "attn_v"]},
                                  {"layers": [0], "roles": ["mlp_down"]}]


# ---- the command on the fixture ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory, bundled_fixture):
    """One measurement (W4A4), then the same key with a budget: the figures are reused, only the recipe is new."""
    out = tmp_path_factory.mktemp("sens")
    assert main(["sensitivity", str(bundled_fixture), "--out", str(out), *FEW]) == 0
    folder = out / f"{bundled_fixture.name}-sensitivity"
    first = json.loads((folder / "sensitivity.json").read_text())
    s = first["sizes"]
    budget = (s["uniform_bytes"] + 0.15 * (s["bf16_bytes"] - s["uniform_bytes"])) / 1e9
    assert main(["sensitivity", str(bundled_fixture), "--out", str(out), *FEW, "--budget-gb", f"{budget:.9f}"]) == 0
    return out, folder, first, json.loads((folder / "sensitivity.json").read_text()), budget


def test_files_and_figures(run):
    _, folder, first, report, _ = run
    assert {p.name for p in folder.iterdir()} == {"sensitivity.json", "heatmap.png", "recipe.yaml"}
    assert (folder / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cands = report["candidates"]
    # 5 trunk layers: attention q/k/v and o everywhere, dense MLPs in 0-1, shared + routed experts in 2-4
    assert {(c["layer"], c["group"]) for c in cands} == (
        {(i, g) for i in range(5) for g in ("attn_qkv", "attn_o")} | {(i, g) for i in (0, 1) for g in ("mlp_gate_up", "mlp_down")}
        | {(i, g) for i in (2, 3, 4) for g in ("shared_gate_up", "shared_down", "experts_gate_up", "experts_down", "experts")})
    qkv = next(c for c in cands if c["group"] == "attn_qkv")
    assert qkv["roles"] == ["attn_q", "attn_k", "attn_v"]  # g_proj: not quantized by the nvfp4 recipe
    for c in cands:
        f = c["figures"]
        assert f["kld_mean"] > 0 and f["kld_p99"] >= f["kld_mean"] * 0.5 and 0.5 < f["top1"] <= 1
        assert 0 < c["quantized_bytes"] < c["bf16_bytes"] and c["bytes_saved"] == c["bf16_bytes"] - c["quantized_bytes"]
    assert [c["figures"] for c in cands] == [c["figures"] for c in first["candidates"]]  # reused, not re-measured
    assert report["calibration"]["n"] == 4 and report["calibration"]["statistics_sha256"]


def test_recipe_within_budget_and_sizes_as_written(run, bundled_fixture):
    out, folder, _, report, budget = run
    b = report["budget"]
    assert b["kept"] and b["artifact_bytes"] <= budget * 1e9
    assert report["sizes"]["uniform_bytes"] < b["artifact_bytes"]
    recipe = Recipe.from_dict(yaml.safe_load((folder / "recipe.yaml").read_text()))
    assert recipe.scheme == "nvfp4" and recipe.quantize == load_recipe("nvfp4").quantize
    kept = {(k["layer"], k["group"]) for k in b["kept"]}
    ratio = {(c["layer"], c["group"]): c["figures"]["kld_mean"] / c["bytes_saved"]
             for c in report["candidates"] if c["keepable"]}
    # the best KLD per byte is always kept (the budget holds at least 15% of the gap: any one candidate fits)
    assert max(ratio, key=ratio.get) in kept
    # quantized with it, the artifact is exactly as large as predicted (every output tensor counted)
    assert main(["quantize", str(bundled_fixture), "--scheme", "nvfp4", "--recipe", str(folder / "recipe.yaml"),
                 "--out", str(out), *FEW]) == 0
    art = out / f"{bundled_fixture.name}-NVFP4-SENSITIVITY"
    assert json.loads((art / "model.safetensors.index.json").read_text())["metadata"]["total_size"] == b["artifact_bytes"]
    prov = json.loads((art / "stepq.json").read_text())
    for layer, group in kept:
        roles = next(c["tensors"] for c in report["candidates"] if (c["layer"], c["group"]) == (layer, group))
        assert all(prov["tensors"][n]["action"] == "kept" for n in roles)
    assert (art / "recipe.yaml").read_text() == (folder / "recipe.yaml").read_text()


def test_measured_weights_are_the_exported_ones(run, bundled_fixture):
    """A candidate quantized in memory reads back bit-identical to the same tensors in an artifact on disk."""
    out, _, _, report, _ = run
    from calib.stats import CalibStats

    art = out / f"{bundled_fixture.name}-NVFP4-SENSITIVITY"
    if not art.exists():
        assert main(["quantize", str(bundled_fixture), "--scheme", "nvfp4", "--out", str(out), *FEW]) == 0
        art = out / f"{bundled_fixture.name}-NVFP4"
    reader = ArtifactReader(art)
    ckpt = open_checkpoint(bundled_fixture)
    try:
        layout = layout_for("nvfp4")
        stats = CalibStats.load(out / f"{bundled_fixture.name}-calib" / "stats.safetensors")
        src = SourceReader(ckpt, stats=stats)
        done = 0
        for c in candidates(ckpt, load_recipe("nvfp4"), layout):
            if not all(reader.decisions[n]["action"] == "quantized" for n in c.tensors) or c.group == "experts":
                continue
            group = QuantizedGroup(ckpt, c, layout, src)
            for n in c.tensors:
                assert torch.equal(group.read(n), reader.read(n)), n
            done += 1
        assert done >= 5
    finally:
        reader.close()
        ckpt.close()


@pytest.mark.parametrize("flags, message", [
    (["--budget-gb", "0.001"], "--budget-gb 0.001: below the all-nvfp4 artifact (0.0121426 GB of weights)"),
    (["--budget-bpw", "4"], "--budget-bpw 4.0: below the all-nvfp4 4.501 bits per weight"),
    (["--budget-gb", "1", "--budget-bpw", "8"], "--budget-gb and --budget-bpw: give one budget, not both"),
    (["--budget-bpw", "-3"], "--budget-bpw -3.0: must be a positive number"),
    (["--scheme", "nvfp4-mtp"], "--scheme nvfp4-mtp: quantizes the MTP layers"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, bundled_fixture, flags, message):
    assert main(["sensitivity", str(bundled_fixture), "--out", str(tmp_path / "o"), *FEW, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stepq: error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "o").exists()


def test_a_model_that_does_not_fit_is_refused(tmp_path, capsys, bundled_fixture, monkeypatch):
    import stepq.sensitivity

    monkeypatch.setattr(stepq.sensitivity, "available_memory", lambda: 10**8)
    assert main(["sensitivity", str(bundled_fixture), "--out", str(tmp_path / "o"), *FEW]) == 2
    err = capsys.readouterr().err.strip()
    assert "sensitivity holds the whole model in float32 in memory" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_activation_quantization_is_measured(run, tmp_path, bundled_fixture):
    """W4A4 candidates cost more than the same weights without the engine's input quantization (NVFP4A16)."""
    _, _, _, w4a4, _ = run
    assert main(["sensitivity", str(bundled_fixture), "--scheme", "nvfp4a16", "--out", str(tmp_path), *FEW]) == 0
    a16 = json.loads((tmp_path / f"{bundled_fixture.name}-sensitivity" / "sensitivity.json").read_text())
    assert a16["calibration"]["statistics_sha256"] is None  # weight-only: no statistics needed
    total = lambda r: sum(c["figures"]["kld_mean"] for c in r["candidates"])  # noqa: E731
    assert total(w4a4) > 1.2 * total(a16)
