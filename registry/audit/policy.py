"""The audit policy: a versioned TOML file of thresholds, every key required and checked.

The default policy ships with the package (``default-policy.toml`` beside this file);
a site may pass its own. The verdict names the policy by its SHA-256 digest.

The site pins the policy its gate accepts: ``audit.policy_sha256`` in the site policy
(transfer.site_policy, changed only by ``passerelle site policy set``, recorded in the
ledger); empty means the shipped default. An audit may run under another policy (to
explore), but its verdict is marked "not the pinned policy" and opens no gate
(:func:`pinned_policy_digest`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from passerelle.digests import sha256_bytes
from passerelle.errors import BadInput

POLICY_VERSION = 2  # 2: [attacks] max_reference_shift
MIN_REFERENCE_MODELS, MAX_REFERENCE_MODELS = 4, 64


@dataclass(frozen=True)
class AttackSettings:
    reference_models: int
    rmia_gamma: float
    max_reference_shift: float  # |registry.audit.attacks.FitShift| on both sides, at most


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
class ReserveLimits:
    """The sealed reserve (registry.audit.reserve) and the check of the declared split."""

    min_patients: int  # reserve patients scored as non-members, at least
    population_share: float  # share of the reserve kept as RMIA's population
    max_fit_z: float  # z of top-1, held-out vs reserve (cluster-robust), at most


@dataclass(frozen=True)
class Policy:
    name: str
    digest: str
    text: str
    attacks: AttackSettings
    membership: MembershipLimits
    canaries: CanaryLimits
    scan: ScanLimits
    reserve: ReserveLimits


_RANGES: dict[str, tuple[float, float]] = {
    "reference_models": (MIN_REFERENCE_MODELS, MAX_REFERENCE_MODELS),
    "rmia_gamma": (1e-6, 1e6), "max_reference_shift": (0.1, 10.0),
    "population_share": (0.1, 0.5), "max_fit_z": (2.0, 6.0),
    "max_auc": (0.5, 1.0), "max_tpr_at_0_1pct_fpr": (0.0, 1.0),
    "max_tpr_at_1pct_fpr": (0.0, 1.0), "max_epsilon_lower_bound": (0.0, 100.0),
    "epsilon_delta": (0.0, 0.1), "confidence": (0.5, 0.9999), "candidates": (10, 10**7),
    "max_exposure_bits": (0.0, 64.0), "max_identifier_findings": (0, 10**6),
    "min_patients": (1, 10**6), "max_rare_tokens": (0, 10**6),
    "reserve.min_patients": (30, 10**6),
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
    _keys(doc, {"policy_version", "name", "attacks", "membership", "canaries", "scan",
                "reserve"}, where)
    if doc["policy_version"] == 1:
        raise BadInput(f"{where}: policy_version 1 has no [attacks] max_reference_shift "
                       f"(the check that the reference models reproduce the target); add "
                       f"it and set policy_version = {POLICY_VERSION}")
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
        reserve=_section(ReserveLimits, doc["reserve"], f"{where} [reserve]", "reserve."),
    )


def pinned_policy_digest(home: Path) -> str:
    """The digest of the policy this site's gate accepts (site policy, else the default)."""
    from transfer.site_policy import load_policy as load_site_policy

    pinned = load_site_policy(home).text("audit.policy_sha256")
    return pinned or load_policy().digest


def _keys(doc: Any, expected: set[str], where: str) -> None:
    if not isinstance(doc, dict):
        raise BadInput(f"{where}: expected a table")
    unknown, missing = set(doc) - expected, expected - set(doc)
    if unknown:
        raise BadInput(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    if missing:
        raise BadInput(f"{where}: missing keys {', '.join(sorted(missing))}")


def _section(cls: type[Any], doc: Any, where: str, prefix: str = "") -> Any:
    names = {f.name: f.type for f in fields(cls)}
    _keys(doc, set(names), where)
    values: dict[str, Any] = {}
    for name, kind in names.items():
        value = doc[name]
        want_int = kind in (int, "int")
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                want_int and not isinstance(value, int)):
            raise BadInput(f"{where}: {name} must be {'an integer' if want_int else 'a number'}")
        low, high = _RANGES.get(prefix + name) or _RANGES[name]
        if not low <= value <= high:
            raise BadInput(f"{where}: {name} = {value} is outside [{low:g}, {high:g}]")
        values[name] = int(value) if want_int else float(value)
    return cls(**values)
