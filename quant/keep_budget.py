"""Which (layer, role group)s a recipe keeps BF16 under a size budget, from measured sensitivities (stepq
sensitivity). Pure data in, keep rules (quant/recipe.py `keep:`) out."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """A (layer, role group) a recipe can keep BF16: what quantizing it alone costs and what keeping it costs."""

    layer: int
    roles: tuple[str, ...]
    kld: float        # KLD mean with it quantized alone, everything else BF16
    bytes_saved: int  # its BF16 bytes minus its quantized bytes: what keeping it BF16 adds to the artifact
    name: str = ""


def choose(options: list[Option], spare_bytes: int) -> list[Option]:
    """Greedy by KLD cost per byte saved: keeping an option BF16 spends its `bytes_saved` of the spare bytes (the
    budget minus the all-quantized size) and buys back its KLD; KLDs of small independent perturbations add to
    first order, so the best KLD per byte goes first, and an option that no longer fits is skipped for smaller ones
    after it. Options that cost no KLD or save no bytes are never kept."""
    chosen, left = [], spare_bytes
    ranked = sorted((o for o in options if o.kld > 0 and o.bytes_saved > 0),
                    key=lambda o: (-o.kld / o.bytes_saved, o.layer, o.roles))
    for o in ranked:
        if o.bytes_saved <= left:
            chosen.append(o)
            left -= o.bytes_saved
    return chosen


def keep_rules(chosen: list[Option]) -> list[dict]:
    """Recipe `keep:` entries: one per role group, its layers ascending; groups in order of first appearance."""
    layers: dict[tuple[str, ...], list[int]] = {}
    for o in chosen:
        layers.setdefault(o.roles, []).append(o.layer)
    return [{"layers": sorted(ls), "roles": list(roles)} for roles, ls in layers.items()]
