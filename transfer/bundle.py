"""The bundle file: a signed outer header followed by an age-encrypted payload.

Layout of a bundle file (docs/decisions/0003-bundle-format.md)::

    MAGIC (b"PASSERELLE-BUNDLE/1\\n", 20 bytes)
    header length (4 bytes, big-endian)
    header: canonical JSON {"header": {...}, "signature": base64 ECDSA P-256/SHA-256}
    payload: the age file (X25519 recipients), exactly header.payload.size bytes, to EOF

The payload decrypts to a deterministic tar of::

    model/            model.onnx, vocabulary.json, labels.json, model_card.json,
                      [audit_report.json], transfer_statement.json
    model.sig         OpenSSF Model Signing bundle over model/ (private-key signer)

Receiving (``open_bundle``), in this order; nothing is decrypted before step 7 and
nothing is parsed as ONNX before step 10:

1. parse the envelope (magic, bounded header, canonical JSON, exact file size);
2. the sender's key is pinned in the trust store and not revoked;
3. the header's signature verifies with that key;
4. this site is one of the recipients;
5. not expired, not created in the future (clock skew allowed);
6. not a rollback: sequence and version above what was last received from that sender
   for that model;
7. payload digest equals the header's, then decrypt (streaming, digest checked again
   on the bytes decrypted) and
8. unpack as it streams, with the safety checks and limits of transfer.archive, into a
   private temporary area under the home (0700, under a lock; leftovers of a killed
   receive are removed by the next one); check the layout;
9. the model signature verifies with the sender's pinned key;
10. the signed statement equals the header's transfer (mix-and-match, re-encryption to
    a third site), the ONNX digest matches, then the ONNX safety checks.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import pyrage  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.asymmetric import ec

from passerelle.digests import canonical_json, sha256_file
from passerelle.errors import PasserelleError, Refused
from transfer import onnx_safety, strict_json
from transfer.archive import Limits, PackedStream, Unpacker
from transfer.errors import (
    DecryptionFailed,
    DigestMismatch,
    Expired,
    MalformedBundle,
    NotAddressedToUs,
    Rollback,
    SignatureInvalid,
    StatementMismatch,
    UnsafeArchive,
    ValidityTooLong,
)
from transfer.identity import PublicIdentity, SiteIdentity, sign, verify
from transfer.statement import STATEMENT_FILE, Header, Transfer, TransferStatement
from transfer.trust import TrustStore

MAGIC = b"PASSERELLE-BUNDLE/1\n"
MAX_HEADER = 64 * 1024
HEADER_DEPTH = 8  # the header is {header: {transfer: {recipients: [{...}]}}, signature}
MAX_SIGNATURE_FILE = 256 * 1024  # model.sig (a Sigstore bundle of a few KB)
MODEL_DIR = "model"
SIGNATURE_FILE = "model.sig"
ONNX_FILE = "model.onnx"
RECEIVING_DIR = ".receiving"
SENDING_DIR = ".sending"
SENDING_LOCK = ".sending.lock"
RECEIVED_STATE = "received.json"
SENT_STATE = "sent.json"
STATE_DIR = "transfer"
PENDING_DIR = "pending-bundles"  # under HOME/transfer/: creates past their ledger record
CLOCK_SKEW = timedelta(minutes=5)
DEFAULT_VALIDITY = timedelta(days=7)
# Test hook for the kill test: seconds to sleep right after decryption.
SLEEP_AFTER_DECRYPT_ENV = "PASSERELLE_TEST_SLEEP_AFTER_DECRYPT"
# What may be shipped from an exported folder (anything else there stays home).
SHIPPABLE = ("model.onnx", "vocabulary.json", "labels.json", "model_card.json",
             "audit_report.json")
_CHUNK = 4 << 20  # large buffers: hashing and age streaming run at memory speed


# --------------------------------------------------------------------------- envelope

@dataclass(frozen=True)
class Envelope:
    """A parsed bundle file; nothing in it is trusted yet."""

    path: Path
    header: Header
    header_doc: dict[str, Any]
    signature: str
    payload_offset: int


def read_envelope(path: Path) -> Envelope:
    """Step 1: parse the envelope of ``path``; refuse anything malformed or truncated."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            magic = f.read(len(MAGIC))
            raw_len = f.read(4)
            if magic != MAGIC or len(raw_len) != 4:
                raise MalformedBundle(f"{path.name}: not a Passerelle bundle (bad magic)")
            (length,) = struct.unpack(">I", raw_len)
            if not 0 < length <= MAX_HEADER:
                raise MalformedBundle(f"{path.name}: header length {length} out of range")
            raw = f.read(length)
    except OSError as e:
        raise MalformedBundle(f"{path}: cannot read: {e.strerror}") from e
    if len(raw) != length:
        raise MalformedBundle(f"{path.name}: truncated in the header")
    doc = strict_json.loads(raw, f"{path.name}: the header", MalformedBundle, MAX_HEADER,
                            HEADER_DEPTH)
    if not isinstance(doc, dict) or set(doc) != {"header", "signature"} or \
            not isinstance(doc["signature"], str) or canonical_json(doc) != raw:
        raise MalformedBundle(f"{path.name}: the header is not canonical {{header, signature}}")
    header = Header.from_json(doc["header"])
    offset = len(MAGIC) + 4 + length
    if size != offset + header.payload_size:
        what = "truncated" if size < offset + header.payload_size else "has trailing bytes"
        raise MalformedBundle(f"{path.name}: {what} (payload is {size - offset} bytes, the "
                              f"header says {header.payload_size})")
    return Envelope(path, header, doc["header"], doc["signature"], offset)


def write_bundle(out: Path, header: Header, key: ec.EllipticCurvePrivateKey,
                 payload: Path) -> str:
    """Write header + payload to ``out`` atomically; returns the bundle's digest."""
    doc = {"header": header.to_json(), "signature": sign(key, canonical_json(header.to_json()))}
    raw = canonical_json(doc)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.resolve().parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f, payload.open("rb") as src:
            for part in (MAGIC, struct.pack(">I", len(raw)), raw):
                f.write(part)
                digest.update(part)
            while chunk := src.read(_CHUNK):
                f.write(chunk)
                digest.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # the bundle is encrypted, meant to be shared
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return "sha256:" + digest.hexdigest()


# --------------------------------------------------------------------------- sealing

class _HashingWriter:
    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def sign_model_dir(identity: SiteIdentity, model_dir: Path, signature: Path) -> None:
    """OpenSSF Model Signing over ``model_dir`` with the site's ECDSA key."""
    from model_signing import signing

    # model-signing 1.1.1 annotates the password as str but hands it to cryptography,
    # which wants bytes.
    password = identity.passphrase.encode() if identity.passphrase else None
    config = signing.Config()  # type: ignore[no-untyped-call]
    config.set_hashing_config(_hashing_config())
    config.use_elliptic_key_signer(
        private_key=identity.signing_key_path, password=password,  # type: ignore[arg-type]
    ).sign(model_dir, signature)


def _hashing_config(known: dict[str, str] | None = None) -> Any:
    """model-signing's hashing configuration: every file of the model folder is covered
    (it ignores .git/, .github/, .gitattributes and .gitignore by default,
    ``ignore_git_paths=True``; not here).

    ``known`` ({path: "sha256:<hex>"}) gives the digests of files hashed as they were
    written (by :class:`transfer.archive.Unpacker`, in the private receiving area):
    model-signing's own serializer still lists the folder (refusing links), builds the
    manifest and compares it with the signed one, but takes those digests instead of
    reading the files once more; a file not in ``known`` it hashes itself.
    """
    from model_signing import hashing

    config = _known_digests_config(known) if known else \
        hashing.Config()  # type: ignore[no-untyped-call]
    return config.set_ignored_paths(paths=[], ignore_git_paths=False)


def _known_digests_config(known: dict[str, str]) -> Any:
    """A ``model_signing.hashing.Config`` whose file hasher returns ``known`` digests
    (model-signing 1.1.1: its file serializer builds one hasher per file through
    ``Config._build_file_hasher_factory``, pinned in constraints.txt; a test checks that
    the manifest is the one model-signing computes itself)."""
    from model_signing import hashing
    from model_signing._hashing import hashing as engines
    from model_signing._hashing import io as file_io

    table = {os.path.normpath(p): d.removeprefix("sha256:") for p, d in known.items()}

    class KnownHasher(file_io.FileHasher):
        def __init__(self, path: Path, fallback: Any) -> None:
            self._path, self._fallback = path, fallback

        @property
        def digest_name(self) -> str:
            return str(self._fallback.digest_name)

        @property
        def digest_size(self) -> int:
            return int(self._fallback.digest_size)

        def compute(self) -> Any:
            digest = table.get(os.path.normpath(self._path))
            if digest is None or self.digest_name != "sha256":
                return self._fallback.compute()
            return engines.Digest(self.digest_name, bytes.fromhex(digest))

    class KnownDigests(hashing.Config):
        def _build_file_hasher_factory(self, *args: Any, **kwargs: Any) -> Any:
            real = super()._build_file_hasher_factory(*args, **kwargs)
            return lambda path: KnownHasher(path, real(path))

    return KnownDigests()  # type: ignore[no-untyped-call]


def stage(identity: SiteIdentity, ship: Path, statement: TransferStatement,
          work: Path) -> Path:
    """``work/stage`` holding model/ (shipped files + statement) and model.sig."""
    root = work / "stage"
    model = root / MODEL_DIR
    model.mkdir(parents=True, mode=0o700)
    for name in SHIPPABLE:
        if (ship / name).is_file():
            _link_or_copy(ship / name, model / name)
    (model / STATEMENT_FILE).write_bytes(canonical_json(statement.to_json()))
    sign_model_dir(identity, model, root / SIGNATURE_FILE)
    return root


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when possible (no copy of a large model); signing reads the result."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def encrypt(plain: Path, recipients: Sequence[str], out: Path) -> tuple[str, int]:
    """age-encrypt ``plain`` to X25519 ``recipients`` (streaming); (digest, size)."""
    try:
        keys = [pyrage.x25519.Recipient.from_str(r) for r in recipients]
    except pyrage.RecipientError as e:
        raise MalformedBundle("a recipient's age key is unusable") from e
    with plain.open("rb") as src, out.open("wb") as dst:
        writer = _HashingWriter(dst)
        pyrage.encrypt_io(src, writer, keys)
    return "sha256:" + writer.hash.hexdigest(), writer.size


LedgerHook = Callable[[str, int], str | None]
"""Called with the payload's digest and size once it is encrypted, before the header is
signed and the bundle written; returns the id of the ``bundle_created`` ledger record to
carry in the header (or None: no ledger). If it raises, no bundle is written."""


_AGE_CHUNK = 64 * 1024  # age's STREAM chunk (plaintext); each sealed chunk adds a 16-byte tag
_MAX_AGE_HEADER = 64 * 1024
_SIGNATURE_CHARS = 96  # base64 of a 70- or 71-byte DER low-s P-256 signature
_PLACEHOLDER_ID = "sha256:" + "0" * 64


def _age_body_size(plain: int) -> int:
    """Bytes after age's header: a 16-byte nonce, then each 64 KiB chunk plus its tag
    (at least one chunk, the last one may be short)."""
    chunks = max(1, -(-plain // _AGE_CHUNK))
    return 16 + plain + 16 * chunks


_BLOCK = 1 << 20  # a piece of ciphertext or plaintext handed to the worker thread
_QUEUED = 2  # pieces queued at most: memory stays a few MiB whatever the size
_SWITCH_INTERVAL = 0.0002  # s; see _Worker


class _Worker:
    """One thread that runs, in order, the GIL-releasing work of a decryption: hashing
    the ciphertext, hashing and writing the plaintext (``submit(fn, piece)``).

    pyrage holds the GIL while it decrypts and calls back into Python every 8 KiB; the
    worker needs the GIL only between two pieces. CPython makes a waiting thread wait
    a whole switch interval (5 ms) before it asks for the GIL, which would leave the
    worker idle for most of each piece: the interval is lowered while it runs (and
    restored). The first error stops the work (later pieces are dropped) and is raised
    by :meth:`submit` and :meth:`finish`; :meth:`finish` joins the thread (call it on
    every path).
    """

    def __init__(self) -> None:
        import queue

        self._jobs: queue.Queue[tuple[Callable[[Any], Any], Any] | None] = \
            queue.Queue(_QUEUED)
        self.failure: BaseException | None = None
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._interval, _SWITCH_INTERVAL))
        self._thread = threading.Thread(target=self._run, name="passerelle-unpack",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self.failure is None:
                try:
                    job[0](job[1])
                except BaseException as e:  # raised in the caller's thread
                    self.failure = e

    def submit(self, fn: Callable[[Any], Any], piece: Any) -> None:
        if self.failure is not None:
            raise _Stopped from self.failure
        self._jobs.put((fn, piece))

    def finish(self) -> None:
        """Wait for the queued work; the thread is gone when this returns."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        sys.setswitchinterval(self._interval)


class _Stopped(Exception):
    """Raised into pyrage's callbacks once the worker failed: decryption stops."""


class _PayloadWriter:
    """Where pyrage writes the payload: straight into the bundle file, after room left
    for the outer header, hashed on the way.

    age's header (recipient stanzas, randomised by grease stanzas) is held until its MAC
    line ends it; then the payload's size is known exactly (the body's size follows
    from the plaintext's), so is the outer header's length (every other field of it has
    a fixed width), and the rest streams to its final place: no second copy. The body
    is gathered into 1 MiB pieces that a :class:`_Worker` hashes and writes while pyrage
    encrypts the next ones (call :meth:`close`, then ``worker.finish()``).
    """

    def __init__(self, f: BinaryIO, plain_size: int, header_length: Callable[[int], int],
                 worker: _Worker):
        self._f = f
        self._plain = plain_size
        self._length_of = header_length
        self._worker = worker
        self._head = bytearray()
        self._piece = bytearray()
        self.hash = hashlib.sha256()
        self.size = 0
        self.expected: int | None = None
        self.header_length = 0

    def write(self, data: bytes) -> int:
        if self.expected is None:
            self._head += data
            end = self._head.find(b"\n--- ")
            if end < 0 or self._head.find(b"\n", end + 1) < 0:
                if len(self._head) > _MAX_AGE_HEADER:
                    raise MalformedBundle("age produced an unexpectedly large header")
                return len(data)
            age_header = self._head.find(b"\n", end + 1) + 1
            self.expected = age_header + _age_body_size(self._plain)
            self.header_length = self._length_of(self.expected)
            self._f.seek(len(MAGIC) + 4 + self.header_length)
            self._piece, self._head = self._head, bytearray()
            self.size = len(self._piece)
            return len(data)
        self._piece += data
        self.size += len(data)
        if len(self._piece) >= _BLOCK:
            self._worker.submit(self._emit, self._piece)
            self._piece = bytearray()
        return len(data)

    def _emit(self, piece: bytearray) -> None:
        self.hash.update(piece)
        view = memoryview(piece)
        while view:
            view = view[self._f.write(view) or 0:]

    def flush(self) -> None:
        pass  # pieces are written whole, on the worker; the last one by close()

    def close(self) -> None:
        if self._piece:
            self._worker.submit(self._emit, self._piece)
            self._piece = bytearray()


def _signed_header(header: Header, key: ec.EllipticCurvePrivateKey) -> bytes:
    """The canonical {header, signature} with a signature of the usual width (ECDSA
    signatures vary in length; one in 128 is shorter and is made again)."""
    body = canonical_json(header.to_json())
    for _ in range(64):
        signature = sign(key, body)
        if len(signature) == _SIGNATURE_CHARS:
            return canonical_json({"header": header.to_json(), "signature": signature})
    raise MalformedBundle("could not make a signature of the usual width")


def seal(identity: SiteIdentity, staged: Path, transfer: Transfer,
         recipients: Sequence[PublicIdentity], out: Path, work: Path,
         ledger_hook: LedgerHook | None = None, journal: Path | None = None,
         overwrite: bool = False) -> str:
    """Pack ``staged``, encrypt it to ``recipients``, write the signed bundle ``out``.

    One pass: the deterministic tar is produced as age reads it and the ciphertext goes
    straight into a temporary file beside ``out`` (only ciphertext is ever written
    there), hashed on the way. Only once the payload is fully written is ``ledger_hook``
    called (a bundle that cannot be written leaves no ``bundle_created`` record); then
    the signed header is written in front and the file moved to ``out`` atomically.
    ``work`` is unused (kept for callers); nothing plaintext is written outside
    ``staged``.

    With ``journal`` (a path in the home, see :func:`finish_interrupted`), what is needed
    to finish the bundle (where its ciphertext is, the transfer) is written there before
    the ledger hook runs; once the record exists, a failure or a kill no longer removes
    the ciphertext: the next create finishes the header and the rename (roll forward).
    """
    del work
    try:
        keys = [pyrage.x25519.Recipient.from_str(r.age_recipient) for r in recipients]
    except pyrage.RecipientError as e:
        raise MalformedBundle("a recipient's age key is unusable") from e
    stream = PackedStream(staged)

    def length_of(payload_size: int) -> int:
        placeholder = Header(transfer, _PLACEHOLDER_ID, payload_size,
                             _PLACEHOLDER_ID if ledger_hook is not None else None)
        return len(canonical_json({"header": placeholder.to_json(),
                                   "signature": "A" * _SIGNATURE_CHARS}))

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", suffix=".partial",
                               dir=out.absolute().parent)  # beside --out itself
    recorded = False
    try:
        with os.fdopen(fd, "wb", buffering=0) as raw:
            worker = _Worker()
            try:
                writer = _PayloadWriter(raw, stream.size, length_of, worker)
                try:
                    pyrage.encrypt_io(stream, writer, keys)
                    writer.close()
                except (_Stopped, OSError):
                    if worker.failure is None:
                        raise
            finally:
                worker.finish()
            if worker.failure is not None:
                raise worker.failure
            if writer.expected is None or writer.size != writer.expected:
                raise MalformedBundle(f"age wrote {writer.size} bytes, "
                                      f"{writer.expected} were expected")
            raw.flush()
            os.fsync(raw.fileno())
            digest = "sha256:" + writer.hash.hexdigest()
            if journal is not None:
                _write_json(journal, {
                    "partial": str(Path(tmp).resolve()), "out": str(out.absolute()),
                    "transfer": transfer.to_json(), "payload": digest,
                    "payload_size": writer.size, "header_length": writer.header_length,
                    "overwrite": overwrite})
            record = ledger_hook(digest, writer.size) if ledger_hook is not None else None
            recorded = record is not None
            _finish(Path(tmp), out, identity, Header(transfer, digest, writer.size, record),
                    writer.header_length, raw, overwrite)
    except BaseException:
        if not recorded:  # no record names it: nothing to finish
            Path(tmp).unlink(missing_ok=True)
            if journal is not None:
                journal.unlink(missing_ok=True)
        raise
    if journal is not None:
        journal.unlink(missing_ok=True)
    return sha256_file(out)  # the bundle file's digest, as a receiver sees it


def _finish(tmp: Path, out: Path, identity: SiteIdentity, header: Header,
            header_length: int, raw: BinaryIO, overwrite: bool) -> None:
    """Write the signed header in front of the payload already in ``tmp`` and move the
    file to ``out`` (over an existing file only with ``overwrite``)."""
    doc = _signed_header(header, identity.signing_key)
    if len(doc) != header_length:
        raise MalformedBundle("the signed header does not fit the room left for it")
    raw.seek(0)
    raw.write(MAGIC + struct.pack(">I", len(doc)) + doc)
    raw.flush()
    os.fsync(raw.fileno())
    os.chmod(tmp, 0o644)  # the bundle is encrypted, meant to be shared
    if not overwrite and (out.exists() or out.is_symlink()):
        raise MalformedBundle(f"{out}: appeared while the bundle was written")
    os.replace(tmp, out)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(canonical_json(doc))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pending_journal(home: Path, work: Path) -> Path:
    """Where the create working in ``work`` (a folder of :func:`sending_area`) notes a
    bundle between its ``bundle_created`` record and its final rename."""
    return home / STATE_DIR / PENDING_DIR / f"{work.name}.json"


def finish_interrupted(home: Path, identity: SiteIdentity,
                       created: Callable[[str], str | None]) -> list[Path]:
    """Settle the bundles of creates killed after their ``bundle_created`` record.

    For each journal left by a create that is no longer running: when no record names
    its payload (``created(payload_digest)`` is the record's id or None), the ciphertext
    is removed (its sequence number stays burnt); when the bundle is already at its
    final name, the journal is dropped; else the header is signed again over the
    recorded payload (checked byte for byte against the record's digest) and the file
    moved to its final name. Returns the bundles finished. A recorded bundle that cannot
    be finished (its ciphertext gone or changed, its name taken) is refused with what
    to do, and its journal kept.
    """
    folder = home / STATE_DIR / PENDING_DIR
    if not folder.is_dir():
        return []
    finished = []
    with _locked(home / SENDING_LOCK):
        for journal in sorted(folder.glob("tx-*.json")):
            if _live(home / SENDING_DIR / journal.stem):
                continue
            doc = json.loads(journal.read_bytes())
            partial, out = Path(doc["partial"]), Path(doc["out"])
            record = created(doc["payload"])
            if record is None or _bundle_with_payload(out, doc["payload"]):
                partial.unlink(missing_ok=True)
            else:
                _roll_forward(partial, out, identity, doc, record, journal)
                finished.append(out)
            journal.unlink()
    return finished


def _live(work: Path) -> bool:
    try:
        with (work / ".lock").open("a") as other:
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _bundle_with_payload(path: Path, payload: str) -> bool:
    try:
        return read_envelope(path).header.payload_digest == payload
    except (OSError, PasserelleError):
        return False


def _roll_forward(partial: Path, out: Path, identity: SiteIdentity, doc: dict[str, Any],
                  record: str, journal: Path) -> None:
    length, size = int(doc["header_length"]), int(doc["payload_size"])
    offset = len(MAGIC) + 4 + length
    ok = partial.is_file() and partial.stat().st_size == offset + size
    if ok:
        h = hashlib.sha256()
        with partial.open("rb") as f:
            f.seek(offset)
            while chunk := f.read(1 << 20):
                h.update(chunk)
        ok = "sha256:" + h.hexdigest() == doc["payload"]
    taken = not doc.get("overwrite") and (out.exists() or out.is_symlink())
    if not ok or taken:
        what = "its name is taken" if ok else f"its ciphertext {partial} is gone or changed"
        raise Refused(
            f"the bundle recorded as {record} ({out}) was interrupted and cannot be "
            f"finished: {what}; the record stands for a bundle never written; remove "
            f"{journal} to go on")
    header = Header(Transfer.from_json(doc["transfer"]), doc["payload"], size, record)
    with partial.open("r+b", buffering=0) as raw:
        _finish(partial, out, identity, header, length, raw, bool(doc.get("overwrite")))


def make_transfer(identity: SiteIdentity, recipients: Sequence[PublicIdentity], model: str,
                  version: str, sequence: int, now: datetime | None = None,
                  validity: timedelta = DEFAULT_VALIDITY) -> Transfer:
    from transfer.statement import Party

    created = (now or datetime.now(UTC)).replace(microsecond=0)
    return Transfer(
        sender=Party(identity.site, identity.fingerprint),
        recipients=tuple(Party(r.site, r.fingerprint) for r in recipients),
        model=model, version=version, sequence=sequence, created=created.isoformat(),
        expires=(created + validity).isoformat())


def bundle_directory(identity: SiteIdentity, ship: Path, statement: TransferStatement,
                     recipients: Sequence[PublicIdentity], out: Path,
                     ledger_hook: LedgerHook | None = None,
                     staging: Path | None = None, journal: Path | None = None,
                     overwrite: bool = False) -> str:
    """Stage, sign, pack, encrypt and write a bundle of the shippable folder ``ship``.

    The plaintext staging folder is made under ``staging`` (the site's private area, see
    :func:`sending_area`); nothing but ciphertext is written beside ``out``.
    """
    if not (ship / ONNX_FILE).is_file():
        raise MalformedBundle(f"{ship}: no {ONNX_FILE} to ship")
    parent = staging if staging is not None else ship.resolve().parent
    with private_workspace(parent, ".passerelle-bundle-") as work:
        staged = stage(identity, ship, statement, work)
        return seal(identity, staged, statement.transfer, recipients, out, work, ledger_hook,
                    journal, overwrite)


def next_sequence(home: Path, model: str) -> int:
    """The next sequence number for ``model`` sent by this site (not yet recorded)."""
    return int(_read_state(home, SENT_STATE).get(model, 0)) + 1


def reserve_sequence(home: Path, model: str) -> int:
    """Take the next sequence number for ``model`` and record it at once, under the
    home's sending lock: two concurrent ``bundle create`` never get the same number, and
    a create that fails or is killed later burns its number (a gap, never a reuse)."""
    with _locked(home / SENDING_LOCK):
        sequence = next_sequence(home, model)
        record_sent(home, model, sequence)
    return sequence


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


@contextmanager
def sending_area(home: Path) -> Iterator[Path]:
    """A private (0700) folder under the home's ``.sending/`` for one ``bundle create``'s
    plaintext (exported ONNX, staged model, signature); removed on every path out, and
    leftovers of a killed create (no live lock on them) are removed by the next one."""
    area = home / SENDING_DIR
    area.mkdir(mode=0o700, exist_ok=True)
    os.chmod(area, 0o700)
    with _locked(home / SENDING_LOCK):  # no cleaner sees a folder before it is locked
        work = Path(tempfile.mkdtemp(prefix="tx-", dir=area))
        lock = (work / ".lock").open("a")
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        _clean_stale_sending(area, work)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        lock.close()


def _clean_stale_sending(area: Path, mine: Path) -> None:
    for child in area.iterdir():
        if child == mine:
            continue
        try:
            with (child / ".lock").open("a") as other:
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live create
        except OSError:
            pass
        shutil.rmtree(child, ignore_errors=True)


def record_sent(home: Path, model: str, sequence: int) -> None:
    state = _read_state(home, SENT_STATE)
    state[model] = max(sequence, int(state.get(model, 0)))
    _write_state(home, SENT_STATE, state)


# --------------------------------------------------------------------------- state

def _read_state(home: Path, name: str) -> dict[str, Any]:
    path = home / STATE_DIR / name
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PasserelleError(f"{path}: transfer state is unreadable") from e
    if not isinstance(doc, dict):
        raise PasserelleError(f"{path}: transfer state is malformed")
    return doc


def _write_state(home: Path, name: str, doc: dict[str, Any]) -> None:
    folder = home / STATE_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stream_key(transfer: Transfer) -> str:
    return f"{transfer.sender.site}/{transfer.model}"


def last_received(home: Path, transfer: Transfer) -> tuple[int, int] | None:
    entry = _read_state(home, RECEIVED_STATE).get(_stream_key(transfer))
    if entry is None:
        return None
    return int(entry["sequence"]), int(entry["version"])


def record_received(home: Path, transfer: Transfer) -> None:
    state = _read_state(home, RECEIVED_STATE)
    state[_stream_key(transfer)] = {"sequence": transfer.sequence,
                                    "version": int(transfer.version)}
    _write_state(home, RECEIVED_STATE, state)


# --------------------------------------------------------------------------- workspace

@contextmanager
def private_workspace(parent: Path, prefix: str) -> Iterator[Path]:
    """A 0700 temporary folder, removed on every path out."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def receiving_area(home: Path) -> Iterator[Path]:
    """The private place where payloads are decrypted, one receive at a time.

    Takes an exclusive lock; whatever is left in ``.receiving`` then can only come from a
    process that died mid-receive (killed), so it is removed first.
    """
    area = home / RECEIVING_DIR
    area.mkdir(mode=0o700, exist_ok=True)
    os.chmod(area, 0o700)
    with (home / ".receiving.lock").open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            clean_stale(home)
            with private_workspace(area, "rx-") as work:
                yield work
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def clean_stale(home: Path) -> list[str]:
    """Remove leftovers of killed receives (call with the receiving lock held)."""
    area = home / RECEIVING_DIR
    removed = []
    if area.is_dir():
        for child in area.iterdir():
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed


# --------------------------------------------------------------------------- verifying

@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed every check; ``root`` is in the private receiving area."""

    header: Header
    statement: TransferStatement
    sender: PublicIdentity
    bundle_digest: str
    root: Path  # holds model/ and model.sig

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_DIR


def check_envelope(path: Path, trust: TrustStore, me: PublicIdentity | None,
                   home: Path | None, now: datetime) -> tuple[Envelope, PublicIdentity]:
    """Steps 1-6: everything that can be checked without decrypting.

    ``me`` None skips the recipient check, ``home`` None the rollback check (a site
    without an identity can still check who signed a bundle).
    """
    env = read_envelope(path)                                           # (1)
    t = env.header.transfer
    sender = trust.sender(t.sender.fingerprint, t.sender.site)          # (2)
    verify(sender.public_key, canonical_json(env.header_doc), env.signature,
           f"{path.name}: outer header", canonical=True)                # (3)
    if me is not None and not t.names(me.fingerprint):                  # (4)
        older = [r.fingerprint for r in t.recipients if r.site == me.site]
        if older:  # sealed for a key of ours that a rotation replaced (or another site's)
            raise NotAddressedToUs(
                f"{path.name} is sealed for {me.site}'s key {older[0]}, not for this site's "
                f"current key {me.fingerprint} (a key replaced by `site rotate`?); the "
                f"sender seals it again for the current key")
        names = ", ".join(r.site for r in t.recipients)
        raise NotAddressedToUs(f"{path.name} is addressed to {names}, not to this site "
                               f"({me.site})")
    _check_time(t, now, max_validity(home))                             # (5)
    if home is not None:
        _check_rollback(t, last_received(home, t))                      # (6)
    return env, sender


def max_validity(home: Path | None) -> timedelta:
    """The longest validity this site creates or accepts (``transfer.max_validity_days``
    of its site policy; the policy's default for a folder that is no site)."""
    from transfer.site_policy import KEYS, load_policy

    name = "transfer.max_validity_days"
    days = load_policy(home).values[name] if home is not None else KEYS[name].default
    assert isinstance(days, int)  # noqa: S101 - the policy's check makes it one
    return timedelta(days=days)


def _check_time(t: Transfer, now: datetime, longest: timedelta) -> None:
    if t.expires_at - t.created_at > longest:
        raise ValidityTooLong(f"bundle of {t.model}/{t.version} is valid from {t.created} "
                              f"to {t.expires}, longer than this site accepts "
                              f"({longest.days} days, transfer.max_validity_days)")
    if now > t.expires_at:
        raise Expired(f"bundle of {t.model}/{t.version} expired at {t.expires}")
    if t.created_at > now + CLOCK_SKEW:
        raise Expired(f"bundle of {t.model}/{t.version} is dated in the future ({t.created})")


def _check_rollback(t: Transfer, received: tuple[int, int] | None) -> None:
    if received is None:
        return
    sequence, version = received
    if t.sequence <= sequence or int(t.version) < version:
        raise Rollback(f"{t.model} from {t.sender.site}: sequence {t.sequence} version "
                       f"{t.version} is not newer than the last received (sequence {sequence}, "
                       f"version {version})")


class _CipherReader:
    """What pyrage reads the payload from: ``size`` bytes of ``f``, read in 1 MiB
    pieces, each hashed on the worker (the payload's digest, checked again on the bytes
    actually decrypted) and served in the small reads pyrage makes."""

    def __init__(self, f: BinaryIO, size: int, worker: _Worker) -> None:
        self._f = f
        self._left = size
        self._worker = worker
        self._piece = b""
        self._at = 0
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        if self._at >= len(self._piece):
            if self._left <= 0:
                return b""
            self._piece = self._f.read(min(_BLOCK, self._left))
            self._at = 0
            if not self._piece:
                return b""  # shorter than the header says: the digest check refuses it
            self._left -= len(self._piece)
            self._worker.submit(self.hash.update, self._piece)
        if n is None or n < 0:
            n = len(self._piece)
        start, self._at = self._at, min(self._at + n, len(self._piece))
        return self._piece[start:self._at]


class _PlainWriter:
    """Where pyrage writes the plaintext: gathered into 1 MiB pieces fed to ``sink`` on
    the worker (no pipe, no copy beyond the gathering)."""

    def __init__(self, sink: Callable[[bytearray], None], worker: _Worker) -> None:
        self._sink = sink
        self._worker = worker
        self._piece = bytearray()

    def write(self, data: bytes) -> int:
        self._piece += data
        if len(self._piece) >= _BLOCK:
            self._worker.submit(self._sink, self._piece)
            self._piece = bytearray()
        return len(data)

    def flush(self) -> None:
        pass  # pieces are handed over whole; the last one by close()

    def close(self) -> None:
        if self._piece:
            self._worker.submit(self._sink, self._piece)
            self._piece = bytearray()


def _hash_payload(env: Envelope) -> str:
    """Steps (7a): digest of the payload and of the whole bundle, in one read; the two
    hashes run on two cores (hashlib releases the GIL on large buffers)."""
    from concurrent.futures import ThreadPoolExecutor

    whole = hashlib.sha256()
    part = hashlib.sha256()
    with env.path.open("rb") as f, ThreadPoolExecutor(1) as pool:
        whole.update(f.read(env.payload_offset))
        while chunk := f.read(_CHUNK):
            pending = pool.submit(part.update, chunk)
            whole.update(chunk)
            pending.result()
    if "sha256:" + part.hexdigest() != env.header.payload_digest:
        raise DigestMismatch(f"{env.path.name}: the payload's digest differs from the signed "
                             "header")
    return "sha256:" + whole.hexdigest()


def _decrypt_and_unpack(env: Envelope, identities: Sequence[Any], dest: Path,
                        limits: Limits) -> dict[str, str]:
    """(7b, 8) Decrypt the payload and unpack it as it is decrypted; no tar is written.

    One read of the payload: pyrage decrypts in this thread, from :class:`_CipherReader`
    into :class:`_PlainWriter`; a worker thread hashes each piece of ciphertext (the
    payload digest is checked again on the bytes actually decrypted: the file could
    have changed since step 7a) and feeds the plaintext to a
    :class:`transfer.archive.Unpacker` (the checks of the strict reader; every file
    hashed as it is written: the digests are returned). The two run on two cores. If
    unpacking refuses, decryption stops at its next write. The worker is joined on
    every path out, so nothing writes into ``dest`` once this returns or raises.
    """
    unpacker = Unpacker(dest, limits)
    worker = _Worker()
    decrypt_error: BaseException | None = None
    try:
        with env.path.open("rb") as f:
            f.seek(env.payload_offset)
            reader = _CipherReader(f, env.header.payload_size, worker)
            writer = _PlainWriter(unpacker.feed, worker)
            try:
                pyrage.decrypt_io(reader, writer, list(identities))
                writer.close()
            except _Stopped:
                pass  # the worker's error is raised below
            except (pyrage.DecryptError, OSError) as e:
                # pyrage raises OSError('decryption error') for a corrupted chunk, and
                # an OSError for an exception raised in our callbacks (_Stopped)
                decrypt_error = e
    except OSError as e:
        decrypt_error = e
    finally:
        worker.finish()
        unpacker.abort()
    if worker.failure is not None:
        raise worker.failure
    if decrypt_error is not None:
        raise DecryptionFailed(f"{env.path.name}: cannot decrypt the payload with this "
                               "site's identity (or it is corrupted)") from decrypt_error
    digests = unpacker.close()
    if "sha256:" + reader.hash.hexdigest() != env.header.payload_digest:
        raise DigestMismatch(f"{env.path.name}: the payload changed while it was read")
    return digests


def verify_model_signature(model_dir: Path, signature: Path, key_pem: str, work: Path,
                           known: dict[str, str] | None = None) -> None:
    """(9) OpenSSF Model Signing verification with the sender's pinned key, over every
    file of ``model_dir`` (no ignored paths: a file the signature does not cover fails).
    ``known``: digests of files hashed as they were unpacked (see :func:`_hashing_config`)."""
    from model_signing import verifying

    try:
        size = signature.stat().st_size
        if size > MAX_SIGNATURE_FILE:
            raise SignatureInvalid(f"{SIGNATURE_FILE} is larger than {MAX_SIGNATURE_FILE} "
                                   "bytes")
        strict_json.loads(signature.read_bytes(), SIGNATURE_FILE, SignatureInvalid,
                          MAX_SIGNATURE_FILE)
    except OSError as e:
        raise SignatureInvalid(f"{SIGNATURE_FILE}: unreadable") from e
    pub = work / "sender.pub"
    pub.write_text(key_pem)
    try:
        config = verifying.Config()  # type: ignore[no-untyped-call]
        config.set_hashing_config(_hashing_config(known))
        config.use_elliptic_key_verifier(public_key=pub).verify(model_dir, signature)
    except Exception as e:
        raise SignatureInvalid(f"the model signature does not verify with the sender's key: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                               ) from e
    finally:
        pub.unlink(missing_ok=True)


def check_layout(root: Path, digests: dict[str, str]) -> None:
    """(8) Exactly model/ (known file names only, model.onnx and the statement among them,
    no sub-folder) and model.sig: nothing else is installed or logged."""
    allowed = {f"{MODEL_DIR}/{n}" for n in (*SHIPPABLE, STATEMENT_FILE)} | {SIGNATURE_FILE}
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    extra = sorted(set(names) - allowed - {MODEL_DIR})
    if extra or set(digests) != set(names) - {MODEL_DIR} or \
            f"{MODEL_DIR}/{ONNX_FILE}" not in digests or \
            f"{MODEL_DIR}/{STATEMENT_FILE}" not in digests or SIGNATURE_FILE not in digests:
        raise UnsafeArchive(f"payload must hold exactly {MODEL_DIR}/ (with {ONNX_FILE}, "
                            f"{STATEMENT_FILE} and only {', '.join(SHIPPABLE[1:])}) and "
                            f"{SIGNATURE_FILE}; unexpected: {extra[:5] or names[:8]}")


def read_statement(model_dir: Path) -> TransferStatement:
    try:
        raw = (model_dir / STATEMENT_FILE).read_bytes()
    except OSError as e:
        raise StatementMismatch("the transfer statement is missing") from e
    return TransferStatement.from_json(strict_json.loads(
        raw, "the transfer statement", StatementMismatch, MAX_HEADER, HEADER_DEPTH))


def verify_payload(env: Envelope, sender: PublicIdentity, me: PublicIdentity,
                   identities: Sequence[Any], work: Path, limits: Limits) -> VerifiedBundle:
    """Steps 7-10, in the private ``work`` folder."""
    bundle_digest = _hash_payload(env)                                  # (7)
    root = work / "content"
    root.mkdir(mode=0o700)
    digests = _decrypt_and_unpack(env, identities, root, limits)        # (7, 8)
    pause = os.environ.get(SLEEP_AFTER_DECRYPT_ENV)
    if pause:
        time.sleep(float(pause))
    check_layout(root, digests)                                         # (8)
    verify_model_signature(root / MODEL_DIR, root / SIGNATURE_FILE,     # (9)
                           sender.signing_key_pem, work,
                           {str(root / name): d for name, d in digests.items()})
    statement = read_statement(root / MODEL_DIR)                       # (10)
    if statement.transfer != env.header.transfer:
        raise StatementMismatch(f"{env.path.name}: the signed transfer statement inside does "
                                "not match the outer header (mixed or re-encrypted bundle)")
    if not statement.transfer.names(me.fingerprint):
        raise NotAddressedToUs("the signed statement does not name this site")
    if digests[f"{MODEL_DIR}/{ONNX_FILE}"] != statement.onnx_digest:  # hashed unpacking
        raise DigestMismatch("model.onnx differs from the digest in the statement")
    onnx_safety.check_model(root / MODEL_DIR / ONNX_FILE)
    return VerifiedBundle(env.header, statement, sender, bundle_digest, root)


@contextmanager
def open_bundle(path: Path, home: Path, identity: SiteIdentity, now: datetime | None = None,
                limits: Limits = Limits()) -> Iterator[VerifiedBundle]:  # noqa: B008
    """Verify and decrypt ``path`` for this site; the plaintext lives only inside the block."""
    moment = now or datetime.now(UTC)
    trust = TrustStore(home)
    with receiving_area(home) as work:  # the rollback state is read under the lock
        env, sender = check_envelope(path, trust, identity.public, home, moment)
        yield verify_payload(env, sender, identity.public, [identity.age_identity], work,
                             limits)
