"""GPTQ through the pipeline on the bundled fixture (`--method gptq|gptq+search`): the artifact keeps the format and
round-to-nearest's scales (GPTQ moves codes, not grids), the pass is sequential on the quantized layers, chunking the
experts' Hessians changes no byte, an interrupted pass resumes to the same bytes, bad input is one line, exit 2.

A small calibration set (8 x 128 tokens) keeps each GPTQ run under a minute; some experts then see fewer routed
tokens than their 256 input channels and are recorded as quantized on the grid without GPTQ.
"""

import json
import logging

import pytest
import torch

from calib.data import load_calibration
from calib.stats import CalibStats
from calib.stream import Activations, stream_forward
from convert.artifact import ArtifactReader
from convert.checkpoint import open_checkpoint
from eval.forward import ArtifactWeights
from stepq.calibrate import calibrate
from stepq.cli import main
from stepq.quantize import quantize

N, SEQ = 8, 128


@pytest.fixture(scope="module")
def stats(tmp_path_factory, bundled_fixture):
    out = tmp_path_factory.mktemp("gptq-calib")
    return CalibStats.load(calibrate(bundled_fixture, out_root=out, n=N, seq_len=SEQ, device="cpu", progress=False))


@pytest.fixture(scope="module")
def made(tmp_path_factory, bundled_fixture, stats):
    out = tmp_path_factory.mktemp("gptq")
    return {m: quantize(bundled_fixture, "nvfp4a16", out / m, stats=stats, method=m, device="cpu")
            for m in ("rtn", "gptq", "gptq+search")}


def test_gptq_keeps_round_to_nearest_grids_and_moves_codes(made):
    rtn, gptq = ArtifactReader(made["rtn"]), ArtifactReader(made["gptq"])
    names = sorted(rtn.stored_names())
    assert names == sorted(gptq.stored_names())
    scales = [n for n in names if n.endswith(("weight_scale", "weight_global_scale"))]
    packed = [n for n in names if n.endswith("weight_packed")]
    assert scales and packed
    # GPTQ runs on round-to-nearest's grid: every FP8 group scale and (fused, per-expert) global scale is RTN's
    assert all(torch.equal(rtn.stored(n), gptq.stored(n)) for n in scales)
    unchanged = {n for n in packed if torch.equal(rtn.stored(n), gptq.stored(n))}
    # GPTQ moved codes in every tensor it quantized; the experts it skipped (too few routed tokens) are RTN's
    skipped = {f"{m.rsplit('.', 1)[0]}.experts.{r['expert']}.{m.rsplit('.', 1)[1]}.weight_packed"
               for r in json.loads((made["gptq"] / "stepq.json").read_text())["gptq"]["not_gptq"]
               for m in r["module"].split("+")}
    assert skipped and unchanged == skipped


def test_gptq_on_searched_scales_keeps_the_fused_ties(made):
    rtn, both = ArtifactReader(made["rtn"]), ArtifactReader(made["gptq+search"])
    gs = [n for n in rtn.stored_names() if n.endswith("weight_global_scale")]
    assert all(torch.equal(rtn.stored(n), both.stored(n)) for n in gs)  # global scales tied as RTN ties them
    group = [n for n in rtn.stored_names() if n.endswith(".weight_scale") and ".experts." in n]
    assert any(not torch.equal(rtn.stored(n), both.stored(n)) for n in group)  # the search moved group scales


def test_provenance_records_method_settings_versions_and_experts_without_gptq(made):
    prov = json.loads((made["gptq"] / "stepq.json").read_text())
    assert prov["method"] == "gptq"
    g = prov["gptq"]
    assert g["settings"]["actorder"] == "weight" and g["settings"]["dampening"] == 0.01
    assert "llmcompressor 0.14.0.1" in g["settings"]["implementation"]
    assert prov["versions"]["llmcompressor"] == "0.14.0.1"
    assert g["modules"] == g["gptq_modules"] + len(g["not_gptq"])
    for r in g["not_gptq"]:  # only experts may skip GPTQ, each for a stated reason matching its token count
        assert "expert" in r and r["method"].startswith("grid only")
        # routed on the quantized layers' outputs (the pass is sequential), so not the statistics' counts
        assert r["tokens"] < 256 and (r["tokens"] == 0) == ("no routed tokens" in r["method"])
    assert not (made["gptq"].parent / f".{made['gptq'].name}.gptq").exists()  # the pass's files are gone


class _Capture:
    """calib.stream.Checkpoints that keeps each layer's output in memory."""

    def __init__(self):
        self.outputs = {}

    def resume(self, spill_bytes):
        return None

    def spill_file(self, layer):
        return None

    def commit(self, layer, output: Activations):
        self.outputs[layer] = output.tensor().clone()


def test_the_pass_is_sequential_on_the_quantized_layers(tmp_path, bundled_fixture, stats):
    """The GPTQ pass's last layer output equals the artifact's own forward on the calibration samples: every layer
    ran, after quantization, on exactly the weights the artifact holds (and calibrated the next on that output)."""
    from calib.compute import resolve
    from calib.gptq import run_gptq
    from convert.safetensors_export import load_recipe, plan_units
    from quant.layouts import layout_for

    ckpt = open_checkpoint(bundled_fixture)
    recipe = load_recipe("nvfp4a16")
    units, layout = plan_units(ckpt, recipe), layout_for("nvfp4a16", "gptq")
    folder = tmp_path / "pass"
    run_gptq(ckpt, units, layout, stats, folder, compute=resolve("cpu"), extra_key={"recipe": recipe.to_dict()},
             progress=False)
    last = ckpt.config.num_layers - 1
    acts = sorted(folder.glob("act-*.bin"))
    assert [p.name for p in acts] == [f"act-{last:03d}.bin"]
    data = load_calibration(bundled_fixture, stats.meta["dataset"]["id"], N, SEQ, stats.meta["seed"])
    shape = (N, SEQ - len(ckpt.config.mtp_layers), ckpt.config.hidden_size)
    pass_out = Activations(shape, torch.bfloat16, 1 << 40, file=acts[0], create=False).tensor()
    art = quantize(bundled_fixture, "nvfp4a16", tmp_path / "out", stats=stats, method="gptq", device="cpu")
    reader = ArtifactReader(art)
    capture = _Capture()
    stream_forward(ArtifactWeights(ckpt, reader), data.ids, compute=resolve("cpu"), checkpoints=capture,
                   progress=False)
    assert torch.equal(capture.outputs[last], pass_out)


def test_expert_hessians_in_chunks_give_the_same_bytes(tmp_path, bundled_fixture, stats, made):
    one_expert = 4 * 256 * 256  # the gate/up Hessian of one expert: one expert per pass
    art = quantize(bundled_fixture, "nvfp4a16", tmp_path, stats=stats, method="gptq", device="cpu",
                   gptq_hessian_bytes=one_expert)
    prov = json.loads((art / "stepq.json").read_text())
    assert max(prov["gptq"]["forward_passes_per_layer"].values()) == 8 + 1  # 8 experts, then the quantized run
    for f in sorted(made["gptq"].glob("*.safetensors")):
        assert (art / f.name).read_bytes() == f.read_bytes(), f.name


def test_an_interrupted_pass_resumes_to_the_same_bytes(tmp_path, bundled_fixture, stats, made, monkeypatch, caplog):
    from calib import gptq as gptq_mod

    real = gptq_mod.GptqPass.run_layer

    def dies_at_layer_3(self, module, prefix, layer, run):
        if layer == 3:
            raise KeyboardInterrupt
        return real(self, module, prefix, layer, run)

    monkeypatch.setattr(gptq_mod.GptqPass, "run_layer", dies_at_layer_3)
    with pytest.raises(KeyboardInterrupt):
        quantize(bundled_fixture, "nvfp4a16", tmp_path, stats=stats, method="gptq", device="cpu")
    assert sorted(p.name for p in (tmp_path / ".tiny-step35-NVFP4A16.gptq").glob("stats-*")) == [
        f"stats-{i:03d}.safetensors" for i in range(3)]
    monkeypatch.setattr(gptq_mod.GptqPass, "run_layer", real)
    with caplog.at_level(logging.INFO):
        art = quantize(bundled_fixture, "nvfp4a16", tmp_path, stats=stats, method="gptq", device="cpu")
    assert "resumed: 3 layers reused" in caplog.text
    for f in sorted(made["gptq"].glob("*.safetensors")):
        assert (art / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("args, message", [
    (["--scheme", "fp8-static", "--method", "gptq+search"],
     "--method gptq+search: not available for fp8-static (methods: rtn, gptq)"),
    (["--scheme", "nvfp4a16", "--method", "gptq", "--num-samples", "1", "--seq-len", "64"],
     ("model.layers.0.mlp.down_proj: GPTQ needs at least 512 calibration tokens for its 512x512 Hessian, "
      "the calibration set gave 64: use more samples (--num-samples)")),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, bundled_fixture, capsys, args, message):
    assert main(["quantize", str(bundled_fixture), "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"stepq: error: {message}"
    assert not [p for p in tmp_path.iterdir() if "NVFP4" in p.name or "FP8" in p.name]


@pytest.mark.parametrize("scheme", ["nvfp4", "nvfp4-modelopt", "fp8-static", "fp8-dynamic", "fp8-block"])
def test_every_scheme_gets_the_same_format_with_gptq(tmp_path, bundled_fixture, stats, scheme):
    """Same tensors, dtypes, shapes and config as round-to-nearest (what the engines load is unchanged), the values
    on the format's grid (read back by the independent decoders), GPTQ's codes different."""
    rtn = ArtifactReader(quantize(bundled_fixture, scheme, tmp_path / "rtn", stats=stats))
    gptq = ArtifactReader(quantize(bundled_fixture, scheme, tmp_path / "gptq", stats=stats, method="gptq",
                                   device="cpu"))
    assert json.loads((rtn.path / "config.json").read_text()) == json.loads((gptq.path / "config.json").read_text())
    names = sorted(rtn.stored_names())
    assert names == sorted(gptq.stored_names())
    for n in names:
        a, b = rtn.stored(n), gptq.stored(n)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), n
    moved = [n for n in rtn.source_names() if rtn.decisions[n]["action"] != "kept"
             and not torch.equal(rtn.read(n), gptq.read(n))]
    assert len(moved) > 0.5 * sum(d["action"] != "kept" for d in rtn.decisions.values())
