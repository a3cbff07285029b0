"""K/IQ GGUF in one pass (`convert.gguf_quantize`) against llama.cpp's own two-pass flow, byte for byte.

The reference is what stepq did before, with llama.cpp's tools: the BF16 GGUF (identical to llama.cpp's converter,
tests/test_gguf.py), the imatrix file from the same statistics (tests/test_gguf_imatrix.py), `llama-quantize`
with the recipe's arguments, `llama-gguf-split` when the file is over the split size. Every K/IQ type stepq offers
is compared (the imatrix-only ones with an imatrix), plus an imatrix K type, a split file without MTP, and a
draft-only MTP file: every byte of every file, metadata and tensor data.

Bad input: a type the built ggml lacks, an imatrix without a tensor the type needs: one line, exit 2, nothing
written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from calib.stats import CalibStats
from convert import ggml_quants
from convert.checkpoint import open_checkpoint
from convert.config import model_name
from convert.fixtures import BUNDLED_FIXTURE
from convert.gguf_export import write_gguf
from convert.gguf_imatrix import write_imatrix
from convert.gguf_job import export_gguf
from convert.gguf_recipe import _MIXES, IMATRIX_ONLY_TYPES, recipe_for
from convert.gguf_tools import gguf_split, llama_quantize
from stepq.calibrate import calibrate
from stepq.cli import main

DATA = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-step35-data"
NEEDS_IMATRIX = sorted(q for q in _MIXES if set(_MIXES[q]) & IMATRIX_ONLY_TYPES)
PLAIN = sorted(q for q in _MIXES if q not in NEEDS_IMATRIX)


@pytest.fixture(scope="module")
def stats(tmp_path_factory) -> CalibStats:
    out = tmp_path_factory.mktemp("calib")
    return CalibStats.load(calibrate(BUNDLED_FIXTURE, str(DATA / "calib.txt"), out_root=out, n=8, seq_len=128,
                                     progress=False))


def two_pass(model: Path, work: Path, qtype: str, *, mtp: bool = True, mtp_only: bool = False,
             stats: CalibStats | None = None, split: int | None = None) -> list[Path]:
    """llama.cpp's flow: BF16 GGUF (+ imatrix) -> llama-quantize -> llama-gguf-split when over `split` bytes."""
    work.mkdir(parents=True)
    ckpt = open_checkpoint(model)
    try:
        recipe = recipe_for(qtype, tuple(ckpt.config.mtp_layers) if mtp else (), imatrix=stats is not None,
                            n_embd=ckpt.config.hidden_size, mtp_only=mtp_only)
        inter = write_gguf(ckpt, work / "intermediate-BF16.gguf", "BF16", mtp, mtp_only=mtp_only).files[0]
        args = recipe.llama_quantize_args()
        if stats is not None:
            write_imatrix(stats, ckpt, work / "imatrix.gguf", mtp=mtp)
            args = ["--imatrix", "imatrix.gguf", *args]  # relative, as stepq records it
    finally:
        ckpt.close()
    stem = f"{'mtp-' if mtp_only else ''}{model_name(model)}-{qtype}"
    quantized = work / f"{stem}.gguf"
    llama_quantize(inter, quantized, qtype, args, cwd=work)
    if split is not None and quantized.stat().st_size > split:
        (work / "split").mkdir()
        return gguf_split(quantized, work / "split" / stem, split)
    return [quantized]


def _assert_identical(ours_dir: Path, reference: list[Path]) -> None:
    ours = sorted(ours_dir.glob("*.gguf"))
    assert [p.name for p in ours] == [p.name for p in reference]
    for a, b in zip(ours, reference):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs from llama-quantize's"


@pytest.mark.parametrize("qtype", PLAIN)
def test_identical_to_llama_quantize(llama_cpp, tmp_path, qtype):
    ref = two_pass(BUNDLED_FIXTURE, tmp_path / "ref", qtype)
    _assert_identical(export_gguf(BUNDLED_FIXTURE, tmp_path / "ours", qtype), ref)


@pytest.mark.parametrize("qtype", [*NEEDS_IMATRIX, "Q4_K_M", "IQ4_XS"])
def test_identical_with_imatrix(llama_cpp, stats, tmp_path, qtype):
    ref = two_pass(BUNDLED_FIXTURE, tmp_path / "ref", qtype, stats=stats)
    _assert_identical(export_gguf(BUNDLED_FIXTURE, tmp_path / "ours", qtype, imatrix=stats), ref)


def test_identical_split_without_mtp(llama_cpp, tmp_path):
    ref = two_pass(BUNDLED_FIXTURE, tmp_path / "ref", "Q4_K_M", mtp=False, split=2_000_000)
    assert len(ref) > 1
    _assert_identical(export_gguf(BUNDLED_FIXTURE, tmp_path / "ours", "Q4_K_M", mtp=False,
                                  max_shard_bytes=2_000_000), ref)


def test_identical_draft_only_mtp(llama_cpp, tmp_path):
    ref = two_pass(BUNDLED_FIXTURE, tmp_path / "ref", "Q6_K", mtp_only=True)
    _assert_identical(export_gguf(BUNDLED_FIXTURE, tmp_path / "ours", "Q6_K", mtp_only=True), ref)


# -- bad input -------------------------------------------------------------------------------------------------

class _WithoutType:
    """The built library, as if it had been built without one type."""

    def __init__(self, lib, missing: str):
        self._lib, self._missing = lib, int(ggml_quants.gguf.GGMLQuantizationType[missing])

    def __getattr__(self, name):
        return getattr(self._lib, name)

    def ggml_type_name(self, t: int):
        return None if t == self._missing else self._lib.ggml_type_name(t)


def _refused(argv: list[str], out: Path, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    return err


def test_a_type_the_built_ggml_lacks(llama_cpp, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ggml_quants, "_lib", _WithoutType(ggml_quants.library(), "Q5_K"))
    out = tmp_path / "out"
    err = _refused(["quantize", str(BUNDLED_FIXTURE), "--scheme", "gguf", "--qtype", "Q4_K_M", "--out", str(out)],
                   out, capsys)
    assert "Q5_K" in err and "does not have it" in err


def test_an_imatrix_without_a_tensor_the_type_needs(llama_cpp, stats, tmp_path, capsys):
    with safe_open(stats.path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(stats.path)
    module = "model.layers.3.moe.down_proj"  # the routed experts' down projections of one layer
    kept = {n: t for n, t in tensors.items() if not n.startswith(module + ".")}
    assert len(kept) < len(tensors)
    partial = tmp_path / "partial-stats.safetensors"
    save_file(kept, partial, metadata=meta)
    out = tmp_path / "out"
    err = _refused(["quantize", str(BUNDLED_FIXTURE), "--scheme", "gguf", "--qtype", "IQ2_XS", "--imatrix",
                    "--stats", str(partial), "--out", str(out)], out, capsys)
    assert "blk.3.ffn_down_exps.weight" in err and "needs an importance matrix" in err
