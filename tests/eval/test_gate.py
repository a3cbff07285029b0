"""`stepq gate`: policy files, each rule's verdict line, not-measured metrics, baselines, gate.json, exit codes."""

import hashlib
import json

import pytest

from convert.errors import BadInput
from eval.gate import gate
from eval.policy import FIXTURE_POLICY, MODEL_POLICY, STEP37_POLICY, load_policy
from stepq.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["gate", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def policy_file(tmp_path, text: str):
    p = tmp_path / "policy.yaml"
    p.write_text(text)
    return p


def test_correct_artifact_passes_and_gate_json_records_everything(synthetic, capsys):
    art = synthetic.artifact()
    (art / "README.md").write_text("a previous card: never judged")
    code, out, _ = run(capsys, art)
    assert code == 0, out
    assert "PASS accuracy.kld.mean = 0.0012 <= 0.01 (max_kld_mean)" in out
    assert "PASS accuracy.mtp[depth=2].ratio = 0.977 >= 0.9 (min_mtp_ratio)" in out
    assert out.splitlines()[-1].startswith("gate: PASS tiny-step35-NVFP4 (policy fixture.yaml [NVFP4*]")

    record = json.loads((art / "eval" / "gate.json").read_text())
    assert record["pass"] is True and record["artifact"]["variant"] == "NVFP4"
    assert record["policy"]["content"] == FIXTURE_POLICY.read_text()
    assert record["policy"]["sha256"] == hashlib.sha256(FIXTURE_POLICY.read_bytes()).hexdigest()
    assert record["report"]["sha256"] == hashlib.sha256((art / "eval/report.json").read_bytes()).hexdigest()
    assert record["baseline"] is None
    on_disk = {p.relative_to(art).as_posix() for p in art.rglob("*") if p.is_file()}
    assert set(record["files"]) == on_disk - {"eval/gate.json", "README.md"}
    stepq_json = art / "stepq.json"
    assert record["files"]["stepq.json"] == hashlib.sha256(stepq_json.read_bytes()).hexdigest()
    assert not [p for p in (art / "eval").iterdir() if p.name.startswith(".")]  # no temp file left behind


@pytest.mark.parametrize("policy", [FIXTURE_POLICY, MODEL_POLICY])
def test_both_policies_require_the_vllm_load_check_of_safetensors_variants(synthetic, capsys, policy):
    """An artifact vLLM could not load, or that was never checked, fails; a GGUF one skips the rule."""
    failed = synthetic.artifact("tiny-step35-FP8-BLOCK", "FP8-BLOCK", changes={"engines.vllm_load.ok": False})
    code, out, _ = run(capsys, failed, "--policy", policy)
    assert code == 1 and "FAIL engines.vllm_load.ok = false (require_vllm_load)" in out.splitlines(), out
    unchecked = synthetic.artifact("tiny-step35-NVFP4A16", "NVFP4A16",
                                   changes={"engines.vllm_load": {"not_measured": "skipped (--no-engine-check)"}})
    code, out, _ = run(capsys, unchecked, "--policy", policy)
    assert code == 1 and ("FAIL engines.vllm_load: not measured: skipped (--no-engine-check) "
                          "(require_vllm_load, required)") in out.splitlines(), out
    gguf = synthetic.artifact("tiny-step35-GGUF-Q8_0", "GGUF-Q8_0",
                              changes={"engines.vllm_load": {"not_measured": "GGUF artifacts are for llama.cpp"}})
    code, out, _ = run(capsys, gguf, "--policy", policy)
    assert "SKIP require_vllm_load: applies to safetensors artifacts, this one is gguf" in out.splitlines(), out
    loaded = synthetic.artifact("tiny-step35-FP8-DYNAMIC", "FP8-DYNAMIC")
    _, out, _ = run(capsys, loaded, "--policy", policy)
    assert "PASS engines.vllm_load.ok = true (require_vllm_load)" in out.splitlines(), out


def test_a_check_rule_takes_true_or_false_only(tmp_path):
    with pytest.raises(BadInput, match=r"variants.default.require_vllm_load: expected true or false, got 1"):
        load_policy(policy_file(tmp_path, "variants:\n  default:\n    require_vllm_load: 1\n"))
    dropped = load_policy(policy_file(tmp_path, "variants:\n  default:\n    require_vllm_load: false\n"))
    assert dropped.rules_for("FP8-BLOCK")[1] == []


def test_broken_artifact_fails_with_its_numbers(synthetic, capsys):
    # weight scales x2: the KLD of such breakage is far above any threshold
    art = synthetic.artifact(changes={"accuracy.kld.mean": 0.081, "accuracy.top1": 0.62})
    code, out, _ = run(capsys, art)
    assert code == 1
    assert "FAIL accuracy.kld.mean = 0.081 > 0.01 (max_kld_mean)" in out.splitlines()
    assert "FAIL accuracy.top1 = 0.62 < 0.9 (min_top1)" in out.splitlines()
    assert out.splitlines()[-1].startswith("gate: FAIL")
    assert json.loads((art / "eval/gate.json").read_text())["pass"] is False


@pytest.mark.parametrize("variant, kld, passes", [
    ("FP8-BLOCK", 0.004, False),       # FP8 is held to 0.002
    ("FP8-DYNAMIC", 0.0015, True),
    ("GGUF-Q4_K_M", 0.04, True),       # Q4_K_M to 0.05
    ("GGUF-Q8_0", 0.004, False),
    ("NVFP4A16", 0.009, True),
])
def test_variant_sections_by_name_and_glob(synthetic, variant, kld, passes):
    art = synthetic.artifact(name=f"tiny-step35-{variant}", variant=variant, changes={"accuracy.kld.mean": kld})
    assert gate(art).passed is passes


def test_not_measured_fails_a_required_rule_and_skips_an_optional_one(synthetic, tmp_path, capsys):
    art = synthetic.artifact(changes={"accuracy.mtp": {"not_measured": "llama.cpp MTP acceptance not wired"}})
    code, out, _ = run(capsys, art)
    assert code == 1
    assert ("FAIL accuracy.mtp: not measured: llama.cpp MTP acceptance not wired (min_mtp_ratio, required)"
            in out.splitlines())
    # tasks are optional in the fixture policy: reported, not failed
    assert "SKIP tasks: not measured: lm-eval tasks are not run on the fixture (min_task_recovery, optional)" in out

    optional = policy_file(tmp_path, "variants:\n  default:\n    max_kld_mean: 0.01\n"
                                     "    min_mtp_ratio: {limit: 0.9, required: false}\n")
    code, out, _ = run(capsys, art, "--policy", optional)
    assert code == 0, out
    assert "SKIP accuracy.mtp: not measured: llama.cpp MTP acceptance not wired (min_mtp_ratio, optional)" in out


def test_per_task_limits_and_a_task_missing_from_the_report(synthetic, tmp_path):
    tasks = {"arc_easy": {"metric": "acc", "score": 0.50, "score_ref": 0.51, "recovery": 0.980},
             "hellaswag": {"metric": "acc", "score": 0.40, "score_ref": 0.41, "recovery": 0.976}}
    art = synthetic.artifact(changes={"tasks": tasks})
    pol = policy_file(tmp_path, "variants:\n  default:\n    min_task_recovery:\n"
                                "      limit: 0.95\n      per: {hellaswag: 0.98, gsm8k: 0.9}\n")
    res = gate(art, policy=pol)
    lines = res.lines()
    assert "PASS tasks.arc_easy.recovery = 0.98 >= 0.95 (min_task_recovery)" in lines
    assert "FAIL tasks.hellaswag.recovery = 0.976 < 0.98 (min_task_recovery)" in lines
    assert "FAIL tasks.gsm8k.recovery: not measured: absent from the report (min_task_recovery, required)" in lines
    assert not res.passed


def test_speed_is_warn_only(synthetic, capsys):
    art = synthetic.artifact(changes={"speed.ratios": {"pp512": 1.9, "tg128": 0.3}})
    code, out, _ = run(capsys, art)
    assert code == 0, out
    assert "WARN speed.ratios.tg128 = 0.3 < 0.5 (min_speed_ratio, warn-only)" in out.splitlines()
    assert "PASS speed.ratios.pp512 = 1.9 >= 0.5 (min_speed_ratio)" in out.splitlines()


def test_regression_against_a_baseline_report(synthetic, tmp_path, capsys):
    last = synthetic.artifact(name="last-release", changes={"accuracy.kld.mean": 0.001, "accuracy.top1": 0.975})
    art = synthetic.artifact(changes={"accuracy.kld.mean": 0.0015, "accuracy.top1": 0.96})
    code, out, _ = run(capsys, art, "--baseline", last)  # an artifact folder: its eval/report.json
    lines = out.splitlines()
    assert code == 1
    assert "PASS accuracy.kld.mean = 0.0015 <= 0.01 (max_kld_mean)" in lines  # fine on its own...
    assert ("FAIL accuracy.kld.mean = 0.0015 vs baseline 0.001: +50.0% > +25.0% (max_kld_mean_growth)"
            in lines)  # ...but 50% worse than the last release
    assert "FAIL accuracy.top1 = 0.96 vs baseline 0.975: drop 0.015 > 0.01 (max_top1_drop)" in lines
    assert "PASS accuracy.mtp[depth=1].ratio = 0.974 vs baseline 0.974: drop 0 <= 0.03 (max_mtp_ratio_drop)" in lines
    record = json.loads((art / "eval/gate.json").read_text())
    base_report = last / "eval/report.json"
    assert record["baseline"]["sha256"] == hashlib.sha256(base_report.read_bytes()).hexdigest()
    assert record["baseline"]["path"] == str(base_report)

    code, out, _ = run(capsys, art, "--baseline", art / "eval/report.json")  # a report file; itself: no change
    assert code == 0, out


def test_without_a_baseline_the_regression_rules_are_one_skip_line(synthetic, capsys):
    code, out, _ = run(capsys, synthetic.artifact())
    skips = [x for x in out.splitlines() if "no baseline report" in x]
    assert code == 0 and len(skips) == 1 and "max_kld_mean_growth" in skips[0] and "max_top1_drop" in skips[0]


def test_baseline_from_a_hub_repo(synthetic, fake_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    last = synthetic.artifact(name="last-release", changes={"accuracy.kld.mean": 0.0005})
    fake_hub.repos["org/tiny-NVFP4"] = {"private": False, "branches": {
        "main": {}, "v1": {"eval/report.json": (last / "eval/report.json").read_bytes()}}}
    art = synthetic.artifact()
    res = gate(art, baseline="org/tiny-NVFP4@v1", endpoint=fake_hub.url)
    assert "FAIL accuracy.kld.mean = 0.0012 vs baseline 0.0005: +140.0% > +25.0% (max_kld_mean_growth)" in res.lines()
    assert res.record["baseline"]["repo_id"] == "org/tiny-NVFP4" and res.record["baseline"]["revision"] == "v1"
    assert any(r["path"].endswith("/org/tiny-NVFP4/resolve/v1/eval/report.json") for r in fake_hub.requests)


def test_baseline_text_differs_is_a_warning(synthetic, capsys):
    last = synthetic.artifact(name="last-release")
    synthetic.report(last, "NVFP4", text_sha="u" * 64)
    code, out, _ = run(capsys, synthetic.artifact(), "--baseline", last)
    assert code == 0 and "WARN text.sha256: baseline measured on different eval text" in out


def test_report_of_other_files_fails(synthetic, capsys):
    art = synthetic.artifact()
    (art / "model-00001-of-00001.safetensors").write_bytes(b"re-quantized after eval")
    (art / "extra.bin").write_bytes(b"x")
    code, out, _ = run(capsys, art)
    assert code == 1
    assert ("FAIL files: since eval, model-00001-of-00001.safetensors changed, extra.bin appeared "
            "(report_matches_artifact)") in out.splitlines()


@pytest.mark.parametrize("text, named", [
    ("variants:\n  default:\n    max_kld_mean: 0.01\nthresholds: {}\n", "'thresholds'"),
    ("variants:\n  default:\n    max_kld_maen: 0.01\n", "variants.default: unknown key 'max_kld_maen'"),
    ("variants:\n  FP8-*:\n    min_top1: {limit: 0.9, optional: true}\n",
     "variants.FP8-*.min_top1: unknown key 'optional'"),
    ("variants:\n  default:\n    min_top1: {limit: 0.9, severity: soft}\n", "variants.default.min_top1.severity"),
    ("variants:\n  default:\n    max_kld_mean: 0.01\n    max_kld_mean: 0.02\n", "duplicate key 'max_kld_mean'"),
    ("variants:\n  default:\n    max_kld_mean: lots\n", "variants.default.max_kld_mean: expected a number"),
    ("variants:\n  default:\n    max_kld_mean: {limit: 0.01, per: {a: 1}}\n", "max_kld_mean.per"),
])
def test_bad_policy_is_bad_input_naming_file_and_key(synthetic, tmp_path, capsys, text, named):
    pol = policy_file(tmp_path, text)
    code, out, err = run(capsys, synthetic.artifact(), "--policy", pol)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and str(pol) in err and named in err, err


@pytest.mark.parametrize("change, named", [
    ({"accuracy.kld.mean": "0.01"}, "accuracy.kld.mean is '0.01', not a number"),
    ({"schema": "stepq.eval/0"}, "schema 'stepq.eval/0'"),
])
def test_malformed_report_is_bad_input(synthetic, capsys, change, named):
    art = synthetic.artifact(changes=change)
    code, _, err = run(capsys, art)
    assert code == 2 and named in err and "report.json" in err


def test_missing_report_and_wrong_baseline_variant_are_bad_input(synthetic, tmp_path, capsys):
    art = synthetic.artifact()
    other = synthetic.artifact(name="tiny-step35-FP8-BLOCK", variant="FP8-BLOCK")
    code, _, err = run(capsys, art, "--baseline", other)
    assert code == 2 and "baseline is variant FP8-BLOCK, the artifact is NVFP4" in err
    code, _, err = run(capsys, art, "--baseline", tmp_path / "no" / "such")
    assert code == 2 and "neither a local file or folder nor a Hub repo id" in err
    (art / "eval/report.json").unlink()
    code, _, err = run(capsys, art)
    assert code == 2 and "no eval report (run `stepq eval` first)" in err


@pytest.mark.parametrize("policy", [FIXTURE_POLICY, MODEL_POLICY, STEP37_POLICY], ids=lambda p: p.name)
def test_bundled_policies_cover_every_variant(policy):
    pol = load_policy(policy)
    limit = {}
    for variant in ["NVFP4", "NVFP4A16", "FP8-BLOCK", "FP8-DYNAMIC", "GGUF-Q4_K_M", "GGUF-Q8_0"]:
        section, rules = pol.rules_for(variant)
        assert section != "default", variant
        by_name = {r.name: r for r in rules}
        assert {"max_kld_mean", "min_top1", "min_mtp_ratio", "max_kld_mean_growth"} <= by_name.keys()
        assert by_name["min_speed_ratio"].severity == "warn"
        limit[variant] = by_name["max_kld_mean"].limit
    assert limit["FP8-BLOCK"] < limit["NVFP4"] <= limit["GGUF-Q4_K_M"] and limit["GGUF-Q8_0"] < limit["GGUF-Q4_K_M"]
    assert limit["GGUF-Q4_K_M"] <= 0.05  # weight scales x2 measure far above this


TASKS = {"gsm8k": {"recovery": 0.99}}  # the real-model policies require task recovery
IMAGE = {"kld": {"mean": 0.007, "median": 0.001, "p99": 0.07, "max": 0.3}, "top1": 0.92, "ppl": 10.0,
         "ppl_ref": 9.9, "ppl_ratio": 1.01, "positions": 524}


def test_a_step37_report_is_gated_on_image_conditioned_accuracy(synthetic, capsys):
    """A report with `accuracy.image` (a Step-3.7 source) takes the Step-3.7 policy, which requires the image
    figures of safetensors variants and judges them; GGUF (no image eval through llama.cpp) only reports them."""
    real = "stepfun-ai/Step-3.7-Flash"
    good = synthetic.artifact(name="Step-3.7-Flash-NVFP4", source=real,
                              changes={"source.model": real, "tasks": TASKS, "accuracy.image": IMAGE})
    code, out, _ = run(capsys, good)
    assert code == 0, out
    assert json.loads((good / "eval" / "gate.json").read_text())["policy"]["path"].endswith("step37-flash.yaml")
    assert "PASS accuracy.image.kld.mean = 0.007 <= 0.05 (max_image_kld_mean)" in out

    bad = synthetic.artifact(name="Step-3.7-Flash-FP8", variant="FP8-BLOCK", source=real, changes={
        "source.model": real, "tasks": TASKS, "accuracy.image": {**IMAGE, "kld": {**IMAGE["kld"], "mean": 0.2}, "top1": 0.6}})
    code, out, _ = run(capsys, bad)
    assert code == 1 and "FAIL accuracy.image.kld.mean = 0.2 > 0.05 (max_image_kld_mean)" in out, out
    assert "FAIL accuracy.image.top1 = 0.6 < 0.9 (min_image_top1)" in out

    unmeasured = synthetic.artifact(name="Step-3.7-Flash-NVFP4A16", variant="NVFP4A16", source=real, changes={
        "source.model": real, "tasks": TASKS, "accuracy.image": {"not_measured": "no image set (--dataset naming images)"}})
    code, out, _ = run(capsys, unmeasured)
    assert code == 1 and "FAIL accuracy.image: not measured: no image set" in out, out
