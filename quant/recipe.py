"""Recipes as data: which roles a scheme quantizes. Loaded from YAML by the caller; validated here."""

from __future__ import annotations

from dataclasses import dataclass

from quant import mtp as mtp_rule
from quant.layouts import LAYOUTS
from quant.roles import FUSED_GROUPS, LINEAR_ROLES, Role

SCHEMES = tuple(LAYOUTS)
# Never quantized: vLLM builds the router unquantized in fp32; norms, embeddings and heads stay high precision.
PROTECTED_REASONS = {
    Role.ROUTER: "router runs in fp32 in every engine",
    Role.ROUTER_BIAS: "router selection bias",
    Role.NORM: "norm weight",
    Role.EMBED: "embedding",
    Role.LM_HEAD: "output head",
}
QUANTIZABLE_ROLES = LINEAR_ROLES - PROTECTED_REASONS.keys() - mtp_rule.ALWAYS_BF16
_KEYS = {"name", "scheme", "description", "quantize", "mtp"}


@dataclass(frozen=True)
class Decision:
    quantize: bool
    reason: str


@dataclass(frozen=True)
class Recipe:
    name: str
    scheme: str
    quantize: frozenset[str]
    mtp: str = "keep"
    description: str = ""

    @classmethod
    def from_dict(cls, d: dict, source: str = "recipe") -> Recipe:
        if not isinstance(d, dict):
            raise ValueError(f"{source}: a recipe is a mapping")
        unknown = set(d) - _KEYS
        if unknown:
            raise ValueError(f"{source}: unknown recipe keys {sorted(unknown)} (allowed: {sorted(_KEYS)})")
        scheme = d.get("scheme")
        if scheme not in SCHEMES:
            raise ValueError(f"{source}: scheme {scheme!r} not one of {list(SCHEMES)}")
        roles = frozenset(d.get("quantize") or ())
        bad = roles - QUANTIZABLE_ROLES
        if bad:
            raise ValueError(f"{source}: roles {sorted(bad)} cannot be quantized "
                             f"(quantizable: {sorted(map(str, QUANTIZABLE_ROLES))})")
        for group in FUSED_GROUPS:
            chosen = roles & set(group)
            if chosen and chosen != set(group):
                raise ValueError(f"{source}: {sorted(map(str, chosen))} are fused with {sorted(map(str, set(group) - chosen))} "
                                 f"by the engines; quantize all of them or none")
        mtp = d.get("mtp", "keep")
        if mtp not in mtp_rule.MODES:
            raise ValueError(f"{source}: mtp must be one of {list(mtp_rule.MODES)}, got {mtp!r}")
        return cls(name=str(d.get("name", source)), scheme=scheme, quantize=roles, mtp=mtp,
                   description=str(d.get("description", "")))

    def decide(self, role: str, mtp: bool) -> Decision:
        """Whether a tensor of `role` (inside an MTP layer when `mtp`) is quantized, and why."""
        if mtp_rule.kept_bf16(self.mtp, mtp):
            return Decision(False, mtp_rule.KEPT_REASON)
        if role in PROTECTED_REASONS:
            return Decision(False, PROTECTED_REASONS[role])
        if role in self.quantize:
            return Decision(True, f"recipe {self.name}: {self.scheme}")
        return Decision(False, f"recipe {self.name} keeps {role} BF16")

    def to_dict(self) -> dict:
        return {"name": self.name, "scheme": self.scheme, "quantize": sorted(self.quantize), "mtp": self.mtp,
                "description": self.description}

