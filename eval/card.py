"""The model card (README.md) `stepq publish` uploads: Hub metadata, what the variant is, its eval against BF16,
the gate verdict, and how to run it with its MTP drafter (vLLM, llama.cpp).

Everything comes from the gated files (stepq.json, config.json, eval/report.json) and gate.json; nothing is
re-derived.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from eval.schema import REPORT_DIR, REPORT_JSON, is_measured
from eval.vllm_conformance import vllm_hf_overrides


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _source_is_hub(source: dict) -> bool:
    """stepq.json `source.model` is what the user passed: a Hub id resolves to a cache snapshot elsewhere, a local
    folder to a path ending in it (relative paths like fixtures/tiny-step35 also look like org/name)."""
    model, path = str(source.get("model") or ""), str(source.get("path") or "")
    return model.count("/") == 1 and not model.startswith((".", "/")) and not path.endswith(model)


def _source_license(source: dict) -> str | None:
    """The source's license: its config.json, else its README front matter (local copy, if still there)."""
    folder = Path(str(source.get("path") or ""))
    if license_ := _read_json(folder / "config.json").get("license"):
        return str(license_)
    readme = folder / "README.md"
    if readme.is_file():
        try:
            return ModelCard.load(readme, ignore_metadata_errors=True).data.license
        except (OSError, ValueError):  # an unparsable README: the card just omits the license
            return None
    return None


def _mtp_layers(provenance: dict, config: dict) -> list[int]:
    if "mtp_layers" in provenance:  # GGUF records them (empty with --no-mtp)
        return list(provenance["mtp_layers"]) if provenance.get("mtp", True) else []
    text = config.get("text_config") or config  # Step-3.7 nests the text stack's keys
    n, k = text.get("num_hidden_layers"), text.get("num_nextn_predict_layers") or 0
    has_mtp = any(t.get("role", "").startswith("mtp") for t in provenance.get("tensors", {}).values())
    return list(range(n, n + k)) if n is not None and has_mtp else []


def _mmproj(files: list[str]) -> str | None:
    return next((f for f in files if Path(f).name.startswith("mmproj") and f.endswith(".gguf")), None)


def _multimodal(config: dict, files: list[str]) -> bool:
    """Step-3.7 (text stack + vision tower): its config.json, or for GGUF (no config.json) the mmproj file."""
    return config.get("model_type") == "step3p7" or _mmproj(files) is not None


def _vision_line(config: dict, files: list[str]) -> str:
    if not _multimodal(config, files):
        return ""
    mmproj = _mmproj(files)
    return ("The vision tower and projector are kept in BF16, as in StepFun's own releases"
            + (f"; for llama.cpp they are in `{mmproj}`." if mmproj else "."))


def _tags(provenance: dict, config: dict, artifact: Path, mtp: bool, files: list[str]) -> list[str]:
    scheme = provenance.get("scheme", "")
    tags = (["step3p7"] if _multimodal(config, files) else ["step3p5"]) + ["stepq", "quantized"]
    if scheme == "gguf":
        tags += ["gguf", str(provenance.get("qtype", "")).lower()]
    else:
        tags += ["fp8"] if scheme.startswith("fp8") else ["nvfp4"] if scheme.startswith("nvfp4") else []
        method = (config.get("quantization_config") or {}).get("quant_method")
        if method == "compressed-tensors":
            tags.append("compressed-tensors")
        if (artifact / "hf_quant_config.json").is_file():
            tags.append("modelopt")
    if mtp:
        tags.append("mtp")
    return [t for t in tags if t]


def _decisions(provenance: dict) -> list[str]:
    """One line per (stored format, trunk or MTP): the roles it covers and the tensor count."""
    groups: dict[tuple[bool, str], set] = defaultdict(set)
    counts: dict[tuple[bool, str], int] = defaultdict(int)
    for t in provenance.get("tensors", {}).values():
        role = t.get("role") or "?"
        mtp = bool(t.get("mtp")) or role.startswith("mtp")
        how = (f"{t.get('action')} as {t.get('format')}" if "action" in t else f"stored as {t.get('type')}")
        groups[mtp, how].add(re.sub(r"^mtp[._]", "", role) if mtp else role)
        counts[mtp, how] += 1
    lines = []
    for (mtp, how) in sorted(groups, key=lambda g: (g[0], not g[1].startswith("quantized"), g[1])):
        where = "MTP head" if mtp else "trunk"
        lines.append(f"- {where}, {how} ({counts[mtp, how]} tensors): {', '.join(sorted(groups[mtp, how]))}")
    return lines


# --- eval table --------------------------------------------------------------------------------------------------

def _nm(value) -> str:
    return f"not measured: {value['not_measured']}"


def _num(x, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _pct(x) -> str:
    return f"{100 * x:.2f}%" if isinstance(x, (int, float)) else str(x)


def _get(d, *keys):
    for k in keys:
        if not is_measured(d):
            return d
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _cell(value, fmt=_num) -> str:
    if value is None:
        return "not in the report"
    return _nm(value) if not is_measured(value) else fmt(value)


def _eval_rows(report: dict) -> list[tuple[str, str]]:
    acc = report.get("accuracy", {})
    ppl = f" ({_cell(_get(acc, 'ppl'))} vs {_cell(_get(acc, 'ppl_ref'))})" if is_measured(_get(acc, "ppl")) else ""
    rows = [("mean KLD vs BF16 (nats)", _cell(_get(acc, "kld", "mean"))),
            ("p99 / max KLD", f"{_cell(_get(acc, 'kld', 'p99'))} / {_cell(_get(acc, 'kld', 'max'))}"),
            ("top-1 agreement with BF16", _cell(_get(acc, "top1"), _pct)),
            ("perplexity ratio (quantized / BF16)", _cell(_get(acc, "ppl_ratio")) + ppl)]
    if "image" in acc:  # Step-3.7: over the text positions of an image set
        image = acc["image"]
        if is_measured(image):
            rows += [("image-conditioned mean / p99 KLD", f"{_cell(_get(image, 'kld', 'mean'))} / "
                                                          f"{_cell(_get(image, 'kld', 'p99'))}"),
                     ("image-conditioned top-1 / perplexity ratio",
                      f"{_cell(_get(image, 'top1'), _pct)} / {_cell(_get(image, 'ppl_ratio'))}")]
        else:
            rows.append(("image-conditioned KLD", _cell(image)))
    mtp = _get(acc, "mtp")
    if isinstance(mtp, list) and mtp:
        for d in mtp:
            accepted = f"{_cell(d.get('acceptance'), _pct)} vs {_cell(d.get('acceptance_ref'), _pct)}"
            rows.append((f"MTP acceptance, depth {d.get('depth')} (ratio to BF16)",
                         f"{_cell(d.get('ratio'))} ({accepted})"))
    else:
        rows.append(("MTP acceptance ratio", _cell(mtp)))
    tasks = report.get("tasks")
    if isinstance(tasks, dict) and is_measured(tasks) and tasks:
        for name, t in tasks.items():
            if not is_measured(t):
                rows.append((f"task {name}", _nm(t)))
                continue
            rows.append((f"task {name} ({t.get('metric')}), recovery",
                         f"{_cell(t.get('recovery'))} ({_cell(t.get('score'))} vs {_cell(t.get('score_ref'))})"))
    else:
        rows.append(("tasks (lm-eval), recovery", _cell(tasks) if tasks else "not measured: no tasks in the report"))
    ratios = _get(report, "speed", "ratios")
    if isinstance(ratios, dict) and is_measured(ratios) and ratios:
        rows += [(f"speed {k} (quantized / BF16 tokens/s)", _cell(v, lambda x: f"{x:.2f}x")) for k, v in ratios.items()]
    else:
        why = [f"{k}: {_nm(v)}" for k, v in (report.get("speed") or {}).items() if k != "ratios" and not is_measured(v)]
        rows.append(("speed ratios", "; ".join(why) or (_cell(ratios) if ratios else "not measured")))
    load = _get(report, "engines", "vllm_load")
    if load is not None:
        rows.append(("loads in vLLM (trunk + MTP drafter)", _cell(load, lambda v: "yes" if v.get("ok") else "no")))
    return rows


def _eval_section(report: dict) -> list[str]:
    text = report.get("text") or {}
    out = ["## Evaluation against BF16", ""]
    if text:
        source = str(text.get("source", "?"))
        source = Path(source).name if source.startswith("/") else source  # no local paths in a public card
        out += [(f"Teacher-forced on {text.get('tokens', '?')} tokens of `{source}` "
                 f"({text.get('sequences', '?')} sequences of {text.get('seq_len', '?')}), the same for both models."),
                ""]
    out += ["| metric | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in _eval_rows(report)]
    return out


# --- how to run --------------------------------------------------------------------------------------------------

def _baseline_name(base: dict) -> str:
    if base.get("repo_id"):
        return f"`{base['repo_id']}@{base.get('revision', 'main')}`"
    return f"report sha256 `{base.get('sha256', '')[:16]}`"  # a local path would mean nothing to readers


def _run_section(repo_id: str, revision: str | None, provenance: dict, files: list[str],
                 mtp_layers: list[int], config: dict) -> list[str]:
    n = len(mtp_layers)
    rev = f" --revision {revision}" if revision and revision != "main" else ""
    out = ["## How to run", ""]
    if provenance.get("scheme") == "gguf":
        ggufs = sorted(f for f in files if f.endswith(".gguf"))
        first = next((f for f in ggufs if "-00001-of-" in f), ggufs[0] if ggufs else "MODEL.gguf")
        spec = f" --spec-type draft-mtp --spec-draft-n-max {n}" if n else ""
        if mmproj := _mmproj(ggufs):
            first = next((f for f in ggufs if f != mmproj and "-00001-of-" in f),
                         next((f for f in ggufs if f != mmproj), "MODEL.gguf"))
        vision = f" --mmproj {mmproj}" if mmproj else ""
        out += ["llama.cpp" + (" with the MTP head as drafter (`--spec-type draft-mtp`):" if n else ":"), "",
                "```sh", f"hf download {repo_id} {' '.join(ggufs)} --local-dir .{rev}",
                f"llama-server -m {first}{vision}{spec}", "```"]
    else:
        spec = (f" \\\n  --speculative-config '{{\"method\": \"mtp\", \"num_speculative_tokens\": {n}}}'" if n else "")
        # Step-3.7: vLLM 0.33 reads the tower's legacy config names, which transformers renames (the load check
        # passes the same overrides)
        overrides = vllm_hf_overrides(config)
        hf = f" \\\n  --hf-overrides '{json.dumps(overrides, separators=(',', ':'))}'" if overrides else ""
        out += ["vLLM" + (" with the MTP head as drafter (the draft model is built from this checkpoint's MTP "
                          "layers):" if n else ":"), "",
                "```sh", f"vllm serve {repo_id}{rev}{hf}{spec}", "```"]
    return out


# --- the card ----------------------------------------------------------------------------------------------------

def build_card(artifact: str | Path, gate_record: dict, repo_id: str, revision: str | None = None) -> ModelCard:
    """The model card for a gated artifact, as a huggingface_hub ModelCard (front matter + markdown body)."""
    artifact = Path(artifact)
    provenance = _read_json(artifact / "stepq.json")
    config = _read_json(artifact / "config.json")
    report = _read_json(artifact / REPORT_DIR / REPORT_JSON)
    source = provenance.get("source", {})
    mtp_layers = _mtp_layers(provenance, config)
    hub_source = _source_is_hub(source)
    files = list(gate_record.get("files", {}))

    data = ModelCardData(
        base_model=source.get("model") if hub_source else None,
        library_name="gguf" if provenance.get("scheme") == "gguf" else "transformers",
        license=_source_license(source),
        tags=_tags(provenance, config, artifact, bool(mtp_layers), files),
        pipeline_tag="image-text-to-text" if _multimodal(config, files) else "text-generation",
    )
    if hub_source:
        data.base_model_relation = "quantized"  # explicit: the Hub's inference misses quants living on branches

    name = repo_id.split("/")[-1]
    src = source.get("model", "?")
    src_link = (f"[{src}](https://huggingface.co/{src})" if hub_source
                else f"`{Path(str(src)).name}` (a local checkpoint)")
    rev = f" at revision `{source['revision']}`" if source.get("revision") else ""
    recipe = provenance.get("recipe") or {}
    scheme = provenance.get("scheme", "?") + (f" {provenance['qtype']}" if provenance.get("qtype") else "")
    what = recipe.get("description") or (f"Written with {recipe['tool']}." if recipe.get("tool") else "")
    mtp_line = (f"The multi-token-prediction (MTP) head (layers {mtp_layers[0]}–{mtp_layers[-1]}) is included, "
                f"so the model can draft its own tokens for speculative decoding." if mtp_layers else
                "This variant carries no MTP head.")
    method = f", method {provenance['method']}" if provenance.get("method") else ""
    intro = (f"`{provenance.get('variant', '?')}` quantization of {src_link}{rev}, made with stepq "
             f"{provenance.get('versions', {}).get('stepq', '')} (scheme `{scheme}`{method}). {what}")
    vision_line = _vision_line(config, files)
    body = [f"# {name}", "", intro, "", mtp_line, ""] + ([vision_line, ""] if vision_line else [])
    body += ["## What is quantized", ""]
    body += _decisions(provenance) + [""]
    body += _eval_section(report) + [""]

    verdict = "passed" if gate_record.get("pass") else "FAILED"
    pol = gate_record.get("policy", {})
    base = gate_record.get("baseline")
    body += ["## Release gate", "",
             f"This release {verdict} stepq's gate: policy `{Path(pol.get('path', '?')).name}` (section "
             f"`{pol.get('section')}`, sha256 `{pol.get('sha256', '')[:16]}`)"
             + (f", compared with the previous release ({_baseline_name(base)})" if base else "")
             + f"; report sha256 `{gate_record.get('report', {}).get('sha256', '')[:16]}`.", "", "```"]
    body += [r["line"] for r in gate_record.get("results", [])] + ["```", ""]
    body += _run_section(repo_id, revision, provenance, files, mtp_layers, config)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")
