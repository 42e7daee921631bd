"""The site's pseudonymisation key: keyed digests of patient ids that reveal nothing.

Some guarantees need a value per patient that the model's owner can neither predict nor
steer, and that stays put when other patients come and go: the audit's sealed reserve of
non-members, the held-out split of a fine-tuning run, the identity of a dataset in the
privacy budget. All are drawn from HMAC-SHA256 under one secret of the site:

* ``HOME/pseudonym.key`` (32 random bytes from the OS, mode 0600), or
  ``HOME/pseudonym.key.age`` (the same, encrypted with age's passphrase recipient) when
  the site's keys are passphrase-protected. It lives outside ``identity/``, so key
  rotation keeps it: the reserve, the splits and the budgets stay the same.
* It is created on first use, at a home with a site identity, and its commitment
  (HMAC of a fixed label, not the key) is recorded in the ledger
  (``pseudonym_key_created``). Later uses check the key against that commitment: a
  deleted or replaced key is refused instead of silently giving fresh budgets and
  reserves. A lost key must be restored from the site's backup.

``purpose`` separates uses: the same patient gets unrelated values for the reserve and
for a split.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
from pathlib import Path

import pyrage  # type: ignore[import-untyped]

from passerelle.errors import BadInput, Refused

KEY_FILE = "pseudonym.key"
SEALED_FILE = "pseudonym.key.age"
_COMMITMENT_LABEL = b"passerelle pseudonym key commitment v1"


class PseudonymKeyError(Refused):
    """The site's pseudonymisation key is missing, unreadable or not the recorded one."""


def _commitment(key: bytes) -> str:
    return "sha256:" + hmac.new(key, _COMMITMENT_LABEL, hashlib.sha256).hexdigest()


def _recorded_commitment(home: Path) -> str | None:
    from transfer.ledger_site import open_ledger, own_keys
    from transfer.records import RecordKind, check_signature

    with open_ledger(home) as ledger:
        found = ledger.records(kind=RecordKind.PSEUDONYM_KEY_CREATED)
    if not found:
        return None
    first = found[0]
    check_signature(first, own_keys(home))
    value = first.fields.get("commitment")
    return value if isinstance(value, str) else None


def _read(home: Path, passphrase: str | None) -> bytes | None:
    plain, sealed = home / KEY_FILE, home / SEALED_FILE
    try:
        if sealed.is_file():
            if not passphrase:
                raise PseudonymKeyError(f"{sealed} is passphrase-protected: set "
                                        "PASSERELLE_PASSPHRASE")
            key = bytes(pyrage.passphrase.decrypt(sealed.read_bytes(), passphrase))
        elif plain.is_file():
            key = plain.read_bytes()
        else:
            return None
    except (OSError, pyrage.DecryptError) as e:
        raise PseudonymKeyError(f"{home}: the pseudonymisation key cannot be read: {e}") from e
    if len(key) != 32:
        raise PseudonymKeyError(f"{home}: the pseudonymisation key is not 32 bytes")
    return key


def _create(home: Path, passphrase: str | None) -> bytes:
    from transfer.acts import recorder
    from transfer.identity import _write_private
    from transfer.records import RecordKind

    key = secrets.token_bytes(32)
    target = home / (SEALED_FILE if passphrase else KEY_FILE)
    staged = home / f".{target.name}.{os.getpid()}"
    _write_private(staged, pyrage.passphrase.encrypt(key, passphrase) if passphrase else key)
    try:
        with recorder(home) as rec:
            rec.record(RecordKind.PSEUDONYM_KEY_CREATED, [],
                       {"commitment": _commitment(key), "encrypted": bool(passphrase)})
        os.replace(staged, target)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return key


def _roll_forward(home: Path, passphrase: str | None, recorded: str) -> bytes | None:
    """Finish a creation killed after its record and before its rename."""
    for staged in sorted(home.glob(".pseudonym.key*")):
        try:
            data = staged.read_bytes()
            key = bytes(pyrage.passphrase.decrypt(data, passphrase)) if passphrase else data
        except (OSError, pyrage.DecryptError):
            continue
        if len(key) == 32 and hmac.compare_digest(_commitment(key), recorded):
            os.replace(staged, home / (SEALED_FILE if passphrase else KEY_FILE))
            return key
    return None


def site_key(home: Path) -> bytes:
    """The site's pseudonymisation key, created on first use; checked against the ledger."""
    from transfer.acts import has_ledger
    from transfer.identity import load_site

    if not has_ledger(home):
        raise BadInput(f"{home}: no site identity here; keyed patient digests need the "
                       "site's key (run `passerelle site init NAME` first)")
    passphrase = load_site(home).passphrase
    recorded = _recorded_commitment(home)
    key = _read(home, passphrase)
    if key is None and recorded is not None:
        key = _roll_forward(home, passphrase, recorded)
    if key is None:
        if recorded is not None:
            raise PseudonymKeyError(
                f"{home}: the pseudonymisation key recorded in the ledger ({recorded}) is "
                f"missing: restore {KEY_FILE} (or {SEALED_FILE}) from the site's backup")
        return _create(home, passphrase)
    if recorded is None or not hmac.compare_digest(_commitment(key), recorded):
        raise PseudonymKeyError(f"{home}: the pseudonymisation key is not the one the ledger "
                                "recorded (replaced or copied from another site)")
    return key


def keyed_id_with(key: bytes, purpose: str, value: str) -> str:
    """``hmac:<hex>`` of ``value`` for ``purpose`` under ``key``."""
    msg = purpose.encode() + b"\x00" + value.encode("utf-8")
    return "hmac:" + hmac.new(key, msg, hashlib.sha256).hexdigest()


def keyed_fraction_with(key: bytes, purpose: str, value: str) -> float:
    """A number in [0, 1), uniform and stable for ``value`` (53 bits of the HMAC)."""
    digest = hmac.new(key, purpose.encode() + b"\x00" + value.encode("utf-8"),
                      hashlib.sha256).digest()
    return float(struct.unpack(">Q", digest[:8])[0] >> 11) / float(1 << 53)


def keyed_id(home: Path, purpose: str, value: str) -> str:
    """The keyed digest of ``value`` at this site (reveals nothing without the key)."""
    return keyed_id_with(site_key(home), purpose, value)


def keyed_fraction(home: Path, purpose: str, value: str) -> float:
    """This site's stable uniform number in [0, 1) for ``value`` and ``purpose``."""
    return keyed_fraction_with(site_key(home), purpose, value)
