"""The malformed-input corpus: every bad input through the real CLI gives exit code 2, one stderr line naming the
file (and the tensor, where there is one), and nothing under the output folder.

Inputs are made here from a random fixture-shaped checkpoint (two shards + index; the trained fixture for the
calibration data cases). Shard 1 holds the embeddings, lm_head and layers 1, 3, 5; shard 2 layers 0, 2, 4, 6
(`convert.fixtures.write_random_checkpoint`); MoE layers are 2, 3, 4 and the MTP layers 5, 6.
tests/convert/test_checkpoint.py and test_safetensors_io.py test the same validators one level down.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from calib.stats import META_KEY, model_fingerprint, save_stats
from convert.artifact import ArtifactReader
from convert.fixtures import BUNDLED_FIXTURE, fixture_config, write_random_checkpoint
from stepq.cli import main

S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass
class Bad:
    """What the error line must say: `file` (a path fragment), `tensor` (or None), `pattern` (a regex)."""

    file: str
    tensor: str | None
    pattern: str
    argv: tuple[str, ...] = ("quantize", "--scheme", "fp8-block-all")
    model: Path | None = None  # default: the damaged random checkpoint


# -- helpers that damage a checkpoint ---------------------------------------------------------------------------

def _header(shard: Path) -> tuple[dict, int, bytes]:
    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), n, raw


def _rewrite_header(shard: Path, fn) -> None:
    """`fn(header)` edits the parsed header in place; the data section is kept byte for byte."""
    header, n, raw = _header(shard)
    fn(header)
    new = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _by_offset(shard: Path) -> list[str]:
    header, _, _ = _header(shard)
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _index(m: Path) -> dict:
    return json.loads((m / INDEX).read_text())


def _set_index(m: Path, idx: dict) -> None:
    (m / INDEX).write_text(json.dumps(idx))


def _edit_tensors(m: Path, shard: str, fn, reindex: bool = True) -> None:
    """Rewrite a shard with `fn(tensors)` applied; the index follows unless `reindex` is off."""
    tensors = load_file(m / shard)
    fn(tensors)
    save_file(tensors, m / shard, metadata={"format": "pt"})
    if reindex:
        idx = _index(m)
        idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v != shard}
        idx["weight_map"].update({k: shard for k in tensors})
        _set_index(m, idx)


def _config(m: Path, **overrides) -> None:
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(overrides)
    (m / "config.json").write_text(json.dumps(cfg))


# -- the corpus: each entry damages `m` (a fresh copy of the random checkpoint) and says what the error names ----

def truncated_shard(m, tmp):
    last = _by_offset(m / S2)[-1]
    (m / S2).write_bytes((m / S2).read_bytes()[:-100])
    return Bad(S2, last, r"data_offsets .* outside the \d+-byte data section")


def header_length_past_eof(m, tmp):
    raw = (m / S1).read_bytes()
    (m / S1).write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    return Bad(S1, None, r"header length \d+ past end of file")


def header_json_invalid(m, tmp):
    _, n, raw = _header(m / S1)
    (m / S1).write_bytes(raw[:8] + b"{" + b"\xff" * (n - 1) + raw[8 + n:])
    return Bad(S1, None, r"safetensors header is not valid JSON")


def overlapping_offsets(m, tmp):
    first, second = _by_offset(m / S1)[:2]

    def shift(h):  # the second tensor starts 2 bytes inside the first; its length is unchanged
        a, b = h[second]["data_offsets"]
        h[second]["data_offsets"] = [a - 2, b - 2]
    _rewrite_header(m / S1, shift)
    return Bad(S1, second, r"data overlaps the previous tensor")


def offsets_out_of_range(m, tmp):
    name = _by_offset(m / S1)[3]

    def beyond(h):
        a, b = h[name]["data_offsets"]
        h[name]["data_offsets"] = [a + 10**9, b + 10**9]
    _rewrite_header(m / S1, beyond)
    return Bad(S1, name, r"outside the \d+-byte data section")


def dtype_shape_mismatch(m, tmp):
    name = "model.layers.1.self_attn.o_proj.weight"
    _rewrite_header(m / S1, lambda h: h[name]["shape"].__setitem__(0, h[name]["shape"][0] + 1))
    return Bad(S1, name, r"BF16 x \[\d+, \d+\] needs \d+ bytes, data_offsets give \d+")


def unknown_dtype(m, tmp):
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_header(m / S1, lambda h: h[name].__setitem__("dtype", "F4"))
    return Bad(S1, name, r"unknown dtype 'F4'")


def integer_source_dtype(m, tmp):
    name = "model.layers.3.moe.router_bias"  # F32 -> I32: same byte length, so only the dtype rule catches it
    _rewrite_header(m / S1, lambda h: h[name].__setitem__("dtype", "I32"))
    return Bad(S1, name, r"dtype I32 \(source checkpoints must be BF16/F16/F32\)")


def header_entry_without_offsets(m, tmp):
    name = "model.layers.1.input_layernorm.weight"
    _rewrite_header(m / S1, lambda h: h[name].pop("data_offsets"))
    return Bad(S1, name, r"header entry must have exactly dtype, shape, data_offsets")


def hole_between_tensors(m, tmp):
    first = _by_offset(m / S1)[0]
    header, n, raw = _header(m / S1)  # 8 unaccounted bytes at the start of the data section
    for k in _by_offset(m / S1):
        a, b = header[k]["data_offsets"]
        header[k]["data_offsets"] = [a + 8, b + 8]
    new = json.dumps(header).encode()
    (m / S1).write_bytes(struct.pack("<Q", len(new)) + new + bytes(8) + raw[8 + n:])
    return Bad(S1, first, r"hole of 8 bytes before its data")


def trailing_bytes(m, tmp):
    with open(m / S1, "ab") as f:
        f.write(b"\0" * 16)
    return Bad(S1, None, r"16 trailing bytes after the last tensor")


def empty_shard_file(m, tmp):
    (m / S1).write_bytes(b"")
    return Bad(S1, None, r"shorter than the 8-byte header length")


def tensor_in_index_not_in_shard(m, tmp):
    name = "model.layers.1.self_attn.v_proj.weight"
    _edit_tensors(m, S1, lambda t: t.pop(name), reindex=False)
    return Bad(S1, name, rf"listed in {re.escape(INDEX)} but not in the shard")


def tensor_in_shard_not_in_index(m, tmp):
    idx = _index(m)
    name = "model.layers.1.self_attn.v_proj.weight"
    del idx["weight_map"][name]
    _set_index(m, idx)
    return Bad(S1, name, rf"not listed for this shard in {re.escape(INDEX)}")


def tensor_in_two_shards(m, tmp):
    name = "model.layers.1.self_attn.q_proj.weight"  # in shard 1; a copy in shard 2, and no index to arbitrate
    copy = load_file(m / S1)[name]
    _edit_tensors(m, S2, lambda t: t.__setitem__(name, copy), reindex=False)
    (m / INDEX).unlink()
    return Bad(S2, name, rf"also in {S1}")


def shard_missing(m, tmp):
    (m / S2).unlink()
    return Bad(S2, None, rf"shard listed in {re.escape(INDEX)} is missing")


def weight_map_dotdot(m, tmp):
    idx = _index(m)
    idx["weight_map"]["model.norm.weight"] = f"../{S1}"
    _set_index(m, idx)
    return Bad(INDEX, "model.norm.weight", r"weight_map path '\.\./.*' leaves the model folder")


def weight_map_absolute(m, tmp):
    idx = _index(m)
    idx["weight_map"]["lm_head.weight"] = str((m / S1).resolve())
    _set_index(m, idx)
    return Bad(INDEX, "lm_head.weight", r"weight_map path '/.*' leaves the model folder")


def index_invalid_json(m, tmp):
    (m / INDEX).write_text('{"weight_map": {')
    return Bad(INDEX, None, r"not a valid safetensors index")


def shard_symlink_outside(m, tmp):
    outside = tmp / "elsewhere" / S2
    outside.parent.mkdir()
    (m / S2).rename(outside)
    (m / S2).symlink_to(outside)
    return Bad(S2, None, r"symlink points outside the model folder")


def config_symlink_outside(m, tmp):
    outside = tmp / "elsewhere-config.json"
    (m / "config.json").rename(outside)
    (m / "config.json").symlink_to(outside)
    return Bad("config.json", None, r"symlink points outside the model folder")


def tokenizer_symlink_outside(m, tmp):
    # quantize copies tokenizer files into the artifact: a link to a file elsewhere would publish that file
    secret = tmp / "not-a-tokenizer.txt"
    secret.write_text("private")
    (m / "tokenizer.json").symlink_to(secret)
    return Bad("tokenizer.json", None, r"symlink points outside the model folder")


def config_invalid_json(m, tmp):
    (m / "config.json").write_text("{'model_type': step3p5}")
    return Bad("config.json", None, r"not valid JSON")


def config_missing_key(m, tmp):
    cfg = json.loads((m / "config.json").read_text())
    del cfg["hidden_size"]
    (m / "config.json").write_text(json.dumps(cfg))
    return Bad("config.json", None, r"missing required key 'hidden_size'")


def nan_in_expert(m, tmp):
    name = "model.layers.2.moe.up_proj.weight"
    _edit_tensors(m, S2, lambda t: t[name][3, 5].__setitem__(7, float("nan")))
    return Bad(S2, name, r"contains NaN or Inf \(1 NaN, 0 Inf values\)")


def inf_in_kept_norm(m, tmp):
    name = "model.norm.weight"  # kept as is by every recipe: the check is not only on what gets quantized
    _edit_tensors(m, S1, lambda t: t[name].__setitem__(0, float("inf")))
    return Bad(S1, name, r"contains NaN or Inf \(0 NaN, 1 Inf values\)")


def wrong_expert_count(m, tmp):
    def seven(t):
        for p in ("gate_proj", "up_proj", "down_proj"):
            t[f"model.layers.3.moe.{p}.weight"] = t[f"model.layers.3.moe.{p}.weight"][:7].clone()
    _edit_tensors(m, S1, seven)
    return Bad(S1, "model.layers.3.moe.", r"shape \[7, \d+, \d+\] disagrees with config.json \(\[8, \d+, \d+\]\)")


def config_tensor_shape_disagreement(m, tmp):
    _config(m, num_attention_heads=8)  # full-attention layers 0 and 4 now need 8 query heads
    return Bad(S2, "model.layers.0.self_attn.", r"shape \[\d+, 256\] disagrees with config.json")


def moe_layers_enum_names_dense_layer(m, tmp):
    _config(m, moe_layers_enum="1,2,3,4")
    return Bad(S1, "model.layers.1.mlp.", r"not expected in layer 1 of this config \(moe layer\)")


def unknown_tensor_name(m, tmp):
    name = "model.layers.1.self_attn.rotary_emb.inv_freq"
    _edit_tensors(m, S1, lambda t: t.__setitem__(name, torch.zeros(4)))
    return Bad(S1, name, r"unknown to the step3p5 role table")


def mtp_declared_but_missing(m, tmp):
    _edit_tensors(m, S2, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.6.")])
    return Bad(INDEX, "model.layers.6.", r"MTP layer declared by num_nextn_predict_layers but missing")


def mtp_present_but_undeclared(m, tmp):
    _config(m, num_nextn_predict_layers=1)
    return Bad(S2, "model.layers.6.", r"out-of-range layer.*undeclared MTP layer")


def pickle_only_bin(m, tmp):
    for p in [*m.glob("*.safetensors"), m / INDEX]:
        p.unlink()
    (m / "pytorch_model.bin").write_bytes(b"\x80\x04\x95never-loaded")
    return Bad(m.name, None, r"only pickle weights \(pytorch_model.bin\).*never unpickles")


def pickle_only_pt(m, tmp):
    for p in [*m.glob("*.safetensors"), m / INDEX]:
        p.unlink()
    (m / "consolidated.pt").write_bytes(b"PK\x03\x04never-loaded")
    (m / "extra.pth").write_bytes(b"PK\x03\x04never-loaded")
    return Bad(m.name, None, r"only pickle weights \(consolidated.pt, extra.pth\).*never unpickles")


def stats_from_another_model(m, tmp):
    stats = tmp / "other-stats.safetensors"
    meta = {"format_version": 1, "source": model_fingerprint(BUNDLED_FIXTURE), "experts_without_tokens": {}}
    save_stats(stats, {"model.layers.0.self_attn.q_proj.input_amax": torch.ones(())}, meta)
    return Bad(str(stats), None, r"statistics computed from another model \(config.json differs",
               argv=("quantize", "--scheme", "nvfp4", "--stats", str(stats)))


def stats_from_same_shapes_other_weights(m, tmp):
    other = write_random_checkpoint(tmp / "finetune", fixture_config(), seed=2)  # same config, other weights
    stats = tmp / "finetune-stats.safetensors"
    meta = {"format_version": 1, "source": model_fingerprint(other), "experts_without_tokens": {}}
    save_stats(stats, {"model.layers.0.self_attn.q_proj.input_amax": torch.ones(())}, meta)
    return Bad(str(stats), None, rf"statistics computed from another model \(.*{S1} has other contents\)",
               argv=("quantize", "--scheme", "nvfp4", "--stats", str(stats)))


def stats_file_not_statistics(m, tmp):
    stats = tmp / "stats.safetensors"
    save_file({"x": torch.zeros(2)}, stats)  # a valid safetensors file, but not ours
    return Bad(str(stats), None, rf"not a stepq statistics file \(no {META_KEY} metadata\)",
               argv=("quantize", "--scheme", "nvfp4", "--stats", str(stats)))


def _calibrate_on(dataset: Path) -> tuple[str, ...]:
    return ("calibrate", "--dataset", str(dataset), "--num-samples", "2", "--seq-len", "16")


def dataset_empty(m, tmp):
    ds = tmp / "empty.txt"
    ds.write_text("")
    return Bad(str(ds), None, r"dataset is empty", argv=_calibrate_on(ds), model=BUNDLED_FIXTURE)


def dataset_binary(m, tmp):
    ds = tmp / "data.txt"
    ds.write_bytes(bytes(range(256)) * 64)
    return Bad(str(ds), None, r"binary file, not text", argv=_calibrate_on(ds), model=BUNDLED_FIXTURE)


def dataset_jsonl_broken(m, tmp):
    ds = tmp / "rows.jsonl"
    ds.write_text('{"text": "fine"}\n{"text": "cut off\n')
    return Bad(str(ds), None, r"line 2: not valid JSON", argv=_calibrate_on(ds), model=BUNDLED_FIXTURE)


def dataset_too_short(m, tmp):
    ds = tmp / "short.txt"
    ds.write_text("a few words only\n")
    return Bad(str(ds), None, r"\d+ tokens, not enough for N x L = 2 x 16", argv=_calibrate_on(ds),
               model=BUNDLED_FIXTURE)


CORPUS = [
    truncated_shard, header_length_past_eof, header_json_invalid, overlapping_offsets, offsets_out_of_range,
    dtype_shape_mismatch, unknown_dtype, integer_source_dtype, header_entry_without_offsets, hole_between_tensors,
    trailing_bytes, empty_shard_file, tensor_in_index_not_in_shard, tensor_in_shard_not_in_index,
    tensor_in_two_shards, shard_missing, weight_map_dotdot, weight_map_absolute, index_invalid_json,
    shard_symlink_outside, config_symlink_outside, tokenizer_symlink_outside, config_invalid_json, config_missing_key,
    nan_in_expert, inf_in_kept_norm, wrong_expert_count, config_tensor_shape_disagreement,
    moe_layers_enum_names_dense_layer, unknown_tensor_name, mtp_declared_but_missing, mtp_present_but_undeclared,
    pickle_only_bin, pickle_only_pt, stats_from_another_model, stats_from_same_shapes_other_weights,
    stats_file_not_statistics, dataset_empty,
    dataset_binary, dataset_jsonl_broken, dataset_too_short,
]


# -- GGUF files a command reads: a GGUF artifact whose file was damaged after its export ---------------------------

def _gguf_artifact(tmp: Path) -> tuple[Path, Path]:
    """A Q8_0 GGUF artifact of the trained fixture (the random checkpoint has no tokenizer), written by gguf-py
    alone (no llama.cpp tools) -> (artifact folder, its .gguf file)."""
    from convert.gguf_job import export_gguf

    art = export_gguf(BUNDLED_FIXTURE, tmp / "artifacts", "Q8_0")
    return art, next(art.glob("*.gguf"))


def gguf_artifact_truncated(m, tmp):
    import gguf

    art, f = _gguf_artifact(tmp)
    last = max(gguf.GGUFReader(f).tensors, key=lambda t: t.data_offset).name
    f.write_bytes(f.read_bytes()[:-100])
    return Bad(f.name, last, r"data ends at byte \d+, past the end of the \d+-byte file \(truncated\?\)",
               argv=("eval", "--model", str(BUNDLED_FIXTURE)), model=art)


def gguf_artifact_bytes_flipped(m, tmp):
    art, f = _gguf_artifact(tmp)
    data = bytearray(f.read_bytes())
    data[-5000:-4990] = bytes(b ^ 0xFF for b in data[-5000:-4990])  # tensor data: still a readable GGUF
    f.write_bytes(bytes(data))
    return Bad(f.name, None, r"sha256 differs from stepq.json \(damaged or changed after the export\)",
               argv=("eval", "--model", str(BUNDLED_FIXTURE)), model=art)


CORPUS += [gguf_artifact_truncated, gguf_artifact_bytes_flipped]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("tpl") / "rand-step35", fixture_config(), seed=1)


@pytest.fixture
def model(template, tmp_path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "rand-step35"))


def _check_error_line(err: str, bad: Bad) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback, no progress bar
    line = lines[0]
    assert line.startswith("stepq: error: "), line
    assert bad.file in line, (bad.file, line)
    if bad.tensor:
        assert bad.tensor in line, (bad.tensor, line)
    assert re.search(bad.pattern, line), (bad.pattern, line)
    return line


def test_corpus_is_large_and_distinct():
    assert len(CORPUS) >= 25 and len({f.__name__ for f in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("damage", CORPUS, ids=lambda f: f.__name__)
def test_bad_input_exits_2_names_file_and_tensor_writes_nothing(damage, model, tmp_path, capsys):
    bad = damage(model, tmp_path)
    out = tmp_path / "out"
    argv = [bad.argv[0], str(bad.model or model), *bad.argv[1:], "--out", str(out)]
    capsys.readouterr()
    assert main(argv) == 2
    _check_error_line(capsys.readouterr().err, bad)
    assert not out.exists() or sorted(out.rglob("*")) == []  # no artifact, temp folder, lock or statistics


def test_the_command_prints_exactly_one_line(model, tmp_path):
    """The same through a real process, failing mid-conversion: nothing else reaches stderr (library warnings,
    progress bars, tracebacks), and the temporary folder with its finished units is removed."""
    bad = nan_in_expert(model, tmp_path)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "stepq.cli", "quantize", str(model), "--scheme", "fp8-block-all",
                        "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == ""
    _check_error_line(p.stderr, bad)
    assert not out.exists() or sorted(out.rglob("*")) == []


def test_allow_nonfinite_converts_with_a_warning_naming_each_tensor(model, tmp_path, caplog):
    nan_in_expert(model, tmp_path)
    inf_in_kept_norm(model, tmp_path)
    out = tmp_path / "out"
    assert main(["quantize", str(model), "--scheme", "fp8-block-all", "--out", str(out), "--allow-nonfinite"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all("--allow-nonfinite" in w for w in warnings), warnings  # per tensor
    assert any(S2 in w and "model.layers.2.moe.up_proj.weight" in w for w in warnings)
    assert any(S1 in w and "model.norm.weight" in w for w in warnings)
    art = ArtifactReader(out / "rand-step35-FP8-BLOCK-ALL")
    assert torch.isinf(art.read("model.norm.weight")[0])  # kept tensors are copied as they are


@pytest.mark.parametrize("scheme", ["fp8-block", "fp8-dynamic", "nvfp4a16"])
def test_all_zero_expert_quantizes_to_finite_values_that_decode_to_zero(model, tmp_path, scheme, capsys):
    """No division by zero in any scale rule: an all-zero expert (and its fused partner) round-trips to zeros.
    (tests/test_cli.py checks the NVFP4 codes of the same case; this decodes every scheme's tensors.)"""
    def zero(t):
        for p in ("gate_proj", "up_proj", "down_proj"):
            t[f"model.layers.2.moe.{p}.weight"][4] = 0
    _edit_tensors(model, S2, zero)
    assert main(["quantize", str(model), "--scheme", scheme, "--out", str(tmp_path / "out")]) == 0
    art = ArtifactReader(tmp_path / "out" / f"rand-step35-{scheme.upper()}")
    for name, shard in _index(art.path)["weight_map"].items():
        t = art.stored(name)
        if t.is_floating_point():
            assert torch.isfinite(t.float()).all(), name
    for p in ("gate_proj", "up_proj", "down_proj"):
        w = art.read(f"model.layers.2.moe.{p}.weight")
        assert torch.equal(w[4].float(), torch.zeros_like(w[4].float())), p
        assert w[3].abs().sum() > 0  # its neighbours are real weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nonfinite_check_agrees_with_torch_on_every_16_bit_value(dtype):
    """The fast exponent-bits check (`all_finite`) against torch.isfinite, over all 65536 bit patterns."""
    from quant.fast_common import all_finite

    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = torch.isfinite(every)
    assert 0 < int(finite.sum()) < len(every)
    assert all_finite(every[finite])
    assert not any(all_finite(v.reshape(1)) for v in every[~finite])


def test_nonfinite_check_float32_edges():
    from quant.fast_common import all_finite

    edges = torch.tensor([0.0, -0.0, 1e-45, torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max])
    assert all_finite(edges)
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert not all_finite(torch.cat([edges, torch.tensor([bad])]))


# -- a damaged partial GGUF in the resumable temporary folder: detected and made again, not a crash --------------

def _truncate(f: Path) -> str:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "earlier partial output is for another plan (or unusable); starting over"


def _flip(f: Path) -> str:
    """Damage the bytes of a tensor the earlier run recorded as finished (the first in the file)."""
    import gguf

    first = min(gguf.GGUFReader(f).tensors, key=lambda t: t.data_offset)
    with open(f, "r+b") as fh:
        fh.seek(first.data_offset + 10)
        fh.write(b"\x55\x66\x77")
    return f"{first.name}: output {first.name} differs from what the earlier run recorded; converting it again"


@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "flipped"])
def test_a_damaged_partial_gguf_is_made_again(llama_cpp, tmp_path, monkeypatch, caplog, damage):
    """A kill after 60 tensors of a K-quant export were recorded, then the partial file damaged (disk error, a
    stray writer): the re-run notices it by the recorded digests (or the file's size), writes again what is
    damaged, and gives the uninterrupted run's file."""
    from convert.writer import ArtifactWriter

    argv = ["quantize", str(BUNDLED_FIXTURE), "--scheme", "gguf", "--qtype", "Q4_K_M", "--out"]
    assert main([*argv, str(tmp_path / "ref")]) == 0
    real, done = ArtifactWriter.commit, []

    def killed(self, *args):
        real(self, *args)
        done.append(args[0])
        if len(done) == 60:
            raise KeyboardInterrupt  # stands for the kill: not bad input, so the partial folder is kept
    monkeypatch.setattr(ArtifactWriter, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, str(tmp_path / "out")])
    monkeypatch.undo()
    partial = tmp_path / "out" / ".tiny-step35-GGUF-Q4_K_M.partial" / "tiny-step35-Q4_K_M.gguf"
    expected = damage(partial)
    caplog.set_level("INFO")
    assert main([*argv, str(tmp_path / "out")]) == 0
    assert expected in caplog.text
    name = "tiny-step35-GGUF-Q4_K_M/tiny-step35-Q4_K_M.gguf"
    assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
