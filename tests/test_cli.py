"""The `stepq` command as users meet it: subcommands, exit codes, one-line errors, nothing written on failure."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from calib.data import FIXTURE_DATA
from convert.hub import pull
from stepq.cli import main


def run(*args):
    p = subprocess.run([sys.executable, "-m", "stepq.cli", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def test_inspect_json(random_ckpt, capsys):
    assert main(["inspect", str(random_ckpt), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["layout"]["mtp_layers"] == [5, 6] and s["layout"]["moe_layers"] == [2, 3, 4]
    assert s["roles"]["experts_gate"]["tensors"] == 3 and s["roles"]["router_bias"]["dtypes"] == ["F32"]
    assert s["tensors"] == sum(r["tensors"] for r in s["roles"].values())


def test_inspect_table(random_ckpt, capsys):
    assert main(["inspect", str(random_ckpt)]) == 0
    out = capsys.readouterr().out
    assert "MTP [5, 6]" in out and "mtp_head" in out


def test_pull_accepts_and_validates_a_local_folder(random_ckpt, tmp_path):
    assert pull(str(random_ckpt)) == random_ckpt
    with pytest.raises(Exception, match="neither a local folder nor a Hub repo id"):
        pull(str(tmp_path / "nope" / "deeper" / "x"))


def _truncate(ckpt):
    shard = ckpt / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])


def _nan(ckpt):
    shard = ckpt / "model-00001-of-00002.safetensors"
    t = load_file(shard)
    name = next(k for k in t if k.endswith("moe.gate_proj.weight"))
    t[name][1, 2, 3] = float("nan")
    save_file(t, shard, metadata={"format": "pt"})


def _header_lies(ckpt):
    shard = ckpt / "model-00001-of-00002.safetensors"
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"][0] += 1
    new = json.dumps(header).encode()
    shard.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def _bin_only(ckpt):
    for p in ckpt.glob("*.safetensors"):
        p.unlink()
    (ckpt / "model.safetensors.index.json").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")


def _missing_shard(ckpt):
    os.remove(ckpt / "model-00001-of-00002.safetensors")


@pytest.mark.parametrize("damage, message", [
    (_truncate, r"model-00002-of-00002\.safetensors: .*trailing|outside"),
    (_nan, r"model-00001-of-00002\.safetensors: tensor model\.layers\.\d\.moe\.gate_proj\.weight: contains NaN"),
    (_header_lies, r"model-00001-of-00002\.safetensors: tensor .*needs \d+ bytes"),
    (_bin_only, r"only pickle weights"),
    (_missing_shard, r"model-00001-of-00002\.safetensors: shard listed .* is missing"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(random_ckpt, tmp_path, damage, message):
    damage(random_ckpt)
    out = tmp_path / "out"
    code, stdout, stderr = run("quantize", random_ckpt, "--scheme", "fp8-block-all", "--out", out)
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("stepq: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists() or list(out.iterdir()) == []


def test_unknown_scheme_and_existing_output(random_ckpt, tmp_path):
    code, _, err = run("quantize", random_ckpt, "--scheme", "int3", "--out", tmp_path)
    assert code == 2 and "unknown (bundled recipes: fp8-block, fp8-block-all, fp8-dynamic, fp8-static, nvfp4" in err
    assert main(["quantize", str(random_ckpt), "--scheme", "fp8-block", "--out", str(tmp_path)]) == 0
    code, _, err = run("quantize", random_ckpt, "--scheme", "fp8-block", "--out", tmp_path)
    assert code == 2 and "already exists (pass --force" in err
    assert main(["quantize", str(random_ckpt), "--scheme", "fp8-block", "--out", str(tmp_path), "--force"]) == 0


def test_recipe_file_with_unknown_keys_is_bad_input(random_ckpt, tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("name: x\nscheme: fp8-block\nquantize: [experts_gate]\nfoo: 1\n")
    code, _, err = run("quantize", random_ckpt, "--scheme", "x", "--recipe", r, "--out", tmp_path / "o")
    assert code == 2 and "unknown recipe keys ['foo']" in err
    r.write_text("name: x\nscheme: fp8-block\nquantize: [experts_gate]\n")
    code, _, err = run("quantize", random_ckpt, "--scheme", "x", "--recipe", r, "--out", tmp_path / "o")
    assert code == 2 and "fused with ['experts_up']" in err


@pytest.mark.parametrize("command", [["eval", "/nonexistent-artifact", "--model", "fixtures/tiny-step35"],
                                     ["gate", "/nonexistent-artifact"],
                                     ["publish", "/nonexistent-artifact", "--repo-id", "org/name", "--dry-run"]])
def test_later_stages_refuse_a_missing_artifact(command):
    code, out, err = run(*command)
    assert code in (1, 2) and len(err.strip().splitlines()) == 1 and "/nonexistent-artifact" in err, (code, err)


def test_all_zero_expert_quantizes_without_nan(random_ckpt, tmp_path):
    shard = random_ckpt / "model-00001-of-00002.safetensors"
    t = load_file(shard)
    name = next(k for k in t if k.endswith("moe.up_proj.weight"))
    t[name][0] = 0
    t[name.replace("up_proj", "gate_proj")][0] = 0
    save_file(t, shard, metadata={"format": "pt"})
    assert main(["quantize", str(random_ckpt), "--scheme", "nvfp4a16", "--out", str(tmp_path / "out")]) == 0
    art = tmp_path / "out" / "rand-step35-NVFP4A16"
    out = {}
    for p in art.glob("*.safetensors"):
        out.update(load_file(p))
    layer = name.split(".")[2]
    for proj in ("gate_proj", "up_proj"):
        prefix = f"model.layers.{layer}.moe.experts.0.{proj}"
        assert torch.isfinite(out[f"{prefix}.weight_global_scale"]).all()
        assert torch.isfinite(out[f"{prefix}.weight_scale"].float()).all()
        assert (out[f"{prefix}.weight_packed"] & 0x77).eq(0).all()  # every code decodes to (signed) zero


def test_max_shard_size_splits_the_artifact(random_ckpt, tmp_path):
    assert main(["quantize", str(random_ckpt), "--scheme", "fp8-dynamic", "--out", str(tmp_path / "o"),
                 "--max-shard-size", "4MB"]) == 0
    art = tmp_path / "o" / "rand-step35-FP8-DYNAMIC"
    shards = sorted(p.name for p in art.glob("*.safetensors"))
    assert len(shards) >= 3 and all(p.stat().st_size <= 4_000_000 + 1_000_000 for p in art.glob("*.safetensors"))
    index = json.loads((art / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(index.values())) == shards
    assert json.loads((art / "stepq.json").read_text())["shards"] == shards


def test_calibrate_then_quantize_reuses_matching_statistics(bundled_fixture, tmp_path):
    common = ["--out", str(tmp_path), "--num-samples", "4", "--seq-len", "128"]
    code, out, err = run("calibrate", bundled_fixture, *common)
    assert code == 0, err
    stats = tmp_path / f"{bundled_fixture.name}-calib" / "stats.safetensors"
    assert out.strip() == str(stats) and stats.is_file()
    mtime = stats.stat().st_mtime_ns
    code, out, err = run("quantize", bundled_fixture, "--scheme", "nvfp4", *common)
    assert code == 0, err
    assert "reusing" in err and stats.stat().st_mtime_ns == mtime
    prov = json.loads((tmp_path / f"{bundled_fixture.name}-NVFP4" / "stepq.json").read_text())
    from calib.stats import CalibStats
    assert prov["calibration"]["statistics_sha256"] == CalibStats.load(stats).sha256
    code, _, err = run("quantize", bundled_fixture, "--scheme", "nvfp4", *common[:2], "--num-samples", "5",
                       "--seq-len", "128", "--force")
    assert code == 0 and "reusing" not in err and stats.stat().st_mtime_ns != mtime  # changed settings recompute


@pytest.mark.parametrize("scheme, flags, refused", [
    ("gguf", ["--recipe", "r.yaml"], "--recipe: does not apply to --scheme gguf (its recipe is --qtype)"),
    ("gguf", ["--method", "search", "--allow-nonfinite"],
     "--method, --allow-nonfinite: do not apply to --scheme gguf (its recipe is --qtype)"),
    ("gguf", ["--stats", "s.safetensors"],
     "--stats: does not apply to --scheme gguf without --imatrix (no calibration is used)"),
    ("fp8-block", ["--qtype", "Q4_K_M"], "--qtype: does not apply to --scheme fp8-block (GGUF only)"),
    ("nvfp4", ["--no-mtp", "--imatrix"], "--no-mtp, --imatrix: do not apply to --scheme nvfp4 (GGUF only)"),
    ("nvfp4a16", ["--mtp-only"], "--mtp-only: does not apply to --scheme nvfp4a16 (GGUF only)"),
    ("fp8-dynamic", ["--num-samples", "8", "--all-experts"],
     "--num-samples, --all-experts: do not apply to --scheme fp8-dynamic with --method rtn (data-free)"),
])
def test_flags_that_do_not_apply_are_refused(random_ckpt, tmp_path, capsys, scheme, flags, refused):
    """Silently ignoring them would let a user believe e.g. an NVFP4 artifact dropped its MTP head."""
    assert main(["quantize", str(random_ckpt), "--scheme", scheme, "--out", str(tmp_path), *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"stepq: error: {refused}"]
    assert list(tmp_path.iterdir()) == [random_ckpt]  # nothing written beside the source


def test_flags_that_apply_are_accepted(bundled_fixture, tmp_path):
    """The same flags where they mean something: calibration for a search, --num-samples with it."""
    assert main(["quantize", str(bundled_fixture), "--scheme", "nvfp4a16", "--method", "search", "--num-samples", "2",
                 "--seq-len", "32", "--dataset", str(FIXTURE_DATA), "--out", str(tmp_path)]) == 0
    prov = json.loads((tmp_path / "tiny-step35-NVFP4A16" / "stepq.json").read_text())
    assert prov["method"] == "search" and prov["calibration"]["settings"]["n"] == 2
