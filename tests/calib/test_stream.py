"""Golden test: the layer-streamed forward equals the whole-model reference (trunk logits and every MTP depth),
with activations in RAM and on disk; one layer in memory at a time; lm_head read only when logits are asked for."""

import gc
import weakref

import pytest
import torch

import calib.layers as layers
from calib.data import load_calibration
from calib.reference import load_reference
from calib.stream import Activations, stream_forward
from convert.checkpoint import open_checkpoint
from convert.fixtures import fixture_config

ATOL = 1e-4
N, L = 6, 160  # L > sliding window (64): the sliding mask matters


@pytest.fixture(scope="module")
def ids(model_dir):
    return load_calibration(model_dir, n=N, seq_len=L).ids


@pytest.fixture(scope="module")
def reference(model_dir, ids):
    model = load_reference(model_dir)
    with torch.no_grad():
        logits, hidden, mtp = model.forward_with_mtp(ids)
    return logits, hidden, mtp


@pytest.mark.parametrize("on_disk", [False, True])
def test_golden_vs_reference(model_dir, ids, reference, on_disk, tmp_path):
    ckpt = open_checkpoint(model_dir)
    try:
        res = stream_forward(ckpt, ids, keep_outputs=True, spill_bytes=0 if on_disk else 1 << 40,
                             micro_batch_tokens=4 * L, tmp_dir=str(tmp_path), progress=False)  # batches of 4 + 2
    finally:
        ckpt.close()
    assert res.spilled is on_disk
    assert list(tmp_path.iterdir()) == []  # spilled activations are deleted
    logits, hidden, mtp = reference
    torch.testing.assert_close(res.hidden, hidden, atol=ATOL, rtol=0)
    torch.testing.assert_close(res.logits, logits, atol=ATOL, rtol=0)
    assert len(res.mtp_logits) == len(mtp) == fixture_config()["num_nextn_predict_layers"]
    for k, (got, want) in enumerate(zip(res.mtp_logits, mtp), start=1):
        assert got.shape == (N, L - k, logits.shape[-1])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_one_layer_ahead_at_most_and_no_heads_read(model_dir, ids, monkeypatch):
    """The layer that runs and the one built ahead of it are the only ones alive; without a head sink neither the
    lm_head nor an MTP head's output projection is read."""
    built, reads = [], []
    orig_build = layers.build_layer

    def build(ckpt, layer, compute, heads=False):
        gc.collect()
        alive = [ref for ref in built if ref() is not None]
        assert len(alive) <= 1, f"{len(alive)} earlier layers still alive while building layer {layer}"
        module, prefix = orig_build(ckpt, layer, compute, heads)
        built.append(weakref.ref(module))
        return module, prefix

    monkeypatch.setattr(layers, "build_layer", build)
    ckpt = open_checkpoint(model_dir)
    orig_read = ckpt.read
    ckpt.read = lambda name: reads.append(name) or orig_read(name)
    try:
        res = stream_forward(ckpt, ids[:2, :80], progress=False)
    finally:
        ckpt.close()
    cfg = ckpt.config
    assert len(built) == cfg.num_layers
    assert res.logits is None and res.mtp_logits == []
    assert "lm_head.weight" not in reads and "model.embed_tokens.weight" in reads
    assert not [n for n in reads if "shared_head.output" in n]
    assert all(reads.count(n) == 1 for n in reads if n.startswith("model.layers."))  # each tensor read once


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_disk_roundtrip(tmp_path, dtype):
    x = torch.randn(3, 5, 7).to(dtype)
    a = Activations(x.shape, dtype, spill_bytes=0, tmp_dir=str(tmp_path))
    assert a.on_disk and len(list(tmp_path.iterdir())) == 1
    a[0:2] = x[0:2]
    a[2:3, :4] = x[2:3, :4]
    a[2:3, 4:] = x[2:3, 4:]
    assert torch.equal(a[:], x) and a[1:2, 2:].dtype == dtype
    a.close()
    assert list(tmp_path.iterdir()) == []
    b = Activations(x.shape, dtype, spill_bytes=1 << 30)
    b[:] = x
    assert not b.on_disk and torch.equal(b.tensor(), x)
