"""A report's own digest and signature: a DSSE envelope over an in-toto statement.

An HTML report carries its signature inside itself, in one section between two markers::

    ...<!--passerelle-report-signature--><section>...<script type="application/json"
    id="report-envelope">{DSSE envelope}</script></section><!--/passerelle-report-signature-->...

The statement's subject digest is the SHA-256 of the file with everything between the
markers removed (the markers kept). Nothing else in a page can contain a marker: every
value shown is HTML-escaped, so ``<!--`` cannot come from data. A PDF carries its
envelope beside it, in ``FILE.pdf.dsse.json``, over the PDF's bytes.

The envelope is the ledger's (:func:`transfer.records.sign_envelope`): payload type
``application/vnd.in-toto+json``, one ECDSA P-256 signature over DSSE's PAE, keyid the
site's fingerprint; any DSSE verifier (securesystemslib's, say) checks it with the
site's public key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from passerelle.digests import sha256_bytes
from passerelle.errors import BadInput, Refused
from transfer.ledger_errors import MalformedRecord
from transfer.records import (
    STATEMENT_TYPE,
    KeyRing,
    Signer,
    Verifier,
    keyid_of,
    load_canonical,
    open_envelope,
    sign_envelope,
    verify_signature,
)

BEGIN = "<!--passerelle-report-signature-->"
END = "<!--/passerelle-report-signature-->"
REPORT_TYPE = "https://passerelle.dev/report/v1"
SUBJECT = "passerelle-report"
SIDECAR_SUFFIX = ".dsse.json"
MAX_REPORT = 256 << 20
_ENVELOPE = re.compile(r'<script type="application/json" id="report-envelope">([^<]*)</script>')


class NotAReport(BadInput):
    """The file is not a signed Passerelle report (no envelope where one must be)."""


class ReportNotVerified(Refused):
    """The report's signature or digest does not verify: it was changed, or not signed by
    a key this site knows."""


@dataclass(frozen=True)
class ReportCheck:
    """A report that verified: its digest, who signed it, what its statement says."""

    path: Path
    digest: str
    keyid: str
    site: str
    predicate: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"file": str(self.path), "digest": self.digest, "keyid": self.keyid,
                "site": self.site, "verified": True, "statement": dict(self.predicate)}


def unsigned_bytes(page: str) -> bytes:
    """The bytes the signature covers: the page with its signature section emptied."""
    if page.count(BEGIN) != 1 or page.count(END) != 1 or page.index(BEGIN) > page.index(END):
        raise NotAReport("not a signed Passerelle report (its signature section is missing "
                         "or repeated)")
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return (head + BEGIN + END + tail).encode("utf-8")


def statement_of(digest: str, predicate: Mapping[str, Any]) -> dict[str, Any]:
    return {"_type": STATEMENT_TYPE,
            "subject": [{"name": SUBJECT, "digest": {"sha256": digest.removeprefix("sha256:")}}],
            "predicateType": REPORT_TYPE, "predicate": dict(predicate)}


def sign_page(page: str, signer: Signer, predicate: Mapping[str, Any],
              section: Any) -> str:
    """Sign ``page`` (whose signature section is empty: ``BEGIN + END``) and return it with
    the section filled by ``section(digest, keyid, envelope)`` (HTML)."""
    digest = sha256_bytes(unsigned_bytes(page))
    envelope = sign_envelope(statement_of(digest, predicate), signer)
    if "<" in envelope:  # canonical JSON of base64 and hex: never, but check
        raise ValueError("an envelope cannot be embedded in HTML")
    filled = str(section(digest, signer.keyid, envelope))
    if BEGIN in filled or END in filled:
        raise ValueError("the signature section may not contain the markers")
    out = page.replace(BEGIN + END, BEGIN + filled + END)
    if sha256_bytes(unsigned_bytes(out)) != digest:  # the section is all that was added
        raise ValueError("signing changed the page outside its signature section")
    return out


def envelope_script(envelope: str) -> str:
    return f'<script type="application/json" id="report-envelope">{envelope}</script>'


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def sign_bytes(data: bytes, signer: Signer, predicate: Mapping[str, Any]) -> str:
    """The envelope (canonical JSON text) signing ``data`` (a PDF), kept in its sidecar."""
    return sign_envelope(statement_of(sha256_bytes(data), predicate), signer)


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_REPORT + 1)
    except OSError as e:
        raise NotAReport(f"{path}: cannot read it: {e.strerror}") from e
    if len(data) > MAX_REPORT:
        raise NotAReport(f"{path}: too large for a report")
    return data


def verify_report(path: Path, verifier: Verifier, sites: Mapping[str, str]) -> ReportCheck:
    """Check a report's signature (by a key of ``verifier``; ``sites`` maps keyids to the
    site they belong to) and that its digest is that of the file as it is now.

    Raises :class:`NotAReport` (exit 2) or :class:`ReportNotVerified` (exit 1)."""
    data = _read(path)
    if path.suffix.lower() == ".pdf":
        covered = data
        envelope = _read(sidecar(path)).decode("utf-8", "replace").strip()
    else:
        try:
            page = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise NotAReport(f"{path}: not a report (not UTF-8 text)") from e
        covered = unsigned_bytes(page)
        section = page.split(BEGIN, 1)[1].split(END, 1)[0]
        found = _ENVELOPE.findall(section)
        if len(found) != 1:
            raise NotAReport(f"{path}: the signature section holds no single envelope")
        envelope = found[0]
    # (1) a canonical DSSE envelope with one signature
    try:
        payload, keyid, signature = open_envelope(envelope)
        statement = load_canonical(payload, "report statement")
    except MalformedRecord as e:
        raise NotAReport(f"{path}: the report's envelope is malformed: {e}") from e
    # (2) an in-toto statement about a Passerelle report
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE or \
            statement.get("predicateType") != REPORT_TYPE or \
            not isinstance(statement.get("predicate"), dict) or \
            not isinstance(statement.get("subject"), list) or len(statement["subject"]) != 1:
        raise NotAReport(f"{path}: the envelope holds no Passerelle report statement")
    # (3) signed by a key this site knows
    try:
        verify_signature(keyid, payload, signature, verifier)
    except MalformedRecord as e:
        raise ReportNotVerified(f"{path}: {e}") from e
    predicate = statement["predicate"]
    if predicate.get("site") != sites.get(keyid):
        raise ReportNotVerified(f"{path}: the report says site {predicate.get('site')!r} but "
                                f"is signed by the key of {sites.get(keyid)!r}")
    # (4) the digest signed is the digest of the file as it is now
    digest = sha256_bytes(covered)
    subject = statement["subject"][0]
    named = subject.get("digest", {}).get("sha256") if isinstance(subject, dict) else None
    if named != digest.removeprefix("sha256:"):
        raise ReportNotVerified(f"{path}: the file was changed after it was signed (its "
                                f"digest is {digest}, the signature names sha256:{named})")
    return ReportCheck(path, digest, keyid, str(predicate.get("site")), predicate)


def known_keys(home: Path) -> tuple[KeyRing, dict[str, str]]:
    """The keys a report from this home may be signed with: the site's own (current and
    retired) and those of the sites it trusts (not revoked); keyid -> site."""
    from transfer.identity import public_identity
    from transfer.ledger_site import own_keys
    from transfer.trust import Status, TrustStore

    own = own_keys(home)
    me = public_identity(home).site
    sites: dict[str, str] = {keyid: me for keyid in own.keys}
    keys = dict(own.keys)
    for entry in TrustStore(home).entries():
        if entry.status is not Status.REVOKED:
            key = entry.identity.public_key
            keyid = keyid_of(key)
            keys.setdefault(keyid, key)
            sites.setdefault(keyid, entry.identity.site)
    return KeyRing(keys), sites


def envelope_of(page: str) -> dict[str, Any]:
    """The embedded envelope as a JSON object (for other DSSE verifiers)."""
    section = page.split(BEGIN, 1)[1].split(END, 1)[0]
    doc: dict[str, Any] = json.loads(_ENVELOPE.findall(section)[0])
    return doc
