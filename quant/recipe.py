"""Recipes as data: which roles a scheme quantizes. Loaded from YAML by the caller; validated here."""

from __future__ import annotations

from dataclasses import dataclass

SCHEMES = ("fp8-block", "fp8-dynamic", "fp8-static", "nvfp4a16", "nvfp4", "nvfp4-modelopt")

# Roles an engine fuses into one parameter: they must be quantized together and, where the format has a
# per-tensor global scale, share it (vLLM keeps one scale per fused parameter, e.g. only w1's for MoE w13).
FUSED_GROUPS = (
    ("attn_q", "attn_k", "attn_v"),
    ("mlp_gate", "mlp_up"),
    ("shared_gate", "shared_up"),
    ("experts_gate", "experts_up"),
)
QUANTIZABLE_ROLES = frozenset({
    "attn_q", "attn_k", "attn_v", "attn_o", "attn_gate", "mlp_gate", "mlp_up", "mlp_down",
    "shared_gate", "shared_up", "shared_down", "experts_gate", "experts_up", "experts_down",
})
# Never quantized: vLLM builds the router unquantized in fp32; norms, embeddings and heads stay high precision.
PROTECTED_REASONS = {
    "router": "router runs in fp32 in every engine",
    "router_bias": "router selection bias",
    "norm": "norm weight",
    "embed": "embedding",
    "lm_head": "output head",
}
_KEYS = {"name", "scheme", "description", "quantize", "mtp"}
# keep: MTP layers stay BF16 (default). quantize: their decoder block gets the trunk's roles and scheme, with the MTP
# layers' own statistics; eh_proj, the norms and each MTP layer's own head stay BF16.
MTP_MODES = ("keep", "quantize")


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
            raise ValueError(f"{source}: roles {sorted(bad)} cannot be quantized (quantizable: {sorted(QUANTIZABLE_ROLES)})")
        for group in FUSED_GROUPS:
            chosen = roles & set(group)
            if chosen and chosen != set(group):
                raise ValueError(f"{source}: {sorted(chosen)} are fused with {sorted(set(group) - chosen)} by the "
                                 f"engines; quantize all of them or none")
        mtp = d.get("mtp", "keep")
        if mtp not in MTP_MODES:
            raise ValueError(f"{source}: mtp must be one of {list(MTP_MODES)}, got {mtp!r}")
        return cls(name=str(d.get("name", source)), scheme=scheme, quantize=roles, mtp=mtp,
                   description=str(d.get("description", "")))

    def decide(self, role: str, mtp: bool) -> Decision:
        """Whether a tensor of `role` (inside an MTP layer when `mtp`) is quantized, and why."""
        if mtp and self.mtp == "keep":
            return Decision(False, "MTP head kept BF16 (drafter accuracy; engines load it unquantized)")
        if role in PROTECTED_REASONS:
            return Decision(False, PROTECTED_REASONS[role])
        if role in self.quantize:
            return Decision(True, f"recipe {self.name}: {self.scheme}")
        return Decision(False, f"recipe {self.name} keeps {role} BF16")

    def to_dict(self) -> dict:
        return {"name": self.name, "scheme": self.scheme, "quantize": sorted(self.quantize), "mtp": self.mtp,
                "description": self.description}


def fused_group(role: str) -> tuple[str, ...]:
    for group in FUSED_GROUPS:
        if role in group:
            return group
    return (role,)
