"""`stepq publish` against a loopback fake Hub: what arrives (files, bytes, card, branch), refusals, the token."""

import hashlib
import json
import shutil

import pytest
import yaml
from huggingface_hub import ModelCard

from convert.fixtures import BUNDLED_FIXTURE
from eval.card import build_card
from eval.gate import gate
from stepq.cli import main

SECRET = "hf_stepqTestSecret0123456789abcdefXYZ"  # unique: any leak is found by plain substring search
REPO = "stepq-test/tiny-step35-NVFP4A16"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A real nvfp4a16 artifact of the bundled fixture (~15 s, once per module)."""
    out = tmp_path_factory.mktemp("quant")
    assert main(["quantize", str(BUNDLED_FIXTURE), "--scheme", "nvfp4a16", "--out", str(out)]) == 0
    return out / "tiny-step35-NVFP4A16"


@pytest.fixture
def gated(quantized, synthetic, tmp_path, monkeypatch):
    """A copy of the real artifact with a passing report and gate.json; HF_TOKEN set to SECRET."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    art = tmp_path / "rel" / quantized.name
    shutil.copytree(quantized, art)
    synthetic.report(art, "NVFP4A16")
    assert gate(art).passed
    return art


def publish(capfd, *args) -> tuple[int, str, str]:
    code = main(["publish", *map(str, args)])
    out = capfd.readouterr()
    return code, out.out, out.err


def test_publish_uploads_exactly_the_gated_files_and_card_to_the_branch(gated, fake_hub, capfd):
    code, out, err = publish(capfd, gated, "--repo-id", REPO, "--revision", "v1", "--endpoint", fake_hub.url)
    assert code == 0, err
    record = json.loads((gated / "eval/gate.json").read_text())

    (commit,) = fake_hub.commits
    assert commit["repo"] == REPO and commit["revision"] == "v1" and not commit["create_pr"]
    assert set(commit["files"]) == set(record["files"]) | {"README.md"}
    assert "eval/gate.json" not in commit["files"]
    for path, sha in record["files"].items():
        assert hashlib.sha256(commit["files"][path]).hexdigest() == sha, path
    assert fake_hub.files(REPO, "main") == {".gitattributes": b""}  # the branch took it, main did not
    assert set(fake_hub.files(REPO, "v1")) == set(commit["files"]) | {".gitattributes"}
    assert commit["summary"] == "stepq: tiny-step35-NVFP4A16 (NVFP4A16), gate passed"
    assert record["report"]["sha256"] in commit["description"]
    assert f"/{REPO}/commit/" in out

    card = commit["files"]["README.md"].decode()
    assert (gated / "README.md").read_text() == card  # the local copy of what was published
    assert fake_hub.validated == [card]
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "transformers"
    assert {"step3p5", "nvfp4", "compressed-tensors", "mtp"} <= set(meta["tags"])
    assert "base_model" not in meta  # the source is a local folder, not a Hub model
    assert '--speculative-config \'{"method": "mtp", "num_speculative_tokens": 2}\'' in card
    assert f"vllm serve {REPO} --revision v1" in card
    assert "| mean KLD vs BF16 (nats) | 0.0012 |" in card
    assert "| tasks (lm-eval), recovery | not measured: lm-eval tasks are not run on the fixture |" in card
    assert "PASS accuracy.kld.mean = 0.0012 <= 0.01 (max_kld_mean)" in card

    # the token authenticated every write, and appears nowhere else
    writes = [r for r in fake_hub.requests if r["method"] == "POST"]
    assert writes and all(r["authorization"] == f"Bearer {SECRET}" for r in writes)
    assert SECRET not in out + err
    assert not any(SECRET.encode() in b for b in fake_hub.bodies)
    assert not any(SECRET.encode() in p.read_bytes() for p in gated.rglob("*") if p.is_file())

    # publishing again (the card now sits in the folder) is still allowed: README.md is never judged
    code, out, err = publish(capfd, gated, "--repo-id", REPO, "--revision", "v1", "--endpoint", fake_hub.url)
    assert code == 0, err
    assert len(fake_hub.commits) == 2 and sum(r["path"] == "/api/repos/create" for r in fake_hub.requests) == 2


def test_create_pr_and_private_repo(gated, fake_hub, capfd):
    code, out, err = publish(capfd, gated, "--repo-id", REPO, "--create-pr", "--private", "--endpoint", fake_hub.url)
    assert code == 0, err
    (commit,) = fake_hub.commits
    assert commit["create_pr"] and commit["revision"] == "refs/pr/1"
    assert fake_hub.repos[REPO]["private"] is True
    assert fake_hub.files(REPO, "main") == {".gitattributes": b""}
    assert f"{REPO}/discussions/1" in out


def test_dry_run_prints_the_operations_and_touches_nothing(gated, fake_hub, capfd):
    before = {p: p.stat().st_mtime_ns for p in gated.rglob("*")}
    code, out, err = publish(capfd, gated, "--repo-id", REPO, "--revision", "v1", "--dry-run",
                             "--endpoint", fake_hub.url)
    assert code == 0, err
    assert fake_hub.requests == []
    assert {p: p.stat().st_mtime_ns for p in gated.rglob("*")} == before  # no README.md written either
    lines = out.splitlines()
    assert f"create repo {REPO} (model, the account's default visibility) unless it exists" in lines
    assert "create branch v1 from main unless it exists" in lines
    assert f"commit to {REPO}@v1: 'stepq: tiny-step35-NVFP4A16 (NVFP4A16), gate passed'" in lines
    shard = gated / "model-00001-of-00001.safetensors"
    sha = hashlib.sha256(shard.read_bytes()).hexdigest()
    assert f"  add model-00001-of-00001.safetensors  {shard.stat().st_size} B  sha256 {sha}" in lines
    gated_files = json.loads((gated / "eval/gate.json").read_text())["files"]
    assert sum(x.startswith("  add ") for x in lines) == len(gated_files) + 1
    assert any(x.startswith("  add README.md ") for x in lines)


def _no_gate(art):
    (art / "eval/gate.json").unlink()


def _failed_gate(art):
    p = art / "eval/gate.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "pass": False,
                             "results": [{"rule": "max_kld_mean", "status": "fail"}]}))


def _edited(art):
    with open(art / "config.json", "a") as f:
        f.write("\n")


def _added(art):
    (art / "notes.txt").write_text("added after gating")


def _removed(art):
    (art / "tokenizer_config.json").unlink()


@pytest.mark.parametrize("spoil, reason", [
    (_no_gate, "no eval/gate.json: run `stepq gate` first"),
    (_failed_gate, "the gate failed (max_kld_mean)"),
    (_edited, "changed since gating: config.json changed"),
    (_added, "changed since gating: notes.txt appeared"),
    (_removed, "changed since gating: tokenizer_config.json disappeared"),
], ids=["no-gate", "failed-gate", "edited", "added", "removed"])
def test_refusals(gated, fake_hub, capfd, spoil, reason):
    spoil(gated)
    code, out, err = publish(capfd, gated, "--repo-id", REPO, "--endpoint", fake_hub.url)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("stepq publish: refused: ") and reason in err, err
    assert fake_hub.requests == []


def test_hub_errors_and_bad_repo_ids(gated, fake_hub, capfd):
    fake_hub.reject_token = True
    code, out, err = publish(capfd, gated, "--repo-id", REPO, "--endpoint", fake_hub.url)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert f"stepq publish: upload failed: {REPO}: HfHubHTTPError: Client error '401 Unauthorized'" in err
    assert SECRET not in err
    assert not (gated / "README.md").exists()  # written only once published
    code, _, err = publish(capfd, gated, "--repo-id", "org/bad--name", "--dry-run")
    assert code == 2 and "--repo-id 'org/bad--name'" in err


def test_gated_release_is_the_next_release_baseline(gated, fake_hub, synthetic, tmp_path, monkeypatch, capfd):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    assert publish(capfd, gated, "--repo-id", REPO, "--endpoint", fake_hub.url)[0] == 0
    synthetic.report(gated, "NVFP4A16", {"accuracy.kld.mean": 0.0019})  # the next release, 58% worse
    res = gate(gated, baseline=REPO, endpoint=fake_hub.url)
    assert not res.passed
    assert "FAIL accuracy.kld.mean = 0.0019 vs baseline 0.0012: +58.3% > +25.0% (max_kld_mean_growth)" in res.lines()
    assert f"compared with the previous release (`{REPO}@main`)" in str(build_card(gated, res.record, REPO))


def test_card_for_a_hub_source_names_base_model_and_license(synthetic, tmp_path):
    source = tmp_path / "hf-cache" / "snapshots" / "abc"
    source.mkdir(parents=True)
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Step-3.5-Flash\n")
    art = synthetic.artifact(name="Step-3.5-Flash-GGUF-Q4_K_M", variant="GGUF-Q4_K_M")
    (art / "stepq.json").write_text(json.dumps({
        "variant": "GGUF-Q4_K_M", "scheme": "gguf", "qtype": "Q4_K_M", "mtp": True, "mtp_layers": [45, 46, 47],
        "source": {"model": "stepfun-ai/Step-3.5-Flash", "revision": "r1", "path": str(source)},
        "tensors": {"blk.0.ffn_down_exps.weight": {"role": "experts_down", "type": "Q6_K", "mtp": False},
                    "blk.45.nextn.eh_proj.weight": {"role": "mtp_eh_proj", "type": "Q4_K", "mtp": True}}}))
    (art / "Step-3.5-Flash-Q4_K_M-00001-of-00002.gguf").write_bytes(b"GGUF")
    (art / "Step-3.5-Flash-Q4_K_M-00002-of-00002.gguf").write_bytes(b"GGUF")
    synthetic.report(art, "GGUF-Q4_K_M")
    record = gate(art).record
    card = build_card(art, record, "org/Step-3.5-Flash-GGUF")
    assert card.data.base_model == "stepfun-ai/Step-3.5-Flash"
    assert card.data.to_dict()["base_model_relation"] == "quantized"
    assert card.data.license == "apache-2.0" and card.data.library_name == "gguf"
    assert {"gguf", "q4_k_m", "mtp"} <= set(card.data.tags)
    text = str(card)
    llama = "llama-server -m Step-3.5-Flash-Q4_K_M-00001-of-00002.gguf --spec-type draft-mtp --spec-draft-n-max 3"
    assert llama in text
    assert "- MTP head, stored as Q4_K (1 tensors): eh_proj" in text
    assert ModelCard(text).data.base_model == "stepfun-ai/Step-3.5-Flash"  # the front matter parses back


def test_card_for_step37_names_the_vision_side(synthetic):
    """Step-3.7: tagged step3p7 / image-text-to-text, the vision tower said to stay BF16; for GGUF the run line
    passes the mmproj file beside the text model (which is not mistaken for the first text shard)."""
    art = synthetic.artifact(name="tiny-step37-NVFP4", source="fixtures/tiny-step37")
    (art / "config.json").write_text(json.dumps({
        "model_type": "step3p7", "architectures": ["Step3p7ForConditionalGeneration"],
        "text_config": {"num_hidden_layers": 5, "num_nextn_predict_layers": 2},
        "vision_config": {"width": 96, "layers": 2, "heads": 2, "ls_init_value": 0.1}}))
    prov = json.loads((art / "stepq.json").read_text())
    prov["tensors"] = {"model.layers.5.eh_proj.weight": {"role": "mtp_eh_proj", "action": "kept"}}
    (art / "stepq.json").write_text(json.dumps(prov))
    report_path = art / "eval" / "report.json"
    report = json.loads(report_path.read_text())
    report["accuracy"]["image"] = {"kld": {"mean": 0.0072, "p99": 0.068}, "top1": 0.9237, "ppl_ratio": 1.01}
    report_path.write_text(json.dumps(report))
    card = build_card(art, gate(art).record, "org/tiny-step37-NVFP4")
    assert "| image-conditioned mean / p99 KLD | 0.0072 / 0.068 |" in str(card)
    assert card.data.pipeline_tag == "image-text-to-text" and "step3p7" in card.data.tags
    assert "The vision tower and projector are kept in BF16" in str(card) and "layers 5–6" in str(card)
    # vLLM 0.33 needs the tower's own config names back (transformers renames them): the card says how
    assert """--hf-overrides '{"vision_config":{"width":96,"layers":2,"heads":2,"ls_init_value":0.1}}'""" in str(card)

    gguf = synthetic.artifact(name="tiny-step37-GGUF-Q4_K_M", variant="GGUF-Q4_K_M", source="fixtures/tiny-step37")
    (gguf / "config.json").unlink()
    (gguf / "model-00001-of-00001.safetensors").unlink()
    (gguf / "stepq.json").write_text(json.dumps({"variant": "GGUF-Q4_K_M", "scheme": "gguf", "qtype": "Q4_K_M",
                                                 "mtp": False, "mtp_layers": [], "source": {"model": "x"}}))
    for f in ("mmproj-tiny-step37-F16.gguf", "tiny-step37-Q4_K_M.gguf"):
        (gguf / f).write_bytes(b"GGUF")
    synthetic.report(gguf, "GGUF-Q4_K_M")
    text = str(build_card(gguf, gate(gguf).record, "org/tiny-step37-GGUF"))
    assert "llama-server -m tiny-step37-Q4_K_M.gguf --mmproj mmproj-tiny-step37-F16.gguf" in text
    assert "for llama.cpp they are in `mmproj-tiny-step37-F16.gguf`" in text
