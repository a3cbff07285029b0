"""Gate / publish fixtures: a loopback fake Hub, and artifacts with a synthetic eval report (`eval` is not needed)."""

import copy
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from eval.gate import artifact_files

# A correct NVFP4 release of the fixture (close to measured figures); tests change single values.
GOOD = {
    "accuracy": {"kld": {"mean": 0.0012, "median": 0.0003, "p99": 0.016, "max": 0.21}, "top1": 0.969,
                 "ppl": 28.4, "ppl_ref": 28.2, "ppl_ratio": 1.007,
                 "mtp": [{"depth": 1, "acceptance": 0.38, "acceptance_ref": 0.39, "ratio": 0.974},
                         {"depth": 2, "acceptance": 0.42, "acceptance_ref": 0.43, "ratio": 0.977}]},
    "tasks": {"not_measured": "lm-eval tasks are not run on the fixture"},
    "speed": {"llama_bench": {"not_measured": "no GGUF"}, "vllm": {"not_measured": "no GPU"}, "ratios": {}},
    "engines": {"vllm_load": {"ok": True}},
}


def write_report(artifact: Path, variant: str, changes: dict | None = None, text_sha: str = "t" * 64) -> dict:
    """eval/report.json as `stepq eval` writes it (schema stepq.eval/1, files hashed), GOOD with `changes`
    ({dotted path: value}) applied."""
    report = {"schema": "stepq.eval/1",
              "artifact": {"name": artifact.name, "variant": variant,
                           "format": "gguf" if variant.startswith("GGUF") else "safetensors"},
              "files": {f: h for f, h in artifact_files(artifact).items() if not f.startswith("eval/")},
              "source": {"model": "fixtures/tiny-step35"},
              "text": {"source": "eval.txt", "sha256": text_sha, "sequences": 16, "seq_len": 256, "tokens": 4096},
              **copy.deepcopy(GOOD)}
    for path, value in (changes or {}).items():
        *parents, last = path.split(".")
        node = report
        for p in parents:
            node = node[p]
        node[last] = value
    (artifact / "eval").mkdir(exist_ok=True)
    (artifact / "eval" / "report.json").write_text(json.dumps(report, indent=1))
    return report


@pytest.fixture
def synthetic(tmp_path):
    """make(name, variant, changes, source) -> a small artifact folder with stepq.json and an eval report."""
    def make(name="tiny-step35-NVFP4", variant="NVFP4", changes=None, source="fixtures/tiny-step35") -> Path:
        art = tmp_path / name
        art.mkdir()
        (art / "stepq.json").write_text(json.dumps({"variant": variant, "scheme": variant.lower(),
                                                    "source": {"model": source, "path": f"/nowhere/{source}"}}))
        (art / "config.json").write_text('{"num_hidden_layers": 5, "num_nextn_predict_layers": 2}')
        (art / "model-00001-of-00001.safetensors").write_bytes(bytes(range(256)) * 64)
        write_report(art, variant, changes)
        return art
    return SimpleNamespace(artifact=make, report=write_report)


@pytest.fixture
def fake_hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # plain commits, never the Xet protocol
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # importlib test mode: a helper module beside the tests is loaded by path, not imported by name
    spec = importlib.util.spec_from_file_location("stepq_tests_fake_hub", Path(__file__).parent / "fake_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    hub = module.FakeHub().start()
    yield hub
    hub.stop()
