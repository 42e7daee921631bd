"""The audit policy: a versioned TOML file of thresholds, every key required and checked.

The default policy ships with the package (``default-policy.toml`` beside this file);
a site may pass its own. The verdict names the policy by its SHA-256 digest.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from passerelle.digests import sha256_bytes
from passerelle.errors import BadInput

POLICY_VERSION = 1


@dataclass(frozen=True)
class AttackSettings:
    reference_models: int
    rmia_a: float
    rmia_gamma: float


@dataclass(frozen=True)
class MembershipLimits:
    max_auc: float
    max_tpr_at_0_1pct_fpr: float
    max_tpr_at_1pct_fpr: float
    max_epsilon_lower_bound: float
    epsilon_delta: float
    confidence: float


@dataclass(frozen=True)
class CanaryLimits:
    candidates: int
    max_exposure_bits: float


@dataclass(frozen=True)
class ScanLimits:
    max_identifier_findings: int
    min_patients: int
    max_rare_tokens: int


@dataclass(frozen=True)
class Policy:
    name: str
    digest: str
    text: str
    attacks: AttackSettings
    membership: MembershipLimits
    canaries: CanaryLimits
    scan: ScanLimits


_RANGES: dict[str, tuple[float, float]] = {
    "reference_models": (2, 256), "rmia_a": (0.0, 1.0), "rmia_gamma": (1e-6, 1e6),
    "max_auc": (0.5, 1.0), "max_tpr_at_0_1pct_fpr": (0.0, 1.0),
    "max_tpr_at_1pct_fpr": (0.0, 1.0), "max_epsilon_lower_bound": (0.0, 100.0),
    "epsilon_delta": (0.0, 0.1), "confidence": (0.5, 0.9999), "candidates": (10, 10**7),
    "max_exposure_bits": (0.0, 64.0), "max_identifier_findings": (0, 10**6),
    "min_patients": (1, 10**6), "max_rare_tokens": (0, 10**6),
}


def default_policy_path() -> Path:
    return Path(str(resources.files("registry.audit") / "default-policy.toml"))


def load_policy(path: Path | None = None) -> Policy:
    """Parse and validate a policy file (the default one without ``path``)."""
    path = path or default_policy_path()
    try:
        raw = path.read_bytes()
        doc = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError as e:
        raise BadInput(f"{path}: no such policy file") from e
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise BadInput(f"{path}: not a readable TOML policy: {e}") from e
    where = str(path)
    _keys(doc, {"policy_version", "name", "attacks", "membership", "canaries", "scan"}, where)
    if doc["policy_version"] != POLICY_VERSION:
        raise BadInput(f"{where}: policy_version must be {POLICY_VERSION}")
    if not isinstance(doc["name"], str) or not doc["name"].strip():
        raise BadInput(f"{where}: name must be a non-empty string")
    return Policy(
        name=doc["name"],
        digest=sha256_bytes(raw),
        text=raw.decode("utf-8"),
        attacks=_section(AttackSettings, doc["attacks"], f"{where} [attacks]"),
        membership=_section(MembershipLimits, doc["membership"], f"{where} [membership]"),
        canaries=_section(CanaryLimits, doc["canaries"], f"{where} [canaries]"),
        scan=_section(ScanLimits, doc["scan"], f"{where} [scan]"),
    )


def _keys(doc: Any, expected: set[str], where: str) -> None:
    if not isinstance(doc, dict):
        raise BadInput(f"{where}: expected a table")
    unknown, missing = set(doc) - expected, expected - set(doc)
    if unknown:
        raise BadInput(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    if missing:
        raise BadInput(f"{where}: missing keys {', '.join(sorted(missing))}")


def _section(cls: type[Any], doc: Any, where: str) -> Any:
    names = {f.name: f.type for f in fields(cls)}
    _keys(doc, set(names), where)
    values: dict[str, Any] = {}
    for name, kind in names.items():
        value = doc[name]
        want_int = kind in (int, "int")
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                want_int and not isinstance(value, int)):
            raise BadInput(f"{where}: {name} must be {'an integer' if want_int else 'a number'}")
        low, high = _RANGES[name]
        if not low <= value <= high:
            raise BadInput(f"{where}: {name} = {value} is outside [{low:g}, {high:g}]")
        values[name] = int(value) if want_int else float(value)
    return cls(**values)
