"""The BF16 reference outputs on disk: the space they need is checked before any work, a damaged folder reads as
missing, abandoned temporary folders go, and the sinks refuse what does not fit."""

import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from convert.checkpoint import open_checkpoint
from convert.errors import BadInput
from eval import forward
from eval.metrics import PositionSink
from eval.reference import LOGPROBS, POSITIONS, check_space, open_reference, reference_bytes, reference_outputs

N, T, V, DEPTHS = 2, 8, 16, 2


def _free(monkeypatch, free: int) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))


def test_the_real_eval_set_needs_its_size_free(tmp_path, monkeypatch):
    _free(monkeypatch, 3_100_000_000)
    need = reference_bytes(8, 2048, 128896, 1)
    assert 8.44e9 < need < 8.46e9  # 8 x 2048 positions x 128896 x 4 B, and a few small arrays
    with pytest.raises(BadInput) as e:
        check_space(tmp_path / "out" / "x-evalref", need)  # not created yet: its nearest folder's disk
    assert str(e.value) == f"{tmp_path}/out/x-evalref: the BF16 reference outputs need 8.4 GB, 3.1 GB free"
    check_space(tmp_path / "out" / "x-evalref", 3_000_000_000)


def _stop(*args, **kwargs):
    raise RuntimeError("stop: the reference forward ran")


def test_no_room_fails_before_the_forward_runs(bundled_fixture, tmp_path, monkeypatch):
    monkeypatch.setattr(forward, "source_forward", _stop)
    _free(monkeypatch, 1000)
    ids = torch.zeros((4, 64), dtype=torch.long)
    with pytest.raises(BadInput, match=r"evalref: the BF16 reference outputs need 1\.6 MB, 0\.0 MB free$"):
        reference_outputs(open_checkpoint(bundled_fixture), ids, tmp_path / "evalref", "k", False, None)
    assert not (tmp_path / "evalref").exists()


def _write(folder, logprobs_shape=(N, T, V), positions=None):
    folder.mkdir()
    np.save(folder / LOGPROBS, np.zeros(logprobs_shape, np.float32))
    positions = positions or {"greedy": torch.zeros((N, T), dtype=torch.long), "nll": torch.zeros((N, T - 1)),
                              **{f"mtp.{k}": torch.zeros((N, T - k), dtype=torch.long) for k in (1, 2)}}
    save_file(positions, folder / POSITIONS)
    return folder


def test_a_damaged_folder_reads_as_missing(tmp_path, caplog):
    whole = open_reference(_write(tmp_path / "whole"), (N, T, V), DEPTHS)
    assert whole.logprobs.shape == (N, T, V) and [d.shape for d in whole.drafts] == [(N, T - 1), (N, T - 2)]
    assert open_reference(tmp_path / "absent", (N, T, V), DEPTHS) is None

    short = _write(tmp_path / "short")
    (short / LOGPROBS).write_bytes((short / LOGPROBS).read_bytes()[:200])
    other = _write(tmp_path / "other-vocab", (N, T, V + 1))
    no_mtp = _write(tmp_path / "no-mtp", positions={"greedy": torch.zeros((N, T)), "nll": torch.zeros((N, T - 1))})
    cut = _write(tmp_path / "cut")
    (cut / POSITIONS).write_bytes((cut / POSITIONS).read_bytes()[:50])
    for folder in (short, other, no_mtp, cut):
        assert open_reference(folder, (N, T, V), DEPTHS) is None, folder.name
    assert caplog.text.count("cached reference outputs unreadable") == 4


def test_abandoned_temporary_folders_are_dropped(bundled_fixture, tmp_path, monkeypatch):
    cache = tmp_path / "evalref"
    dead, alive = cache / ".k.tmp-999999999", cache / f".other.tmp-{os.getpid()}"  # pid_max is below 2^22
    dead.mkdir(parents=True)
    alive.mkdir()
    monkeypatch.setattr(forward, "source_forward", _stop)
    with pytest.raises(RuntimeError, match="stop"):
        reference_outputs(open_checkpoint(bundled_fixture), torch.zeros((1, 4), dtype=torch.long), cache, "k",
                          False, None)
    assert sorted(p.name for p in cache.iterdir()) == [alive.name]  # and its own temporary folder went too


def test_the_variant_sink_refuses_what_does_not_fit():
    ids = torch.zeros((N, T), dtype=torch.long)
    with pytest.raises(ValueError, match="do not match the tokens"):
        PositionSink(np.zeros((N, T + 1, V), np.float32), ids, DEPTHS)
    sink = PositionSink(np.zeros((N, T, V), np.float32), ids, DEPTHS)
    with pytest.raises(ValueError, match="vocabulary sizes differ: variant 17, reference 16"):
        sink.trunk(0, 0, torch.zeros((T, V + 1)))
    sink.trunk(0, 0, torch.zeros((T, V)))
    sink.trunk(1, 0, torch.zeros((T, V)))
    with pytest.raises(RuntimeError, match=f"{N * (2 * T - 3)} positions never received logits"):
        sink.positions()  # no MTP logits were handed over
