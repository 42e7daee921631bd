"""A site's identity: an ECDSA P-256 signing key and an age X25519 identity.

Layout under the site's home::

    identity/
      identity.json        the public identity (self-signed), what ``site show`` prints
      signing_key.pem      PKCS#8, mode 0600, encrypted when a passphrase is set
      age_identity.txt     AGE-SECRET-KEY-1..., mode 0600 (no passphrase), or
      age_identity.age     the same, encrypted with age's passphrase (scrypt) recipient
      retired/<hex>/       previous keys after a rotation (kept to read old bundles)

The fingerprint of a site is the sha256 of the DER SubjectPublicKeyInfo of its signing
public key. The public identity is signed by its own key; after a rotation it also
carries a signature by the previous key, which lets a peer that trusts the previous key
accept the new one without a new manual pin.

Passphrases come from ``PASSERELLE_PASSPHRASE`` or an interactive prompt, never from a
command-line argument, and are never logged or printed.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import getpass
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NewType

import pyrage  # type: ignore[import-untyped]
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from passerelle.digests import canonical_json, sha256_bytes
from transfer.errors import BadIdentityFile, IdentityError, SignatureInvalid

SiteName = NewType("SiteName", str)
Fingerprint = NewType("Fingerprint", str)  # sha256:<hex> of the DER SubjectPublicKeyInfo
AgeRecipient = NewType("AgeRecipient", str)  # age1...

PASSPHRASE_ENV = "PASSERELLE_PASSPHRASE"  # noqa: S105 - the name of a variable
IDENTITY_DIR = "identity"
PUBLIC_FILE = "identity.json"
SIGNING_KEY_FILE = "signing_key.pem"
AGE_PLAIN_FILE = "age_identity.txt"
AGE_SEALED_FILE = "age_identity.age"
FORMAT = "passerelle-site-identity"
_SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")
_AGE_RECIPIENT = re.compile(r"^age1[02-9ac-hj-np-z]{58}$")
MAX_IDENTITY_FILE = 64 * 1024


def site_name(text: str) -> SiteName:
    if not _SITE.match(text):
        raise IdentityError(f"{text!r} is not a valid site name (letters, digits, . _ -)")
    return SiteName(text)


def fingerprint_of(key: ec.EllipticCurvePublicKey) -> Fingerprint:
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return Fingerprint(sha256_bytes(der))


def parse_fingerprint(text: str) -> Fingerprint:
    value = text if text.startswith("sha256:") else "sha256:" + text
    if not _FINGERPRINT.match(value):
        raise IdentityError(f"{text!r} is not a fingerprint (sha256:<64 hex digits>)")
    return Fingerprint(value)


_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> str:
    """ECDSA P-256 / SHA-256 signature, base64 of the DER encoding, low-s (s <= n/2)."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    if s > _P256_ORDER // 2:
        s = _P256_ORDER - s
    return base64.b64encode(encode_dss_signature(r, s)).decode()


def verify(key: ec.EllipticCurvePublicKey, data: bytes, signature: str, what: str,
           canonical: bool = False) -> None:
    """Raise :class:`SignatureInvalid` unless ``signature`` is ``key``'s over ``data``.

    ``canonical``: also refuse any other encoding of a valid signature than the one
    :func:`sign` writes (padded standard base64 that round-trips, DER as re-encoded,
    low s), so that one signed document has exactly one byte form (the outer header).
    """
    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
        if canonical:
            r, s = decode_dss_signature(raw)
            if base64.b64encode(raw).decode("ascii") != signature:
                raise ValueError("base64 is not canonical")
            if encode_dss_signature(r, s) != raw:
                raise ValueError("DER is not canonical")
            if s > _P256_ORDER // 2:
                raise ValueError("high-s signature")
        key.verify(raw, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError, UnicodeEncodeError) as e:
        detail = f" ({e})" if canonical and isinstance(e, ValueError) and \
            not isinstance(e, binascii.Error) and str(e) else ""
        raise SignatureInvalid(f"{what}: signature does not verify{detail}") from e


def load_public_key(pem: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnicodeEncodeError) as e:
        raise BadIdentityFile("signing key is not a PEM public key") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise BadIdentityFile("signing key is not an ECDSA P-256 public key")
    return key


@dataclass(frozen=True)
class PublicIdentity:
    """What a site publishes: name, signing key, age recipient, fingerprint; signed."""

    site: SiteName
    signing_key_pem: str
    age_recipient: AgeRecipient
    fingerprint: Fingerprint
    created: str
    self_signature: str
    previous_fingerprint: Fingerprint | None = None
    previous_signature: str | None = None

    def __post_init__(self) -> None:
        key = load_public_key(self.signing_key_pem)
        if fingerprint_of(key) != self.fingerprint:
            raise BadIdentityFile(f"{self.site}: fingerprint does not match the signing key")
        if not _AGE_RECIPIENT.match(self.age_recipient):
            raise BadIdentityFile(f"{self.site}: {self.age_recipient!r} is not an age "
                                  "X25519 recipient")
        if (self.previous_fingerprint is None) != (self.previous_signature is None):
            raise BadIdentityFile(f"{self.site}: previous key fingerprint without signature")
        try:
            verify(key, self.body_bytes(), self.self_signature, "identity self-signature")
        except SignatureInvalid as e:
            raise BadIdentityFile(f"{self.site}: the identity's self-signature does not "
                                  "verify") from e

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return load_public_key(self.signing_key_pem)

    def body(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": 1, "site": self.site,
                "signing_key": self.signing_key_pem, "age_recipient": self.age_recipient,
                "fingerprint": self.fingerprint, "created": self.created,
                "previous_fingerprint": self.previous_fingerprint}

    def body_bytes(self) -> bytes:
        return canonical_json(self.body())

    def to_json(self) -> dict[str, Any]:
        signatures = {"self": self.self_signature}
        if self.previous_signature is not None:
            signatures["previous"] = self.previous_signature
        return {**self.body(), "signatures": signatures}

    def verify_rotation(self, previous: ec.EllipticCurvePublicKey) -> None:
        """Raise unless the previous key signed this identity."""
        if self.previous_signature is None:
            raise BadIdentityFile(f"{self.site}: not signed by a previous key")
        verify(previous, self.body_bytes(), self.previous_signature,
               f"{self.site}: rotation signature by the previous key")

    @classmethod
    def from_json(cls, doc: Any) -> PublicIdentity:
        try:
            if not isinstance(doc, dict) or doc.get("format") != FORMAT or \
                    doc.get("format_version") != 1:
                raise BadIdentityFile("not a Passerelle site identity (format version 1)")
            sigs = doc["signatures"]
            prev = doc.get("previous_fingerprint")
            fields = (doc["site"], doc["signing_key"], doc["age_recipient"],
                      doc["fingerprint"], doc["created"], sigs["self"])
            if not all(isinstance(f, str) for f in fields) or not isinstance(sigs, dict):
                raise BadIdentityFile("identity fields must be strings")
            if not _SITE.match(doc["site"]):
                raise BadIdentityFile(f"{doc['site']!r} is not a valid site name")
            return cls(site=SiteName(doc["site"]), signing_key_pem=doc["signing_key"],
                       age_recipient=AgeRecipient(doc["age_recipient"]),
                       fingerprint=Fingerprint(doc["fingerprint"]), created=doc["created"],
                       self_signature=sigs["self"],
                       previous_fingerprint=None if prev is None else Fingerprint(str(prev)),
                       previous_signature=sigs.get("previous"))
        except (KeyError, TypeError) as e:
            raise BadIdentityFile(f"identity file is missing a field: {e}") from e

    @classmethod
    def from_file(cls, path: Path) -> PublicIdentity:
        from transfer import strict_json

        try:
            if path.stat().st_size > MAX_IDENTITY_FILE:
                raise BadIdentityFile(f"{path}: too large for an identity file")
            raw = path.read_bytes()
        except OSError as e:
            raise IdentityError(f"{path}: cannot read: {e.strerror}") from e
        return cls.from_json(strict_json.loads(raw, str(path), BadIdentityFile,
                                               MAX_IDENTITY_FILE, 4, "a JSON identity file"))


@dataclass(frozen=True)
class SiteIdentity:
    """This site's own identity, private keys unlocked."""

    public: PublicIdentity
    signing_key: ec.EllipticCurvePrivateKey
    signing_key_path: Path
    passphrase: str | None  # for model-signing, which reads the key from its file
    age_identity: Any  # pyrage.x25519.Identity

    @property
    def site(self) -> SiteName:
        return self.public.site

    @property
    def fingerprint(self) -> Fingerprint:
        return self.public.fingerprint


def read_passphrase(prompt: str, confirm: bool = False,
                    required: bool = False) -> str | None:
    """``PASSERELLE_PASSPHRASE`` if set, else a prompt on a terminal, else None.

    ``required`` (``--ask-passphrase``): no variable and no terminal is an
    :class:`IdentityError` (bad input), never a silent fall-back to no passphrase; so is
    an empty answer.
    """
    value = os.environ.get(PASSPHRASE_ENV)
    if value is not None:
        if required and not value:
            raise IdentityError(f"{PASSPHRASE_ENV} is set but empty")
        return value or None
    if not sys.stdin.isatty():
        if required:
            raise IdentityError(f"a passphrase was asked for but there is no terminal to "
                                f"type it on: set {PASSPHRASE_ENV} instead")
        return None
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("again: ") != first:
        raise IdentityError("the two passphrases differ")
    if required and not first:
        raise IdentityError("an empty passphrase was given")
    return first or None


ROTATION_JOURNAL = ".rotation-journal.json"  # in the home, during a rotation's swap
_ROTATION_LOCK = ".rotation.lock"
_rotating = False  # this process holds the rotation lock (settle_rotation is a no-op)


def identity_dir(home: Path) -> Path:
    """``HOME/identity``, once a ``site rotate`` killed during its key swap is settled
    (see :func:`settle_rotation`): every command that reads the identity goes through
    here, so the next one finds a whole identity folder."""
    settle_rotation(home)
    return home / IDENTITY_DIR


@contextmanager
def _rotation_lock(home: Path) -> Iterator[None]:
    global _rotating
    with (home / _ROTATION_LOCK).open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        _rotating = True
        try:
            yield
        finally:
            _rotating = False
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def settle_rotation(home: Path) -> None:
    """Finish or undo the key swap of a ``site rotate`` that was killed during it.

    The rotation writes a journal (:data:`ROTATION_JOURNAL`: the folder of the new keys
    and the name the current folder is moved to) before its two renames, under a lock,
    and removes it after its record. A journal found here (the lock taken: the rotation
    is not running) means it died: with no ``identity/`` (killed between the renames)
    the new folder, complete before the journal was written, is moved in (roll
    forward; the next recorded act records the rotation, see
    :func:`transfer.acts.record_unrecorded_rotation`); with ``identity/`` and the new
    folder both there (killed before the swap), the new folder is dropped and the keys
    are unchanged; with the swap done, only the journal is left to remove.
    """
    journal = home / ROTATION_JOURNAL
    if _rotating or not journal.is_file():
        return
    try:
        with _rotation_lock(home):
            if not journal.is_file():
                return  # settled by another command meanwhile
            try:
                doc = json.loads(journal.read_bytes())
                new, old = home / doc["new"], home / doc["old"]
            except (ValueError, KeyError, TypeError) as e:
                raise IdentityError(f"{journal}: unreadable rotation journal; move it away "
                                    "after checking the identity folder") from e
            if not (str(doc["new"]).startswith(".identity-") and
                    str(doc["old"]).startswith(".identity-old-") and
                    new.parent == home and old.parent == home):
                raise IdentityError(f"{journal}: not a rotation journal of this home")
            target = home / IDENTITY_DIR
            if not target.exists():
                os.rename(new if new.is_dir() else old, target)
            elif new.is_dir():
                shutil.rmtree(new)
            journal.unlink()
    except OSError as e:
        raise IdentityError(f"{home}: an interrupted key rotation cannot be finished: "
                            f"{e.strerror or e}") from e


def public_identity(home: Path) -> PublicIdentity:
    path = identity_dir(home) / PUBLIC_FILE
    if not path.is_file():
        raise IdentityError(f"{home}: no site identity here (run `passerelle site init NAME`)")
    return PublicIdentity.from_file(path)


def site_fingerprints(home: Path) -> list[str]:
    """This site's fingerprint, then those of the keys ``site rotate`` retired
    (``identity/retired/<hex>``): every fingerprint its own acts may carry."""
    current = str(public_identity(home).fingerprint)
    retired = identity_dir(home) / "retired"
    older = sorted(f"sha256:{d.name}" for d in retired.iterdir()
                   if d.is_dir() and not d.is_symlink()) if retired.is_dir() else []
    return [current, *(f for f in older if f != current)]


def init_site(home: Path, name: str, passphrase: str | None = None,
              now: datetime | None = None) -> PublicIdentity:
    """Create this site's keys and signed public identity under ``home``."""
    site = site_name(name)
    target = identity_dir(home)
    if target.exists():
        raise IdentityError(f"{target}: a site identity already exists")
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".identity-", dir=home))
    try:
        public = _write_keys(work, site, passphrase, now, previous=None)
        os.rename(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return public


def rotate_site(home: Path, passphrase: str | None = None,
                now: datetime | None = None) -> PublicIdentity:
    """New keys for this site, published with a signature by the current key.

    The new private keys keep the protection the site chose: encrypted with the same
    passphrase when the current keys are, never written in clear then. Atomic: the new
    folder is built beside the current one, swapped in, and the ``trust_rotated`` record
    appended; if anything fails (the record included), the swap is undone, so the old
    identity stays whole and no record names a key that is not in place.
    """
    from transfer.acts import recorder

    current = load_site(home, passphrase)
    target = identity_dir(home)
    journal = home / ROTATION_JOURNAL
    try:
        with recorder(home, current) as rec:  # an unusable ledger stops it here
            work = Path(tempfile.mkdtemp(prefix=".identity-", dir=home))
            stale = home / f".identity-old-{os.getpid()}"
            swapped = False
            try:
                public = _write_keys(work, current.site, current.passphrase, now,
                                     previous=current)
                _retire(target, work, current)
                with _rotation_lock(home):  # a kill in here is settled by the next command
                    _write_journal(journal, {"new": work.name, "old": stale.name})
                    os.rename(target, stale)
                    os.rename(work, target)
                    swapped = True
                    record_rotation(rec, current, public)  # signed by the key retired
                    journal.unlink()
            except BaseException:
                if swapped:
                    os.rename(target, work)
                    os.rename(stale, target)
                shutil.rmtree(work, ignore_errors=True)
                journal.unlink(missing_ok=True)
                raise
            shutil.rmtree(stale, ignore_errors=True)
    except OSError as e:
        raise IdentityError(f"{target}: cannot rotate the site's keys: "
                            f"{e.strerror or e} (the current keys are unchanged)") from e
    return public


def _write_journal(path: Path, doc: dict[str, str]) -> None:
    """``doc`` at ``path``, durably (written beside it, synced, renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(canonical_json(doc))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _retire(target: Path, work: Path, current: SiteIdentity) -> None:
    """Copy the current keys (and earlier retired ones) under ``work/retired/``; copies,
    so that the current identity stays whole until the swap (copy2 keeps 0600)."""
    retired = work / "retired"
    if (target / "retired").is_dir():
        shutil.copytree(target / "retired", retired)
    else:
        retired.mkdir(mode=0o700)
    keep = retired / current.fingerprint.removeprefix("sha256:")
    keep.mkdir(mode=0o700)
    for name in (PUBLIC_FILE, SIGNING_KEY_FILE, AGE_PLAIN_FILE, AGE_SEALED_FILE):
        if (target / name).exists():
            shutil.copy2(target / name, keep / name)


def record_rotation(rec: Any, current: SiteIdentity, new: PublicIdentity) -> None:
    """Append the ``trust_rotated`` record of this site's own rotation."""
    from transfer.acts import subject
    from transfer.records import RecordKind

    rec.record(RecordKind.TRUST_ROTATED,
               subject("key", new.site, new.fingerprint)
               + subject("key", f"{new.site}/previous", current.fingerprint),
               {"peer": new.site, "fingerprint": new.fingerprint,
                "previous_fingerprint": current.fingerprint, "own_key": True})


# PKCS#8 private-key encryption: PBES2 with PBKDF2-HMAC-SHA256 at 600,000 iterations and
# AES-256-CBC, the OWASP Password Storage Cheat Sheet's recommendation for PBKDF2-HMAC-
# SHA256 (2023 revision). cryptography's BestAvailableEncryption uses 2,048 iterations
# and its encryption_builder() is not offered for PKCS#8, so the standard structure
# (RFC 8018 / RFC 5958) is assembled with asn1crypto from cryptography's primitives;
# cryptography and OpenSSL read it back.
PBKDF2_ITERATIONS = 600_000


def encrypt_private_key(key: ec.EllipticCurvePrivateKey, passphrase: str) -> bytes:
    """PEM ``ENCRYPTED PRIVATE KEY`` of ``key`` (PBES2, PBKDF2-HMAC-SHA256, AES-256-CBC)."""
    from asn1crypto import algos, core, keys  # type: ignore[import-untyped]
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

    salt, iv = os.urandom(16), os.urandom(16)
    kek = PBKDF2HMAC(hashes.SHA256(), 32, salt, PBKDF2_ITERATIONS).derive(passphrase.encode())
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(kek), modes.CBC(iv)).encryptor()
    sealed = encryptor.update(padder.update(der) + padder.finalize()) + encryptor.finalize()
    info = keys.EncryptedPrivateKeyInfo({
        "encryption_algorithm": {"algorithm": "pbes2", "parameters": {
            "key_derivation_func": {"algorithm": "pbkdf2", "parameters": {
                "salt": algos.Pbkdf2Salt(name="specified", value=core.OctetString(salt)),
                "iteration_count": PBKDF2_ITERATIONS, "prf": {"algorithm": "sha256"}}},
            "encryption_scheme": {"algorithm": "aes256_cbc",
                                  "parameters": core.OctetString(iv)}}},
        "encrypted_data": sealed})
    text = base64.b64encode(info.dump()).decode("ascii")
    lines = "\n".join(text[i:i + 64] for i in range(0, len(text), 64))
    return (f"-----BEGIN ENCRYPTED PRIVATE KEY-----\n{lines}\n"
            "-----END ENCRYPTED PRIVATE KEY-----\n").encode("ascii")


def _write_keys(work: Path, site: SiteName, passphrase: str | None, now: datetime | None,
                previous: SiteIdentity | None) -> PublicIdentity:
    key = ec.generate_private_key(ec.SECP256R1())
    _write_private(work / SIGNING_KEY_FILE, encrypt_private_key(key, passphrase) if passphrase
                   else key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    age_identity = pyrage.x25519.Identity.generate()
    secret = str(age_identity).encode()
    if passphrase:
        _write_private(work / AGE_SEALED_FILE, pyrage.passphrase.encrypt(secret, passphrase))
    else:
        _write_private(work / AGE_PLAIN_FILE, secret + b"\n")
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    created = (now or datetime.now(UTC)).replace(microsecond=0).isoformat()
    fp = fingerprint_of(key.public_key())
    recipient = AgeRecipient(str(age_identity.to_public()))
    body = {"format": FORMAT, "format_version": 1, "site": site, "signing_key": pem,
            "age_recipient": recipient, "fingerprint": fp, "created": created,
            "previous_fingerprint": previous.fingerprint if previous else None}
    data = canonical_json(body)
    public = PublicIdentity(
        site=site, signing_key_pem=pem, age_recipient=recipient, fingerprint=fp,
        created=created, self_signature=sign(key, data),
        previous_fingerprint=previous.fingerprint if previous else None,
        previous_signature=sign(previous.signing_key, data) if previous else None)
    (work / PUBLIC_FILE).write_text(json.dumps(public.to_json(), indent=1) + "\n")
    return public


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never readable by others, even for an instant)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def load_site(home: Path, passphrase: str | None = None,
              directory: Path | None = None) -> SiteIdentity:
    """This site's identity with its private keys (asks for a passphrase if needed)."""
    folder = directory or identity_dir(home)
    public = public_identity(home) if directory is None else \
        PublicIdentity.from_file(folder / PUBLIC_FILE)
    key_path = folder / SIGNING_KEY_FILE
    try:
        pem = key_path.read_bytes()
    except OSError as e:
        raise IdentityError(f"{key_path}: cannot read the signing key: {e.strerror}") from e
    encrypted = b"ENCRYPTED" in pem.split(b"\n", 1)[0]
    if encrypted and passphrase is None:
        passphrase = read_passphrase(f"passphrase for site {public.site}: ")
        if passphrase is None:
            raise IdentityError(f"the keys of site {public.site} are passphrase-protected: "
                                f"set {PASSPHRASE_ENV} or run from a terminal")
    try:
        key = serialization.load_pem_private_key(
            pem, passphrase.encode() if encrypted and passphrase else None)
    except (ValueError, TypeError) as e:
        raise IdentityError(f"site {public.site}: cannot unlock the signing key (wrong "
                            "passphrase?)") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or \
            fingerprint_of(key.public_key()) != public.fingerprint:
        raise IdentityError(f"{key_path}: does not match the site's public identity")
    return SiteIdentity(public=public, signing_key=key, signing_key_path=key_path,
                        passphrase=passphrase if encrypted else None,
                        age_identity=_load_age(folder, public, passphrase))


def _load_age(folder: Path, public: PublicIdentity, passphrase: str | None) -> Any:
    try:
        if (folder / AGE_SEALED_FILE).exists():
            if not passphrase:
                raise IdentityError(f"site {public.site}: the age identity is passphrase-"
                                    f"protected: set {PASSPHRASE_ENV}")
            secret = pyrage.passphrase.decrypt((folder / AGE_SEALED_FILE).read_bytes(),
                                               passphrase).decode()
        else:
            secret = (folder / AGE_PLAIN_FILE).read_text()
        identity = pyrage.x25519.Identity.from_str(secret.strip())
    except OSError as e:
        raise IdentityError(f"site {public.site}: cannot read the age identity: "
                            f"{e.strerror}") from e
    except (pyrage.DecryptError, pyrage.IdentityError, UnicodeDecodeError) as e:
        raise IdentityError(f"site {public.site}: cannot unlock the age identity (wrong "
                            "passphrase?)") from e
    if str(identity.to_public()) != public.age_recipient:
        raise IdentityError(f"site {public.site}: the age identity does not match the "
                            "public identity")
    return identity


def retired_identities(home: Path, passphrase: str | None = None) -> list[SiteIdentity]:
    """Previous identities kept after rotations (to decrypt bundles sent before)."""
    retired = identity_dir(home) / "retired"
    if not retired.is_dir():
        return []
    return [load_site(home, passphrase, child) for child in sorted(retired.iterdir())]
