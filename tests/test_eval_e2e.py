"""quantize -> eval -> gate -> publish --dry-run on the bundled model, and a broken artifact the gate stops."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from stepq.cli import main

TASKS = ["--tasks", "tiny_step35_word_order,tiny_step35_next_symbol", "--task-limit", "24"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


def _eval(artifact, model, out, *extra, engine_check=False):
    check = [] if engine_check else ["--no-engine-check"]
    assert main(["eval", str(artifact), "--model", str(model), "--out", str(out), *check, *extra]) == 0
    return json.loads((artifact / "eval" / "report.json").read_text())


def test_nvfp4_release_end_to_end(out, bundled_fixture, capsys):
    assert main(["quantize", str(bundled_fixture), "--scheme", "nvfp4", "--out", str(out), "--num-samples", "16"]) == 0
    art = out / "tiny-step35-NVFP4"
    r = _eval(art, bundled_fixture, out, *TASKS, engine_check=True)  # the gate requires vLLM's load check
    acc = r["accuracy"]
    print(json.dumps({k: acc[k] for k in ("kld", "top1", "ppl_ratio", "mtp")}, indent=1), r["tasks"])
    assert r["schema"] == "stepq.eval/1" and r["artifact"]["variant"] == "NVFP4"
    assert 0 < acc["kld"]["mean"] < 0.02 and acc["top1"] > 0.85 and [m["depth"] for m in acc["mtp"]] == [1, 2]
    assert r["tasks"]["tiny_step35_word_order"]["score_ref"] > 0.25 * 2  # the BF16 model is well above chance
    assert {p for p in r["plots"]} == {"weight_sqnr_per_layer.png", "weight_sqnr_per_expert.png", "expert_load.png"}
    for p in r["plots"]:
        assert (art / "eval" / p).read_bytes()[:4] == b"\x89PNG"
    assert "| top-1 agreement |" in (art / "eval" / "report.md").read_text()
    assert r["speed"]["vllm"]["not_measured"] and r["engines"]["vllm_load"]["ok"] is True
    capsys.readouterr()
    assert main(["gate", str(art)]) == 0
    assert json.loads((art / "eval" / "gate.json").read_text())["pass"] is True
    assert main(["publish", str(art), "--repo-id", "org/tiny-step35-NVFP4", "--dry-run"]) == 0
    assert "model-00001-of-00001.safetensors" in capsys.readouterr().out
    # the reference outputs are cached per source + tokens: a second eval reuses them
    assert len(list((out / "tiny-step35-evalref").glob("*/logprobs.npy"))) == 1


def test_gate_stops_an_artifact_with_doubled_scales(out, bundled_fixture, capsys):
    good = out / "tiny-step35-NVFP4"
    bad = out / "tiny-step35-NVFP4-broken"
    shutil.copytree(good, bad, ignore=shutil.ignore_patterns("eval"))
    for shard in bad.glob("*.safetensors"):
        t = load_file(shard)
        for name in t:
            if name.endswith(".weight_scale") and ".experts." in name:  # every routed expert's weights x2
                t[name] = (t[name].float() * 2).to(t[name].dtype)
        save_file(t, shard, metadata={"format": "pt"})
    r = _eval(bad, bundled_fixture, out, "--tasks", "")
    assert r["accuracy"]["kld"]["mean"] > 0.05, r["accuracy"]["kld"]
    capsys.readouterr()
    assert main(["gate", str(bad)]) == 1
    lines = capsys.readouterr().out
    assert "FAIL accuracy.kld.mean" in lines, lines
    assert main(["publish", str(bad), "--repo-id", "org/x", "--dry-run"]) == 1


def test_gguf_release_end_to_end(out, bundled_fixture):
    assert main(["quantize", str(bundled_fixture), "--scheme", "gguf", "--qtype", "Q4_K_M", "--out", str(out)]) == 0
    art = out / "tiny-step35-GGUF-Q4_K_M"
    r = _eval(art, bundled_fixture, out, "--tasks", "")
    acc = r["accuracy"]
    print(json.dumps(acc, indent=1), json.dumps(r["speed"]["ratios"]))
    assert r["artifact"]["format"] == "gguf" and 0 < acc["kld"]["mean"] < 0.05
    assert acc["mtp"][0]["acceptance"] > 0 and acc["mtp"][0]["acceptance_ref"] > 0
    assert set(r["speed"]["ratios"]) >= {"pp512", "tg128"} and all(v > 0 for v in r["speed"]["ratios"].values())
    assert main(["gate", str(art)]) == 0
