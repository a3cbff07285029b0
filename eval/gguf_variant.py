"""A GGUF variant measured in llama.cpp: logits on the eval tokens (handed to the eval's sink one sequence at a time,
`eval.metrics.PositionSink`), MTP draft acceptance and llama-bench speed, the last two against the BF16 GGUF of the
same source in the same run (written first when missing)."""

from __future__ import annotations

from pathlib import Path

import torch

from calib.data import load_tokenizer
from eval.gguf_logits import LlamaCppModel, gguf_mtp_acceptance
from eval.schema import is_measured, not_measured
from eval.speed import llama_bench, speed_ratios

MTP_PROMPTS = 4          # held-out prompts for the draft runs
MTP_PROMPT_TOKENS = 64
MTP_PREDICT = 64


def main_file(folder: Path) -> Path:
    """The .gguf llama.cpp opens: the only file, or the first shard of a split (a Step-3.7 variant's vision
    tower, `mmproj-*.gguf`, is not the model)."""
    from convert.gguf_mmproj import is_mmproj

    files = sorted(p for p in folder.glob("*.gguf") if not is_mmproj(p.name))
    if not files:
        raise FileNotFoundError(f"{folder}: no .gguf file")
    return files[0]


def bf16_baseline(model_dir: Path, out_root: Path) -> Path:
    from convert.gguf_job import export_gguf, variant_dir

    folder = variant_dir(model_dir, out_root, "BF16")
    if not folder.is_dir():
        folder = export_gguf(model_dir, out_root, qtype="BF16")
    return main_file(folder)


def measure(artifact: Path, model_dir: Path, out_root: Path, ids: torch.Tensor, sink, speed: bool = True):
    """Trunk logits of every sequence to `sink.trunk` -> (mtp rows or not_measured, speed part of the report)."""
    gguf = main_file(artifact)
    with LlamaCppModel(gguf) as m:
        for row in range(ids.shape[0]):
            sink.trunk(row, 0, m.logits(ids[row:row + 1])[0])
    baseline = bf16_baseline(model_dir, out_root)

    tok = load_tokenizer(model_dir)
    prompts = [tok.decode(row[:MTP_PROMPT_TOKENS].tolist()) for row in ids[:MTP_PROMPTS]]
    try:
        q = gguf_mtp_acceptance(gguf, prompts, n_predict=MTP_PREDICT)
        ref = gguf_mtp_acceptance(baseline, prompts, n_predict=MTP_PREDICT)
        if is_measured(q["acceptance"]) and is_measured(ref["acceptance"]) and ref["acceptance"] > 0:
            mtp = [{"depth": 1, "acceptance": q["acceptance"], "acceptance_ref": ref["acceptance"],
                    "ratio": q["acceptance"] / ref["acceptance"], "how": "llama.cpp draft-mtp, greedy, against "
                    "the BF16 GGUF", "drafted": q["drafted"], "drafted_ref": ref["drafted"]}]
        else:
            mtp = not_measured("llama.cpp drafted nothing on the eval prompts")
    except Exception as e:  # noqa: BLE001 - a GGUF written with --no-mtp has no head to draft with
        mtp = not_measured(str(e).splitlines()[0])

    if not speed:
        part = {"llama_bench": not_measured("skipped (--no-speed)"), "ratios": {}}
    else:
        bench = llama_bench([baseline, gguf] if baseline != gguf else [gguf])
        q_b, ref_b = bench[str(gguf)], bench[str(baseline)]
        part = {"llama_bench": {"artifact": q_b, "bf16": ref_b}, "ratios": speed_ratios(q_b, ref_b)}
    part["vllm"] = not_measured("GGUF variants are served by llama.cpp")
    return mtp, part
