"""Recipes as data: which roles a scheme quantizes, and per-layer exceptions kept BF16. Loaded from YAML by the
caller; validated here.

    keep:                      # optional: these roles stay BF16 in these layers (checkpoint layer numbers)
      - {layers: [0, 4], roles: [attn_q, attn_k, attn_v]}

A keep rule names roles the recipe quantizes, and keeps an engine's module whole (`quant.roles.SCHEME_GROUPS`): a
layer's q/k/v, its gate/up pairs and its routed experts (gate, up and down: one fused MoE in vLLM) are kept or
quantized together. `stepq sensitivity` writes such recipes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quant import mtp as mtp_rule
from quant.layouts import LAYOUTS
from quant.roles import LINEAR_ROLES, SCHEME_GROUPS, Role

SCHEMES = tuple(LAYOUTS)
# Never quantized: vLLM builds the router unquantized in fp32; norms, embeddings and heads stay high precision.
PROTECTED_REASONS = {
    Role.ROUTER: "router runs in fp32 in every engine",
    Role.ROUTER_BIAS: "router selection bias",
    Role.NORM: "norm weight",
    Role.EMBED: "embedding",
    Role.LM_HEAD: "output head",
    Role.VISION_LINEAR: "vision tower stays BF16",
    Role.VISION: "vision tower stays BF16",
    Role.VISION_PROJECTOR: "vision projector stays BF16",
}
QUANTIZABLE_ROLES = LINEAR_ROLES - PROTECTED_REASONS.keys() - mtp_rule.ALWAYS_BF16
_KEYS = {"name", "scheme", "description", "quantize", "mtp", "keep"}
_KEEP_KEYS = {"layers", "roles"}


@dataclass(frozen=True)
class Decision:
    quantize: bool
    reason: str


@dataclass(frozen=True)
class KeepRule:
    """Roles kept BF16 in some layers: one entry of a recipe's `keep:` list."""

    layers: tuple[int, ...]
    roles: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "roles": list(self.roles)}


@dataclass(frozen=True)
class Recipe:
    name: str
    scheme: str
    quantize: frozenset[str]
    mtp: str = "keep"
    description: str = ""
    keep: tuple[KeepRule, ...] = ()
    source: str = field(default="recipe", compare=False)  # where it was read from: errors name it

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
        for group in SCHEME_GROUPS:
            chosen = roles & set(group)
            if chosen and chosen != set(group):
                raise ValueError(f"{source}: {sorted(map(str, chosen))} are fused with {sorted(map(str, set(group) - chosen))} "
                                 f"by the engines; quantize all of them or none")
        mtp = d.get("mtp", "keep")
        if mtp not in mtp_rule.MODES:
            raise ValueError(f"{source}: mtp must be one of {list(mtp_rule.MODES)}, got {mtp!r}")
        keep = _keep_rules(d.get("keep"), roles, source)
        return cls(name=str(d.get("name", source)), scheme=scheme, quantize=roles, mtp=mtp,
                   description=str(d.get("description", "")), keep=keep, source=source)

    def decide(self, role: str, mtp: bool, layer: int | None = None) -> Decision:
        """Whether a tensor of `role` in `layer` (inside an MTP layer when `mtp`) is quantized, and why."""
        if mtp_rule.kept_bf16(self.mtp, mtp):
            return Decision(False, mtp_rule.KEPT_REASON)
        if role in PROTECTED_REASONS:
            return Decision(False, PROTECTED_REASONS[role])
        if role in self.quantize:
            for i, rule in enumerate(self.keep):
                if layer in rule.layers and role in rule.roles:
                    return Decision(False, f"recipe {self.name}: keep rule {i + 1} (layers {list(rule.layers)}, "
                                           f"roles {list(rule.roles)}) keeps {role} BF16 in layer {layer}")
            return Decision(True, f"recipe {self.name}: {self.scheme}")
        return Decision(False, f"recipe {self.name} keeps {role} BF16")

    def check_layers(self, num_layers: int) -> None:
        """Keep rules name layers of the model (0 .. num_layers - 1, MTP layers included): ValueError otherwise."""
        for i, rule in enumerate(self.keep):
            if bad := [n for n in rule.layers if n >= num_layers]:
                raise ValueError(f"{self.source}: keep rule {i + 1}: layers {bad} not in this model "
                                 f"(layers 0..{num_layers - 1})")

    def to_dict(self) -> dict:
        return {"name": self.name, "scheme": self.scheme, "quantize": sorted(self.quantize), "mtp": self.mtp,
                "description": self.description, "keep": [r.to_dict() for r in self.keep]}


def _keep_rules(raw, quantized: frozenset[str], source: str) -> tuple[KeepRule, ...]:
    """The `keep:` list, validated: layer numbers, roles the recipe quantizes, engine modules kept whole."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"{source}: keep must be a list of {{layers: [...], roles: [...]}}")
    rules = []
    for i, r in enumerate(raw, start=1):
        where = f"{source}: keep rule {i}"
        if not isinstance(r, dict) or set(r) != _KEEP_KEYS:
            raise ValueError(f"{where}: must be a mapping with exactly the keys {sorted(_KEEP_KEYS)}")
        layers, roles = r["layers"], r["roles"]
        if not (isinstance(layers, list) and layers and all(type(n) is int and n >= 0 for n in layers)):
            raise ValueError(f"{where}: layers must be a non-empty list of layer numbers >= 0, got {layers!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"{where}: layers {layers} repeat a layer")
        if not (isinstance(roles, list) and roles and all(isinstance(x, str) for x in roles)):
            raise ValueError(f"{where}: roles must be a non-empty list of role names, got {roles!r}")
        if unknown := sorted(set(roles) - set(map(str, Role))):
            raise ValueError(f"{where}: unknown roles {unknown}")
        if bad := sorted(set(roles) - quantized):
            raise ValueError(f"{where}: roles {bad} are not quantized by this recipe (it quantizes "
                             f"{sorted(quantized)}): nothing to keep")
        rules.append(KeepRule(tuple(layers), tuple(dict.fromkeys(roles))))
    for layer in sorted({n for r in rules for n in r.layers}):  # the union over rules, per layer
        kept = {role for r in rules if layer in r.layers for role in r.roles}
        for group in SCHEME_GROUPS:
            chosen, whole = kept & set(map(str, group)), set(map(str, group)) & quantized
            if chosen and chosen != whole:
                raise ValueError(f"{source}: layer {layer} keeps {sorted(chosen)} but quantizes "
                                 f"{sorted(whole - chosen)}: the engines run them as one module; keep all or none")
    return tuple(rules)

