"""The transfer ledger: each site's signed, hash-chained records, stored through SQLAlchemy.

One table, ``ledger_records`` (site, seq, record_id, prev, kind, time, envelope), with
(site, seq) as its primary key and record_id unique. SQLite under the site's home by
default; PostgreSQL (``postgresql+psycopg2://``) for shared deployments.

Appends never fork a chain, even from many processes at once: each append is one
transaction that takes the site's write lock (``BEGIN IMMEDIATE`` on SQLite,
``pg_advisory_xact_lock`` on PostgreSQL), reads the head, signs the next record and
inserts it; the primary key refuses a second record at the same seq, and a conflict is
retried a bounded number of times. A process killed mid-append leaves the whole record
or nothing.

:meth:`Ledger.verify` checks every record in seq order and names the first bad one.
Dropping the newest records leaves a shorter chain that still verifies; that is caught
only against something kept outside the ledger: a signed :func:`checkpoint` of the head
(:meth:`Ledger.check_checkpoint`), or a peer's export (:func:`cross_check`).
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError

from transfer.ledger_errors import (
    BadCheckpoint,
    CheckpointMismatch,
    LedgerBroken,
    LedgerUnreachable,
    MalformedRecord,
    NotALedgerExport,
    PeerMismatch,
    UnknownRecord,
)
from transfer.records import (
    PREDICATE_PREFIX,
    STATEMENT_TYPE,
    Record,
    RecordId,
    RecordKind,
    Signer,
    Subject,
    Verifier,
    check_signature,
    format_time,
    is_record_id,
    is_site_name,
    load_canonical,
    open_envelope,
    parse,
    parse_time,
    seal,
    sign_envelope,
    statement_of,
    verify_signature,
)

URL_ENV = "PASSERELLE_LEDGER_URL"
LEDGER_FILE = "ledger.db"
TABLE = "ledger_records"
CHECKPOINT_TYPE = f"{PREDICATE_PREFIX}checkpoint/v1"
MAX_EXPORT_LINE = (1 << 20) + 1
SQLITE_BUSY_SECONDS = 30.0  # how long one SQLite transaction waits for the write lock
CONNECT_SECONDS = 5  # how long a PostgreSQL connection may take before the ledger is unreachable
APPEND_DEADLINE_SECONDS = 120.0  # after which an append stops retrying conflicts

DigestChecker = Callable[[Record], str | None]
"""Given a verified record, a reason its digests no longer match what is stored (e.g. in
MLflow), or None when they match or the artefact no longer exists."""

_metadata = MetaData()
_records = Table(
    TABLE, _metadata,
    Column("site", String(64), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("record_id", String(71), nullable=False, unique=True),
    Column("prev", String(71), nullable=True),
    Column("kind", String(40), nullable=False),
    Column("time", String(40), nullable=False),
    Column("envelope", Text, nullable=False),
)


# -- the database -------------------------------------------------------------------


def ledger_url(home: Path, explicit: str | None = None) -> str:
    """``explicit``, else ``$PASSERELLE_LEDGER_URL``, else SQLite under the home."""
    return explicit or os.environ.get(URL_ENV) or f"sqlite:///{home / LEDGER_FILE}"


def normalise_url(url: str) -> URL:
    """A SQLite or psycopg2 PostgreSQL URL; bare ``postgresql://`` means psycopg2 here."""
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise LedgerUnreachable(f"{url!r} is not a database URL") from e
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg2"):
            raise LedgerUnreachable(f"the {driver} driver is not supported for the ledger: "
                                    "use postgresql+psycopg2://")
        return parsed.set(drivername="postgresql+psycopg2")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        return parsed
    raise LedgerUnreachable(f"{parsed.drivername}: the ledger is stored in SQLite or "
                            "PostgreSQL (sqlite:///FILE or postgresql+psycopg2://...)")


def _shown(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _sqlite_engine(url: URL) -> Engine:
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_SECONDS})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling is off; we emit BEGIN ourselves (the
        # recipe of SQLAlchemy's SQLite dialect documentation).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("passerelle_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _site_lock_key(site: str) -> int:
    digest = hashlib.sha256(f"passerelle-ledger:{site}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _is_transient(error: DBAPIError) -> bool:
    message = str(error.orig).lower()
    return any(word in message for word in ("database is locked", "busy", "deadlock",
                                            "could not serialize"))


# -- results ------------------------------------------------------------------------


@dataclass(frozen=True)
class Verification:
    """A chain that verified: how many records, the head, the keys that signed them."""

    site: str
    count: int
    head: Record | None
    keyids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "records": self.count, "verified": True,
                "head": None if self.head is None else
                {"seq": self.head.seq, "id": self.head.id, "time": self.head.time},
                "keyids": list(self.keyids)}


class _Chain:
    """Checks records one after another: signature, site, seq from 0, prev links."""

    def __init__(self, site: str, verifier: Verifier) -> None:
        self.site = site
        self.verifier = verifier
        self.count = 0
        self.head: Record | None = None
        self.keyids: set[str] = set()

    def step(self, record: Record) -> None:
        def broken(reason: str) -> LedgerBroken:
            return LedgerBroken(record.seq, record.id, reason)

        # (1) signed by a trusted key, over exactly this payload
        try:
            check_signature(record, self.verifier)
        except MalformedRecord as e:
            raise broken(str(e)) from e
        # (2) the site's own record, at the next seq, naming the previous record
        if record.site != self.site:
            raise broken(f"a record of site {record.site!r} in the chain of {self.site!r}")
        if record.seq != self.count:
            raise broken(f"signed as seq {record.seq} where seq {self.count} is due "
                         "(records missing, reordered or moved)")
        expected = self.head.id if self.head else None
        if record.prev != expected:
            raise broken(f"prev is {record.prev}, not the previous record {expected}")
        self.count += 1
        self.head = record
        self.keyids.add(record.keyid)

    def result(self) -> Verification:
        return Verification(self.site, self.count, self.head, tuple(sorted(self.keyids)))


# -- the ledger ---------------------------------------------------------------------


class Ledger:
    """One site's chain of records in a SQLAlchemy database (SQLite or PostgreSQL).

    ``after_insert`` is called inside the append transaction, after the insert and
    before the commit (tests use it to kill a process there).
    """

    def __init__(self, url: str, site: str, *, attempts: int = 50,
                 clock: Callable[[], datetime] | None = None,
                 after_insert: Callable[[Record], None] | None = None) -> None:
        self.url = normalise_url(url)
        if not is_site_name(site):
            raise MalformedRecord(f"{site!r} is not a site name")
        self.site = site
        self._attempts = attempts
        self._clock = clock or (lambda: datetime.now(UTC))
        self._after_insert = after_insert
        self._postgres = self.url.get_backend_name() == "postgresql"
        try:
            self._engine = (
                create_engine(self.url, connect_args={"connect_timeout": CONNECT_SECONDS})
                if self._postgres else _sqlite_engine(self.url))
        except (ArgumentError, NoSuchModuleError, ImportError) as e:
            raise LedgerUnreachable(f"{_shown(self.url)}: {e}") from e
        self._create_schema()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._engine.dispose()

    # -- transactions ---------------------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        with self._database_errors(), self._engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _writing(self, lock_key: int) -> Iterator[Connection]:
        """A transaction holding the write lock: SQLite's, or a PostgreSQL advisory lock."""
        with self._engine.connect() as conn:
            conn.execution_options(passerelle_write=True)
            with conn.begin():
                if self._postgres:
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key})
                yield conn

    @contextmanager
    def _database_errors(self) -> Iterator[None]:
        try:
            yield
        except DBAPIError as e:
            raise self._unreachable(e) from e

    def _unreachable(self, error: DBAPIError) -> LedgerUnreachable:
        lines = str(error.orig or error).strip().splitlines()
        return LedgerUnreachable(f"ledger database {_shown(self.url)}: "
                                 f"{lines[0] if lines else type(error.orig).__name__}")

    def _create_schema(self) -> None:
        with self._database_errors():
            with self._engine.connect() as conn:
                if inspect(conn).has_table(TABLE):
                    return
            with self._writing(_site_lock_key("")) as conn:
                _metadata.create_all(conn, checkfirst=True)

    # -- appending ------------------------------------------------------------------

    def append(self, kind: RecordKind, subjects: Sequence[Subject], fields: Mapping[str, Any],
               signer: Signer) -> Record:
        """Sign and append the next record of this site's chain; returns it."""
        subjects = tuple(subjects)
        statement_of(kind, subjects, fields, seq=0, prev=None, site=self.site,
                     when=self._clock())  # refuse bad fields before taking the lock
        deadline = time.monotonic() + APPEND_DEADLINE_SECONDS
        for attempt in range(self._attempts):
            try:
                return self._append_once(kind, subjects, fields, signer)
            except DBAPIError as e:
                if not (isinstance(e, IntegrityError) or _is_transient(e)) or \
                        time.monotonic() > deadline:
                    raise self._unreachable(e) from e
            time.sleep(random.uniform(0, min(0.2, 0.005 * 2 ** attempt)))  # noqa: S311
        raise LedgerUnreachable(f"ledger database {_shown(self.url)}: could not append after "
                                f"{self._attempts} attempts (too much contention)")

    def _append_once(self, kind: RecordKind, subjects: tuple[Subject, ...],
                     fields: Mapping[str, Any], signer: Signer) -> Record:
        with self._writing(_site_lock_key(self.site)) as conn:
            head = conn.execute(
                select(_records.c.seq, _records.c.record_id)
                .where(_records.c.site == self.site)
                .order_by(_records.c.seq.desc()).limit(1)).first()
            seq, prev = (0, None) if head is None else (int(head.seq) + 1,
                                                         RecordId(head.record_id))
            record = seal(statement_of(kind, subjects, fields, seq=seq, prev=prev,
                                       site=self.site, when=self._clock()), signer)
            conn.execute(_records.insert().values(
                site=self.site, seq=seq, record_id=record.id, prev=prev, kind=kind.value,
                time=record.time, envelope=record.envelope))
            if self._after_insert is not None:
                self._after_insert(record)
        return record

    # -- reading --------------------------------------------------------------------

    def _parsed(self, row: Any) -> Record:
        try:
            return parse(row.envelope)
        except MalformedRecord as e:
            raise LedgerBroken(int(row.seq), str(row.record_id),
                               f"{e} (run `passerelle records verify`)") from e

    def records(self, *, kind: RecordKind | None = None, since: datetime | None = None,
                model: str | None = None) -> list[Record]:
        """This site's records in seq order, optionally filtered."""
        query = select(_records).where(_records.c.site == self.site)
        if kind is not None:
            query = query.where(_records.c.kind == kind.value)
        if since is not None:
            query = query.where(_records.c.time >= format_time(since))
        with self._reading() as conn:
            rows = conn.execute(query.order_by(_records.c.seq)).all()
        found = [self._parsed(row) for row in rows]
        return [r for r in found if model is None or r.model == model]

    def count(self) -> int:
        with self._reading() as conn:
            n = conn.execute(select(func.count()).select_from(_records)
                             .where(_records.c.site == self.site)).scalar_one()
        return int(n)

    def head(self) -> Record | None:
        with self._reading() as conn:
            row = conn.execute(select(_records).where(_records.c.site == self.site)
                               .order_by(_records.c.seq.desc()).limit(1)).first()
        return None if row is None else self._parsed(row)

    def get(self, ident: str) -> Record:
        """A record by id (``sha256:<hex>``) or by a unique prefix of at least 8 hex digits."""
        hexpart = ident.removeprefix("sha256:").lower()
        if len(hexpart) < 8 or any(c not in "0123456789abcdef" for c in hexpart):
            raise UnknownRecord(f"{ident!r} is not a record id (sha256:<hex>, or at least 8 "
                                "hex digits of one)")
        with self._reading() as conn:
            rows = conn.execute(select(_records).where(
                _records.c.site == self.site,
                _records.c.record_id.startswith(f"sha256:{hexpart}", autoescape=True))
                .limit(2)).all()
        if not rows:
            raise UnknownRecord(f"no record {ident} in the ledger of site {self.site}")
        if len(rows) > 1:
            raise UnknownRecord(f"{ident} names more than one record: give more digits")
        return self._parsed(rows[0])

    # -- verifying ------------------------------------------------------------------

    def verify(self, verifier: Verifier,
               digest_checker: DigestChecker | None = None) -> Verification:
        """Check every record in seq order; raise :class:`LedgerBroken` at the first bad one.

        Per record: (1) the stored envelope is a canonical, well-formed record whose
        hash is the stored id; (2) a trusted key signed it; (3) it is this site's, at
        the seq it is stored at, contiguous from 0, and its prev is the previous
        record's id; (4) the stored columns agree with the signed record; (5) the
        ``digest_checker``, if any, accepts its digests.
        """
        chain = _Chain(self.site, verifier)
        with self._reading() as conn:
            rows = conn.execute(select(_records).where(_records.c.site == self.site)
                                .order_by(_records.c.seq)).all()
        for row in rows:
            seq, stored_id = int(row.seq), str(row.record_id)
            # (1) the envelope as stored
            try:
                record = parse(row.envelope)
            except MalformedRecord as e:
                raise LedgerBroken(seq, stored_id, str(e)) from e
            if record.id != stored_id:
                raise LedgerBroken(seq, stored_id, f"the envelope hashes to {record.id}, "
                                   "not to its stored id")
            if record.seq != seq:
                raise LedgerBroken(seq, stored_id, f"stored at seq {seq} but signed as seq "
                                   f"{record.seq} (records reordered or moved)")
            # (2) and (3)
            chain.step(record)
            # (4) the columns used for filtering say what the signed record says
            if (row.kind, row.prev, row.time) != (record.kind.value, record.prev, record.time):
                raise LedgerBroken(seq, stored_id, "the stored kind, prev or time differ "
                                   "from the signed record")
            # (5) what the record speaks of still has the digests it names
            if digest_checker is not None:
                problem = digest_checker(record)
                if problem is not None:
                    raise LedgerBroken(seq, stored_id, problem)
        return chain.result()

    def check_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Raise :class:`CheckpointMismatch` unless this ledger still holds the named head."""
        if checkpoint.site != self.site:
            raise CheckpointMismatch(f"the checkpoint is of site {checkpoint.site!r}, not "
                                     f"{self.site!r}")
        with self._reading() as conn:
            row = conn.execute(select(_records.c.record_id).where(
                _records.c.site == self.site, _records.c.seq == checkpoint.seq)).first()
            last = conn.execute(select(func.max(_records.c.seq))
                                .where(_records.c.site == self.site)).scalar()
        if row is None:
            ends = "is empty" if last is None else f"ends at seq {last}"
            raise CheckpointMismatch(
                f"the ledger {ends}, but the checkpoint of {checkpoint.time} names seq "
                f"{checkpoint.seq} ({checkpoint.head}): records were dropped (truncation)")
        if row.record_id != checkpoint.head:
            raise CheckpointMismatch(
                f"seq {checkpoint.seq} is {row.record_id}, but the checkpoint of "
                f"{checkpoint.time} names {checkpoint.head}: the chain was rewritten")

    # -- exporting ------------------------------------------------------------------

    def export(self, out: Path) -> int:
        """Write the signed envelopes as JSON Lines, in seq order, atomically; the count."""
        with self._reading() as conn:
            rows = conn.execute(select(_records.c.envelope).where(_records.c.site == self.site)
                                .order_by(_records.c.seq)).all()
        _write_atomically(out, "".join(f"{row.envelope}\n" for row in rows).encode())
        return len(rows)

    def checkpoint(self, signer: Signer, out: Path) -> Checkpoint:
        """Write a signed statement of the chain head to ``out`` (to keep elsewhere)."""
        head = self.head()
        if head is None:
            raise UnknownRecord(f"the ledger of site {self.site} is empty: nothing to "
                                "checkpoint")
        stamp = format_time(self._clock())
        statement = {
            "_type": STATEMENT_TYPE,
            "subject": [Subject.of(f"ledger:{self.site}", head.id).to_json()],
            "predicateType": CHECKPOINT_TYPE,
            "predicate": {"site": self.site, "seq": head.seq, "head": head.id,
                          "time": stamp}}
        envelope = sign_envelope(statement, signer)
        _write_atomically(out, (envelope + "\n").encode())
        return Checkpoint(site=self.site, seq=head.seq, head=head.id,
                          time=stamp, keyid=signer.keyid)


def _write_atomically(out: Path, data: bytes) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- checkpoints ----------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement that a site's chain had ``head`` at ``seq`` at ``time``."""

    site: str
    seq: int
    head: str
    time: str
    keyid: str

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "seq": self.seq, "head": self.head, "time": self.time,
                "keyid": self.keyid}


def read_checkpoint(path: Path, verifier: Verifier) -> Checkpoint:
    """A checkpoint file, its signature checked (:class:`BadCheckpoint` if it fails)."""
    text = _read_text(path, MAX_EXPORT_LINE, "checkpoint")
    try:
        payload, keyid, signature = open_envelope(text.strip())
        st = load_canonical(payload, "checkpoint payload")
        pred = st["predicate"] if isinstance(st, dict) else None
        if not isinstance(st, dict) or st.get("_type") != STATEMENT_TYPE or \
                st.get("predicateType") != CHECKPOINT_TYPE or not isinstance(pred, dict) or \
                set(pred) != {"site", "seq", "head", "time"}:
            raise MalformedRecord("not a ledger checkpoint statement")
        seq, head, site = pred["seq"], pred["head"], pred["site"]
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or \
                not isinstance(head, str) or not is_record_id(head) or \
                not isinstance(site, str):
            raise MalformedRecord("checkpoint fields are malformed")
        parse_time(pred["time"], "checkpoint time")
    except MalformedRecord as e:
        raise NotALedgerExport(f"{path}: not a ledger checkpoint: {e}") from e
    try:
        verify_signature(keyid, payload, signature, verifier)
    except MalformedRecord as e:
        raise BadCheckpoint(f"{path}: {e}") from e
    return Checkpoint(site=site, seq=seq, head=head, time=pred["time"], keyid=keyid)


# -- exports and peers ----------------------------------------------------------------


def _read_text(path: Path, limit: int, what: str) -> str:
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise NotALedgerExport(f"{path}: cannot read the {what}: {e.strerror}") from e
    if len(data) > limit:
        raise NotALedgerExport(f"{path}: too large for a {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotALedgerExport(f"{path}: not a {what} (not UTF-8 text)") from e


def read_export(path: Path, max_records: int = 1_000_000) -> list[Record]:
    """The records of a ``records export`` file, in order; :class:`NotALedgerExport` if the
    file is not one (its signatures and chain are checked by :func:`verify_records`)."""
    records: list[Record] = []
    try:
        with path.open("rb") as f:
            for number, line in enumerate(iter(lambda: f.readline(MAX_EXPORT_LINE), b""), 1):
                if number > max_records:
                    raise NotALedgerExport(f"{path}: more than {max_records} records")
                if not line.endswith(b"\n"):
                    raise NotALedgerExport(f"{path}: line {number} is too long or unterminated")
                try:
                    records.append(parse(line[:-1].decode("utf-8")))
                except (MalformedRecord, UnicodeDecodeError) as e:
                    raise NotALedgerExport(f"{path}: line {number} is not a ledger record: "
                                           f"{e}") from e
    except OSError as e:
        raise NotALedgerExport(f"{path}: cannot read the ledger export: {e.strerror}") from e
    if not records:
        raise NotALedgerExport(f"{path}: an empty file is not a ledger export")
    if len({r.site for r in records}) != 1:
        raise NotALedgerExport(f"{path}: records of several sites in one export")
    return records


def verify_records(records: Sequence[Record], verifier: Verifier) -> Verification:
    """Check an exported chain as :meth:`Ledger.verify` checks a stored one."""
    chain = _Chain(records[0].site if records else "", verifier)
    for record in records:
        chain.step(record)
    return chain.result()


@dataclass(frozen=True)
class PeerCheck:
    """Both ledgers agree: transfers matched in each direction."""

    peer: str
    peer_records: int
    received: int  # peer's bundle_created to us, matched by our received/refused
    sent: int  # our bundle_created to the peer, matched by its received/refused

    def to_json(self) -> dict[str, Any]:
        return {"peer": self.peer, "peer_records": self.peer_records,
                "transfers_in": self.received, "transfers_out": self.sent, "consistent": True}


_ARRIVALS = (RecordKind.BUNDLE_RECEIVED, RecordKind.BUNDLE_REFUSED)
_COMPARED = ("model", "version", "bundle")


def _one_way(senders: Sequence[Record], receivers: Sequence[Record], sender: str,
             receiver: str, problems: list[str]) -> int:
    """Match ``sender``'s bundle_created to ``receiver`` with ``receiver``'s arrivals."""
    created = {r.id: r for r in senders if r.kind is RecordKind.BUNDLE_CREATED}
    to_receiver = {i: r for i, r in created.items() if receiver in (r.fields.get("to") or [])}
    arrivals = [r for r in receivers
                if r.kind in _ARRIVALS and r.fields.get("from") == sender]
    named = {str(r.fields.get("peer_record")) for r in arrivals}
    matched = 0
    for arrival in arrivals:
        where = f"{receiver} seq {arrival.seq} ({arrival.kind.value} {arrival.id})"
        origin = created.get(RecordId(str(arrival.fields.get("peer_record"))))
        if origin is None:
            problems.append(f"{where} names {sender}'s record "
                            f"{arrival.fields.get('peer_record')}, which {sender}'s ledger "
                            "lacks (dropped, or never there)")
        elif origin.id not in to_receiver:
            problems.append(f"{where} names {sender}'s bundle {origin.id}, which was not "
                            f"addressed to {receiver}")
        else:
            differ = [k for k in _COMPARED if k in origin.fields and k in arrival.fields
                      and origin.fields[k] != arrival.fields[k]]
            if differ:
                problems.append(f"{where} and {sender}'s {origin.id} disagree on "
                                f"{', '.join(differ)}")
            else:
                matched += 1
    for record_id, record in to_receiver.items():
        if record_id not in named:
            problems.append(f"{sender} seq {record.seq} (bundle_created {record_id}) for "
                            f"{receiver} has no bundle_received or bundle_refused at "
                            f"{receiver} (records dropped, or the bundle never arrived)")
    return matched


def check_peer(ledger: Ledger, export: Path, keys_for: Callable[[str], Verifier]) -> PeerCheck:
    """Read a peer's export, verify its chain with ``keys_for(peer site)`` and
    :func:`cross_check` it against ``ledger`` (whose own chain the caller verified)."""
    theirs = read_export(export)
    peer = theirs[0].site
    if peer == ledger.site:
        raise NotALedgerExport(f"{export}: the export of this site ({peer}) itself, not of "
                               "a peer")
    try:
        verify_records(theirs, keys_for(peer))
    except LedgerBroken as e:
        raise PeerMismatch((f"the export of site {peer}: {e}",)) from e
    return cross_check(ledger.records(), theirs, ledger.site)


def cross_check(ours: Sequence[Record], theirs: Sequence[Record], site: str) -> PeerCheck:
    """Every transfer between this site and the peer appears at both ends, consistently.

    Raises :class:`PeerMismatch` listing every discrepancy. Both chains must already
    have been verified.
    """
    if not theirs:
        raise NotALedgerExport("the peer export is empty")
    peer = theirs[0].site
    if peer == site:
        raise NotALedgerExport(f"the peer export is of this site ({site}) itself")
    problems: list[str] = []
    received = _one_way(theirs, ours, peer, site, problems)
    sent = _one_way(ours, theirs, site, peer, problems)
    if problems:
        raise PeerMismatch(tuple(problems))
    return PeerCheck(peer=peer, peer_records=len(theirs), received=received, sent=sent)

