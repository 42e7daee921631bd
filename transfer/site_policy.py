"""The site's own configuration: the settings a guarantee rests on, which no flag changes.

A guarantee may not rest on what a command's caller declares (a budget cap on the command
line, an audit policy file of the caller's choosing, a bundle's validity). What the site
decides lives here, in ``HOME/site-policy.toml``, and every change is a recorded act:

* each setting is declared once in :data:`KEYS`, with its default, its bounds and a help
  line; unknown settings and values outside the bounds are refused;
* ``passerelle site policy set KEY VALUE --approver NAME --justification TEXT`` is the
  only writer: it appends a signed ``site_policy_changed`` record to the site's ledger
  (old and new value, approver, justification, the digest of the new file), then puts
  the file in place atomically;
* :func:`load_policy` refuses a file whose digest is not the one the newest such record
  names (a hand edit, a copy from elsewhere, a deletion after a change), so what a
  command reads is what the site recorded. A site that never changed a setting has no
  file and no record, and reads the defaults.

Writing the file requires the site's identity (a ledger to record in). Reading works in
a home without one (the defaults, or a refusal if a file is there nobody recorded).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from passerelle.digests import sha256_bytes
from passerelle.errors import BadInput, Refused

POLICY_FILE = "site-policy.toml"

Value = float | int | str | bool | tuple[str, ...]


class SitePolicyError(BadInput):
    """A setting or value the site policy does not accept."""


class SitePolicyTampered(Refused):
    """The policy file is not the one the ledger recorded."""


# -- value checks -------------------------------------------------------------------


def _number(raw: Any, lo: float, hi: float, what: str) -> float:
    if isinstance(raw, bool):
        raise SitePolicyError(f"{what}: a number is needed, not {raw!r}")
    try:
        value = float(raw)
    except (TypeError, ValueError) as e:
        raise SitePolicyError(f"{what}: {raw!r} is not a number") from e
    if not math.isfinite(value) or not lo <= value <= hi:
        raise SitePolicyError(f"{what}: {value:g} is outside [{lo:g}, {hi:g}]")
    return value


def real(lo: float, hi: float) -> Callable[[Any, str], Value]:
    """A finite float in ``[lo, hi]``."""
    return lambda raw, what: _number(raw, lo, hi, what)


def integer(lo: int, hi: int) -> Callable[[Any, str], Value]:
    """A whole number in ``[lo, hi]``."""
    def check(raw: Any, what: str) -> Value:
        value = _number(raw, lo, hi, what)
        if value != int(value):
            raise SitePolicyError(f"{what}: {raw!r} is not a whole number")
        return int(value)
    return check


def choices(*allowed: str, many: bool = False) -> Callable[[Any, str], Value]:
    """One of ``allowed`` (``many``: a non-empty, comma-separated set of them)."""
    def check(raw: Any, what: str) -> Value:
        items = raw.split(",") if isinstance(raw, str) else raw
        if isinstance(items, str) or not isinstance(items, list | tuple):
            raise SitePolicyError(f"{what}: {raw!r} is not one of {', '.join(allowed)}")
        picked = tuple(sorted({str(i).strip() for i in items}))
        if not picked or any(p not in allowed for p in picked) or (len(picked) > 1
                                                                    and not many):
            raise SitePolicyError(f"{what}: {raw!r} is not {'a set of' if many else 'one of'} "
                                  f"{', '.join(allowed)}")
        return picked if many else picked[0]
    return check


def digest_or_unset() -> Callable[[Any, str], Value]:
    """A ``sha256:<64 hex>`` digest, or the empty string (not pinned)."""
    def check(raw: Any, what: str) -> Value:
        text = str(raw).strip()
        if text and not (text.startswith("sha256:") and len(text) == 71
                         and all(c in "0123456789abcdef" for c in text[7:])):
            raise SitePolicyError(f"{what}: {raw!r} is not a sha256:<64 hex digits> digest")
        return text
    return check


@dataclass(frozen=True)
class Key:
    """One setting of the site: its default, its check and what it is for."""

    name: str  # "section.setting"
    default: Value
    check: Callable[[Any, str], Value]
    help: str

    def parse(self, raw: Any) -> Value:
        return self.check(raw, self.name)


KEYS: Mapping[str, Key] = MappingProxyType({k.name: k for k in (
    # -- privacy budget at this site (adapters/budget.py) ------------------------------
    Key("privacy.epsilon_cap", 10.0, real(0.01, 100.0),
        "largest joint epsilon any one patient may be charged at this site (PLD, patient "
        "level, at privacy.accounting_delta)"),
    Key("privacy.accounting_delta", 1e-5, real(1e-12, 1e-4),
        "the one delta at which the joint spend of all runs on a patient is evaluated"),
    Key("privacy.delta_per_run_max", 0.0, real(0.0, 1e-4),
        "largest delta one run may use (0: min(1e-5, 1 / (10 x released units)))"),
    Key("privacy.delta_total_max", 1e-4, real(1e-12, 1e-2),
        "largest sum of the deltas of all runs charged to one patient"),
    Key("privacy.units", ("patient",), choices("patient", "stay", many=True),
        "privacy units a run may use (stay: charged at patient level by group privacy)"),
    # -- transfers (transfer/bundle.py) ------------------------------------------------
    Key("transfer.max_validity_days", 90, integer(1, 366),
        "longest validity a bundle created or accepted at this site may have, in days"),
    # -- the memorisation audit (registry/audit) ---------------------------------------
    Key("audit.policy_sha256", "", digest_or_unset(),
        "digest of the audit policy file this site pins (empty: the shipped default)"),
    # -- deployment (transfer/serve.py) ------------------------------------------------
    Key("deploy.check_interval_seconds", 30, integer(1, 600),
        "longest time a running `serve` goes without checking its model again (a "
        "withdrawal takes effect within it); --check-interval may only shorten it"),
)})


# -- reading ------------------------------------------------------------------------


@dataclass(frozen=True)
class SitePolicy:
    """The settings in force at a site, and the digest of the file they came from."""

    values: Mapping[str, Value]
    digest: str | None  # None: no file, the defaults

    def get(self, name: str) -> Value:
        if name not in KEYS:
            raise SitePolicyError(f"unknown site setting {name!r}")
        return self.values[name]

    def real(self, name: str) -> float:
        value = self.get(name)
        assert isinstance(value, int | float) and not isinstance(value, bool)  # noqa: S101
        return float(value)

    def text(self, name: str) -> str:
        return str(self.get(name))

    def changed(self) -> dict[str, Value]:
        """The settings that differ from their default."""
        return {n: v for n, v in self.values.items() if v != KEYS[n].default}


def _parse_file(text: str, where: Path) -> dict[str, Value]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SitePolicyTampered(f"{where}: not valid TOML ({e}); it was not written by "
                                 "`passerelle site policy set`") from e
    values: dict[str, Value] = {}
    for section, body in doc.items():
        if not isinstance(body, dict):
            raise SitePolicyTampered(f"{where}: {section!r} is not a [section]")
        for setting, raw in body.items():
            name = f"{section}.{setting}"
            if name not in KEYS:
                raise SitePolicyTampered(f"{where}: unknown setting {name!r}")
            values[name] = KEYS[name].parse(raw)
    return values


def _recorded_digest(home: Path) -> tuple[bool, str | None]:
    """(whether the home has a ledger, digest named by its newest policy record)."""
    from transfer.acts import has_ledger
    from transfer.ledger_site import open_ledger, own_keys
    from transfer.records import RecordKind, check_signature

    if not has_ledger(home):
        return False, None
    with open_ledger(home) as ledger:
        found = ledger.records(kind=RecordKind.SITE_POLICY_CHANGED)
    if not found:
        return True, None
    newest = found[-1]
    check_signature(newest, own_keys(home))
    digest = newest.fields.get("policy_digest")
    return True, digest if isinstance(digest, str) else None


def load_policy(home: Path) -> SitePolicy:
    """The site's settings, checked against the ledger (:class:`SitePolicyTampered`)."""
    path = home / POLICY_FILE
    has, recorded = _recorded_digest(home)
    _roll_forward(home, recorded)
    exists = path.is_file()
    data = path.read_bytes() if exists else b""
    digest = sha256_bytes(data) if exists else None
    if exists and not has:
        raise SitePolicyTampered(f"{path}: a site policy needs the site's ledger to record "
                                 "it (run `passerelle site init` first); this file was not "
                                 "written by `passerelle site policy set`")
    if digest != recorded:
        if digest is None:
            raise SitePolicyTampered(f"{path} is missing, but the ledger records a site "
                                     f"policy {recorded}: restore it from a backup")
        raise SitePolicyTampered(f"{path} (digest {digest}) is not the policy the ledger "
                                 f"recorded ({recorded or 'none'}): it was edited outside "
                                 "`passerelle site policy set`")
    values = {n: k.default for n, k in KEYS.items()}
    if exists:
        values.update(_parse_file(data.decode("utf-8"), path))
    return SitePolicy(MappingProxyType(values), digest)


def _roll_forward(home: Path, recorded: str | None) -> None:
    """Finish a change that was recorded but killed before its file was put in place.

    ``set_value`` writes the new file beside the old one, records it, then renames it:
    a kill between the last two steps leaves the recorded file under a temporary name.
    """
    path = home / POLICY_FILE
    current = sha256_bytes(path.read_bytes()) if path.is_file() else None
    for staged in sorted(home.glob(".site-policy-*")):
        if recorded is not None and current != recorded and staged.is_file() \
                and sha256_bytes(staged.read_bytes()) == recorded:
            os.replace(staged, path)
            current = recorded
        else:
            staged.unlink(missing_ok=True)


# -- writing ------------------------------------------------------------------------


def _toml_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def render(values: Mapping[str, Value]) -> bytes:
    """The file for ``values``: the settings that differ from their default, sorted."""
    sections: dict[str, list[str]] = {}
    for name in sorted(values):
        if values[name] == KEYS[name].default:
            continue
        section, setting = name.split(".", 1)
        sections.setdefault(section, []).append(f"{setting} = {_toml_value(values[name])}")
    out = ["# Written by `passerelle site policy set`; every change is in the ledger.",
           "# Do not edit: a file the ledger did not record is refused."]
    for section, lines in sections.items():
        out += ["", f"[{section}]", *lines]
    return ("\n".join(out) + "\n").encode("utf-8")


def set_value(home: Path, name: str, raw: str, approver: str, justification: str) -> SitePolicy:
    """Change one setting: record the change, then put the new file in place."""
    from transfer.acts import has_ledger, recorder
    from transfer.records import RecordKind, Subject

    if name not in KEYS:
        raise SitePolicyError(f"unknown site setting {name!r} (known: {', '.join(KEYS)})")
    if not approver.strip() or not justification.strip():
        raise SitePolicyError("a change of the site policy needs --approver and "
                              "--justification")
    if not has_ledger(home):
        raise SitePolicyError(f"{home}: no site identity here, so no ledger to record the "
                              "change in (run `passerelle site init NAME` first)")
    current = load_policy(home)
    value = KEYS[name].parse(raw)
    values = dict(current.values)
    old, values[name] = values[name], value
    data = render(values)
    digest = sha256_bytes(data)
    path = home / POLICY_FILE
    fd, tmp = tempfile.mkstemp(prefix=".site-policy-", dir=home)
    recorded = False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with recorder(home) as rec:
            rec.record(RecordKind.SITE_POLICY_CHANGED, [Subject.of("site-policy", digest)],
                       {"setting": name, "old": _json_value(old), "new": _json_value(value),
                        "approver": approver.strip(), "justification": justification.strip(),
                        "policy_digest": digest,
                        "previous_digest": current.digest})
        recorded = True
        os.replace(tmp, path)
    except BaseException:
        if recorded:  # the change is in the ledger: the file must follow (roll forward)
            _roll_forward(home, digest)
        Path(tmp).unlink(missing_ok=True)
        raise
    return SitePolicy(MappingProxyType(values), digest)


def _json_value(value: Value) -> Any:
    return list(value) if isinstance(value, tuple) else value
