"""The eval report (`<artifact>/eval/report.json`): what `stepq eval` writes and `stepq gate` / `stepq publish` read.

Schema `stepq.eval/1`. A measured value is a number; anything that could not be measured here is the object
`{"not_measured": "<why>"}` in its place (never a made-up number). Keys:

    schema            "stepq.eval/1"
    artifact          {"path", "name" (folder name), "variant" (e.g. "NVFP4", "FP8-BLOCK", "GGUF-Q4_K_M"),
                       "format" ("safetensors" | "gguf"), "scheme" (stepq.json scheme, "gguf" for GGUF),
                       "qtype" (GGUF type or null)}
    files             {relative path: sha256} of every artifact file judged (the eval/ folder itself excluded)
    source            {"model": id or path, "fingerprint": {...}}
    text              {"source": path or dataset id, "sha256", "sequences", "seq_len", "tokens"}
    accuracy          {"kld": {"mean", "median", "p99", "max"}, "top1", "ppl", "ppl_ref", "ppl_ratio",
                       "mtp": [{"depth", "acceptance", "acceptance_ref", "ratio"}, ...] or {"not_measured"},
                       "image" (Step-3.7 sources): {"kld", "top1", "ppl", "ppl_ref", "ppl_ratio", "positions",
                       "set": {"source", "sha256", "samples", "images", "sequences", "seq_len", "image_tokens"}}
                       over the text positions of an image set (`--dataset` naming images), or {"not_measured"}}
    weights           {"per_layer": [{"layer", "sqnr_db"}], "per_expert": [{"layer", "expert", "sqnr_db"}],
                       "per_role": {role: sqnr_db}} or {"not_measured"}   (safetensors variants)
    expert_load       {layer: [fraction of routed tokens per expert]} from calibration, or {"not_measured"}
    tasks             {task: {"metric", "score", "score_ref", "recovery"}} or {"not_measured"}
    speed             {"llama_bench": {...raw figures...} or {"not_measured"},
                       "vllm": {...} or {"not_measured"},
                       "ratios": {"pp512": quant/BF16 tokens/s, "tg128": ...} or {} when nothing was measured}
    engines           {"vllm_load": {"ok": bool, ...} or {"not_measured"}}
    hardware          {"cpu", "cores", "ram_gib", "gpu"}
    versions          {package: version}
    timings           {stage: seconds}
    plots             [relative paths of PNGs inside eval/]

The gate reads dotted paths into this dict (e.g. "accuracy.kld.mean", "accuracy.mtp[].ratio",
"tasks.*.recovery", "speed.ratios.tg128").
"""

SCHEMA = "stepq.eval/1"
REPORT_DIR = "eval"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
GATE_JSON = "gate.json"


def not_measured(why: str) -> dict:
    return {"not_measured": why}


def is_measured(value) -> bool:
    return not (isinstance(value, dict) and "not_measured" in value)
