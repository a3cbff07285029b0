"""The vLLM speed branch of `stepq eval` for safetensors variants, up to the point where a GPU is needed."""

import pytest

import eval.speed as speed
from eval.measure import safetensors_speed


class _ServerStarted(Exception):
    """Raised where the real run would start `vllm serve` on the GPU."""


def test_a_machine_with_a_gpu_serves_the_artifact_itself(monkeypatch, tmp_path):
    artifact = tmp_path / "tiny-step35-NVFP4"
    artifact.mkdir()
    started = []

    def popen(argv, **kwargs):
        started.append(argv)
        raise _ServerStarted
    monkeypatch.setattr(speed, "vllm_available", lambda: True)
    monkeypatch.setattr(speed.subprocess, "Popen", popen)
    with pytest.raises(_ServerStarted):
        safetensors_speed(artifact)
    (argv,) = started
    assert argv[argv.index("serve") + 1] == str(artifact)


def test_without_a_gpu_or_with_speed_off_vllm_is_not_measured(monkeypatch, tmp_path):
    monkeypatch.setattr(speed, "vllm_available", lambda: False)
    no_gpu = safetensors_speed(tmp_path)
    assert no_gpu["vllm"] == {"not_measured": "no GPU/vLLM"} and "not_measured" in no_gpu["llama_bench"]
    monkeypatch.setattr(speed, "vllm_available", lambda: True)
    assert safetensors_speed(tmp_path, speed=False)["vllm"] == {"not_measured": "skipped (--no-speed)"}
