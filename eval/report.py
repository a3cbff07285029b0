"""Render an eval report (schema in eval.schema): `report.md` for people, PNG plots, atomic writes into eval/."""

from __future__ import annotations

import json
from pathlib import Path

from convert.durable import write_atomic
from eval.schema import REPORT_JSON, REPORT_MD, is_measured


def _fmt(x, digits: int = 4) -> str:
    if not is_measured(x):
        return f"not measured: {x['not_measured']}"
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def render_markdown(r: dict) -> str:
    a = r["artifact"]
    lines = [f"# Eval: {a['name']}", "",
             f"Variant **{a['variant']}** ({a['format']}) against the BF16 source `{r['source']['model']}` on "
             f"{r['text']['sequences']} × {r['text']['seq_len']} held-out tokens from `{r['text']['source']}`.", ""]
    acc = r["accuracy"]
    lines += ["## Accuracy against BF16", "", "| metric | value |", "|---|---|"]
    if is_measured(acc):
        k = acc["kld"]
        lines += [f"| KLD mean / median / p99 / max (nats) | {_fmt(k['mean'])} / {_fmt(k['median'])} / "
                  f"{_fmt(k['p99'])} / {_fmt(k['max'])} |",
                  f"| top-1 agreement | {_fmt(acc['top1'])} |",
                  f"| perplexity (BF16) | {_fmt(acc['ppl'])} ({_fmt(acc['ppl_ref'])}) |",
                  f"| PPL ratio | {_fmt(acc['ppl_ratio'])} |"]
        mtp = acc["mtp"]
        if is_measured(mtp):
            for m in mtp:
                lines.append(f"| MTP depth {m['depth']} acceptance (BF16) / ratio | {_fmt(m['acceptance'])} "
                             f"({_fmt(m['acceptance_ref'])}) / {_fmt(m['ratio'])} |")
        else:
            lines.append(f"| MTP acceptance | {_fmt(mtp)} |")
        if "image" in acc:
            lines += _image_rows(acc["image"])
    else:
        lines.append(f"| all | {_fmt(acc)} |")
    lines += ["", "## Tasks", ""]
    if is_measured(r["tasks"]) and r["tasks"]:
        lines += ["| task | metric | score | BF16 | recovery |", "|---|---|---|---|---|"]
        for name, t in sorted(r["tasks"].items()):
            lines.append(f"| {name} | {t['metric']} | {_fmt(t['score'])} | {_fmt(t['score_ref'])} | "
                         f"{_fmt(t['recovery'])} |")
    else:
        lines.append(_fmt(r["tasks"]) if not is_measured(r["tasks"]) else "no tasks")
    lines += ["", "## Speed", ""]
    sp = r["speed"]
    if sp.get("ratios"):
        lines += ["| test | ratio to BF16 (tokens/s) |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(sp["ratios"].items())]
    for engine in ("llama_bench", "vllm"):
        if engine in sp and not is_measured(sp[engine]):
            lines.append(f"- {engine}: {_fmt(sp[engine])}")
    lines += ["", "## Weights", ""]
    w = r["weights"]
    if is_measured(w):
        lines += ["| role | SQNR (dB) |", "|---|---|"]
        lines += [f"| {role} | {_fmt(v)} |" for role, v in w["per_role"].items()]
    else:
        lines.append(f"- {_fmt(w)}")
    eng = r.get("engines", {})
    if eng:
        lines += ["", "## Engines", ""]
        for k, v in eng.items():
            lines.append(f"- {k}: {_fmt(v) if not is_measured(v) else ('ok' if v.get('ok') else 'FAILED')}")
    if r.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in r["plots"]]
    hw = r["hardware"]
    lines += ["", f"Measured on {hw.get('cpu')} ({hw.get('cores')} cores, {hw.get('ram_gib')} GiB RAM, "
              f"GPU: {hw.get('gpu') or 'none'}); `stepq eval` took {r['timings'].get('total_s', 0):.0f} s.", ""]
    return "\n".join(lines)


def _image_rows(im: dict) -> list[str]:
    """accuracy.image: the image-conditioned figures (text positions of the image set's windows)."""
    if not is_measured(im):
        return [f"| image-conditioned KLD | {_fmt(im)} |"]
    k, st = im["kld"], im["set"]
    where = (f"{im['positions']} text positions of {st['sequences']} × {st['seq_len']} windows with {st['images']} "
             f"images, `{st['source']}`")
    return [f"| image-conditioned KLD mean / median / p99 / max (nats; {where}) | {_fmt(k['mean'])} / "
            f"{_fmt(k['median'])} / {_fmt(k['p99'])} / {_fmt(k['max'])} |",
            f"| image-conditioned top-1 agreement | {_fmt(im['top1'])} |",
            f"| image-conditioned PPL ratio (perplexity, BF16) | {_fmt(im['ppl_ratio'])} ({_fmt(im['ppl'])}, "
            f"{_fmt(im['ppl_ref'])}) |"]


def write_plots(r: dict, eval_dir: Path) -> list[str]:
    """Per-layer SQNR, per-expert SQNR heatmap, expert load heatmap -> relative PNG paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    w = r["weights"]
    if is_measured(w) and w["per_layer"]:
        fig, ax = plt.subplots(figsize=(8, 3))
        layers = [x["layer"] for x in w["per_layer"]]
        ax.bar([str(layer) for layer in layers], [x["sqnr_db"] or 0 for x in w["per_layer"]])
        ax.set(xlabel="layer", ylabel="SQNR (dB)", title=f"{r['artifact']['name']}: weight SQNR per layer")
        written.append(_save(fig, eval_dir, "weight_sqnr_per_layer.png"))
    if is_measured(w) and w["per_expert"]:
        written.append(_heatmap(plt, eval_dir, "weight_sqnr_per_expert.png",
                                {(x["layer"], x["expert"]): x["sqnr_db"] or 0 for x in w["per_expert"]},
                                "SQNR (dB)", f"{r['artifact']['name']}: weight SQNR per expert"))
    load = r.get("expert_load")
    if load and is_measured(load):
        cells = {(int(layer), e): v for layer, row in load.items() for e, v in enumerate(row)}
        written.append(_heatmap(plt, eval_dir, "expert_load.png", cells, "share of routed tokens",
                                "expert load on the calibration set"))
    return written


def _heatmap(plt, eval_dir: Path, name: str, cells: dict, label: str, title: str) -> str:
    layers = sorted({k[0] for k in cells})
    experts = max(k[1] for k in cells) + 1
    grid = [[cells.get((layer, e), float("nan")) for e in range(experts)] for layer in layers]
    fig, ax = plt.subplots(figsize=(max(6, experts * 0.12 + 3), 0.5 * len(layers) + 2))
    im = ax.imshow(grid, aspect="auto", interpolation="nearest")
    ax.set(xlabel="expert", ylabel="layer", title=title, yticks=range(len(layers)), yticklabels=layers)
    fig.colorbar(im, ax=ax, label=label)
    return _save(fig, eval_dir, name)


def _save(fig, eval_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(eval_dir / name, dpi=100)
    fig.clear()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return name


def write_report(r: dict, eval_dir: Path) -> Path:
    """report.json + report.md + plots into `eval_dir` (created by the caller as a temp dir, renamed after)."""
    r["plots"] = write_plots(r, eval_dir)
    write_atomic(eval_dir / REPORT_MD, render_markdown(r))
    write_atomic(eval_dir / REPORT_JSON, json.dumps(r, indent=2, allow_nan=False) + "\n")
    return eval_dir / REPORT_JSON
