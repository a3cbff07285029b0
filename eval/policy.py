"""Gate policies: YAML files of thresholds per variant, loaded strictly (an unknown key is an error).

    description: what this policy is for
    variants:
      default:                                   # every variant; a matching section overrides it rule by rule
        max_kld_mean: 0.01                       # a bare number: hard and required
        min_speed_ratio: {limit: 0.8, severity: warn, required: false}
        require_vllm_load: true                  # a check: true requires it, false drops it
        min_task_recovery: {limit: 0.95, per: {gsm8k: 0.97}}
      "FP8-*":                                   # fnmatch glob on the report's artifact.variant
        max_kld_mean: 0.002
        min_speed_ratio: null                    # drops the inherited rule

Section lookup for a variant: an exact name, else the first glob (in file order) that matches, layered over
`default`. A rule is a number (its limit) or a mapping of `limit`, `severity` (hard | warn), `required` (false: a
metric the report marks not measured is skipped instead of failing) and `per` (limits per MTP depth, task or speed
figure, overriding `limit` for those items). Rules named `*_growth` / `*_drop` compare with a baseline report.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from convert.errors import BadInput

POLICY_DIR = Path(__file__).resolve().parent / "policies"
FIXTURE_POLICY = POLICY_DIR / "fixture.yaml"
MODEL_POLICY = POLICY_DIR / "step35-flash.yaml"
STEP37_POLICY = POLICY_DIR / "step37-flash.yaml"
FIXTURE_NAMES = {"tiny-step35", "tiny-step37"}  # source model names gated by FIXTURE_POLICY; anything else by MODEL_POLICY


@dataclass(frozen=True)
class RuleKind:
    """What a rule name means: the report metric it reads and how it compares.

    `metric` is a dotted path into report.json; `*` expands a dict (tasks, speed ratios) and `name[field]` a list of
    objects keyed by `field` (MTP depths). `against`: "value" compares the metric with the limit; "growth" is the
    relative increase over the baseline report, "drop" the absolute decrease from it. `check`: the metric is a
    pass/fail boolean (the policy says `true` to require it). `formats`: the artifact formats the rule applies to
    (others skip it; empty: all)."""

    metric: str
    bound: str  # "max" | "min": the limit is an upper / lower bound
    against: str = "value"
    severity: str = "hard"
    check: bool = False
    formats: tuple[str, ...] = ()

    @property
    def expands(self) -> bool:
        return "*" in self.metric or "[" in self.metric


RULES: dict[str, RuleKind] = {
    "max_kld_mean": RuleKind("accuracy.kld.mean", "max"),
    "max_kld_p99": RuleKind("accuracy.kld.p99", "max"),
    "min_top1": RuleKind("accuracy.top1", "min"),
    "max_ppl_ratio": RuleKind("accuracy.ppl_ratio", "max"),
    "min_mtp_ratio": RuleKind("accuracy.mtp[depth].ratio", "min"),
    # Step-3.7: over the text positions of an image set (`stepq eval --dataset` naming images)
    "max_image_kld_mean": RuleKind("accuracy.image.kld.mean", "max"),
    "min_image_top1": RuleKind("accuracy.image.top1", "min"),
    "max_image_ppl_ratio": RuleKind("accuracy.image.ppl_ratio", "max"),
    "min_task_recovery": RuleKind("tasks.*.recovery", "min"),
    "min_speed_ratio": RuleKind("speed.ratios.*", "min", severity="warn"),
    # vLLM's own loader built the model and its MTP drafter from the files (`stepq verify --engine vllm`)
    "require_vllm_load": RuleKind("engines.vllm_load.ok", "min", check=True, formats=("safetensors",)),
    # regression against the last release's report
    "max_kld_mean_growth": RuleKind("accuracy.kld.mean", "max", "growth"),
    "max_kld_p99_growth": RuleKind("accuracy.kld.p99", "max", "growth"),
    "max_ppl_ratio_growth": RuleKind("accuracy.ppl_ratio", "max", "growth"),
    "max_top1_drop": RuleKind("accuracy.top1", "max", "drop"),
    "max_mtp_ratio_drop": RuleKind("accuracy.mtp[depth].ratio", "max", "drop"),
    "max_task_recovery_drop": RuleKind("tasks.*.recovery", "max", "drop"),
}
RULE_KEYS = ("limit", "severity", "required", "per")
TOP_KEYS = ("description", "variants")
SEVERITIES = ("hard", "warn")


@dataclass(frozen=True)
class Rule:
    name: str
    limit: float | None
    severity: str
    required: bool = True
    per: dict[str, float] = field(default_factory=dict)

    @property
    def kind(self) -> RuleKind:
        return RULES[self.name]

    def limit_for(self, key: str | None) -> float | None:
        return self.per.get(key, self.limit) if key is not None else self.limit

    def as_dict(self) -> dict:
        return {"rule": self.name, "metric": self.kind.metric, "against": self.kind.against, "limit": self.limit,
                "per": self.per, "severity": self.severity, "required": self.required}


@dataclass(frozen=True)
class Policy:
    path: Path
    text: str
    sha256: str
    description: str
    sections: dict[str, dict[str, Rule | None]]  # section name -> rule name -> rule (None: drop the default's)

    def section_for(self, variant: str) -> str | None:
        """The section overriding `default` for `variant`: its exact name, else the first matching glob."""
        if variant in self.sections and variant != "default":
            return variant
        for name in self.sections:
            if name != "default" and fnmatch.fnmatchcase(variant, name):
                return name
        return None

    def rules_for(self, variant: str) -> tuple[str, list[Rule]]:
        """(the section applied, its effective rules: `default` overridden by the variant's section)."""
        section = self.section_for(variant)
        if section is None and "default" not in self.sections:
            raise BadInput(f"{self.path}: no section matches variant {variant!r} and there is no default")
        merged = dict(self.sections.get("default", {}))
        merged.update(self.sections.get(section, {}) if section else {})
        return section or "default", [r for r in merged.values() if r is not None]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def _number(path: Path, where: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise BadInput(f"{path}: {where}: expected a number, got {value!r}")
    return float(value)


def _parse_rule(path: Path, where: str, name: str, spec) -> Rule | None:
    if name not in RULES:
        raise BadInput(f"{path}: {where}: unknown key {name!r} (rules: {', '.join(RULES)})")
    if spec is None:
        return None
    kind, where = RULES[name], f"{where}.{name}"
    if kind.check:
        return _parse_check(path, where, name, kind, spec)
    if not isinstance(spec, dict):
        return Rule(name, _number(path, where, spec), kind.severity)
    for key in spec:
        if key not in RULE_KEYS:
            raise BadInput(f"{path}: {where}: unknown key {key!r} (known: {', '.join(RULE_KEYS)})")
    severity = spec.get("severity", kind.severity)
    if severity not in SEVERITIES:
        raise BadInput(f"{path}: {where}.severity: {severity!r} is not one of {', '.join(SEVERITIES)}")
    required = spec.get("required", True)
    if not isinstance(required, bool):
        raise BadInput(f"{path}: {where}.required: expected true or false, got {required!r}")
    per = spec.get("per") or {}
    if per and not kind.expands:
        raise BadInput(f"{path}: {where}.per: {kind.metric} is a single figure, `per` does not apply")
    if not isinstance(per, dict):
        raise BadInput(f"{path}: {where}.per: expected a mapping of item -> limit, got {per!r}")
    per = {str(k): _number(path, f"{where}.per.{k}", v) for k, v in per.items()}
    limit = spec.get("limit")
    if limit is None and not per:
        raise BadInput(f"{path}: {where}: needs `limit` (or `per`)")
    limit = None if limit is None else _number(path, f"{where}.limit", limit)
    return Rule(name, limit, severity, required, per)


def _parse_check(path: Path, where: str, name: str, kind: RuleKind, spec) -> Rule | None:
    """A check rule: `true` (required, hard), `false` (dropped), or a mapping with `limit: true` and the usual keys."""
    opts = spec if isinstance(spec, dict) else {"limit": spec}
    for key in opts:
        if key not in ("limit", "severity", "required"):
            raise BadInput(f"{path}: {where}: unknown key {key!r} (known: limit, severity, required)")
    if not isinstance(opts.get("limit"), bool):
        raise BadInput(f"{path}: {where}: expected true or false, got {opts.get('limit')!r}")
    severity, required = opts.get("severity", kind.severity), opts.get("required", True)
    if severity not in SEVERITIES:
        raise BadInput(f"{path}: {where}.severity: {severity!r} is not one of {', '.join(SEVERITIES)}")
    if not isinstance(required, bool):
        raise BadInput(f"{path}: {where}.required: expected true or false, got {required!r}")
    return Rule(name, 1.0, severity, required) if opts["limit"] else None


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise BadInput(f"{path}: cannot read the policy ({e.strerror or e})")
    try:
        doc = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise BadInput(f"{path}: not valid YAML ({' '.join(str(e).split())})")
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: expected a mapping with `variants`")
    for key in doc:
        if key not in TOP_KEYS:
            raise BadInput(f"{path}: unknown key {key!r} (known: {', '.join(TOP_KEYS)})")
    variants = doc.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise BadInput(f"{path}: `variants` must map section names (a variant, a glob or `default`) to rules")
    sections = {}
    for section, rules in variants.items():
        where = f"variants.{section}"
        if not isinstance(rules, dict):
            raise BadInput(f"{path}: {where}: expected a mapping of rule -> limit, got {rules!r}")
        sections[str(section)] = {name: _parse_rule(path, where, name, spec) for name, spec in rules.items()}
    return Policy(path, text, hashlib.sha256(text.encode()).hexdigest(), str(doc.get("description", "")), sections)


def default_policy(source_model: str | None, multimodal: bool = False) -> Path:
    """The bundled policy for a source model: the fixture's for the tiny fixtures, else the Step-3.7-Flash one for
    a model with a vision tower (`multimodal`), else the Step-3.5-Flash one."""
    name = Path(str(source_model or "")).name
    if name in FIXTURE_NAMES:
        return FIXTURE_POLICY
    return STEP37_POLICY if multimodal else MODEL_POLICY
