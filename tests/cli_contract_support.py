"""What the command-line contract tests share: a workspace with a site, a peer, a tiny
corpus and model; snapshots of everything on disk and in the ledger; running a command
in-process or as a user would; read-only folders that hold even for root; servers that
accept connections and never answer."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import socket
import sqlite3
import stat
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SKIPPED_SUFFIXES = ("-wal", "-shm", "-journal")  # SQLite's own companions of a database
LEDGER = "site/ledger.db"


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: folders, file digests, link targets."""
    seen: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if name.endswith(SKIPPED_SUFFIXES):
                continue
            if path.is_symlink():
                seen[rel] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                seen[rel] = "dir"
            else:
                seen[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def ledger_rows(db: Path) -> list[tuple[object, ...]]:
    """The ledger's records (site, seq, id), WAL included, read without writing."""
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT site, seq, record_id FROM ledger_records ORDER BY site, seq")
        return list(rows)


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str


def run_inprocess(argv: Sequence[str], env: Mapping[str, str], cwd: Path,
                  capture: object) -> Outcome:
    """``passerelle ARGV`` through :func:`passerelle.cli.main` in this process, with
    ``env`` added to the environment (restored after)."""
    from passerelle.cli import main

    saved = dict(os.environ)
    here = Path.cwd()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = int(e.code or 0)
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(saved)
    got = capture.readouterr()  # type: ignore[attr-defined]
    return Outcome(code, got.out, got.err)


def assert_one_error(outcome: Outcome, code: int, says: str) -> None:
    """Exit ``code``, exactly one stderr line starting with ``error:`` that says
    ``says``, no traceback, nothing on stdout."""
    assert "Traceback" not in outcome.err, outcome.err
    lines = outcome.err.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got: {outcome.err!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert says.lower() in lines[0].lower(), f"{says!r} not in {lines[0]!r}"
    assert outcome.code == code, f"exit {outcome.code}, expected {code}: {lines[0]}"
    assert outcome.out.strip() == "", outcome.out


# -- read-only folders that hold for root too -------------------------------------------


def make_read_only(path: Path) -> None:
    """Take write permission off ``path`` and everything under it."""
    for folder, dirs, files in os.walk(path, topdown=False):
        for name in files:
            p = Path(folder) / name
            if not p.is_symlink():
                p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        for name in dirs:
            p = Path(folder) / name
            if not p.is_symlink():
                p.chmod(0o555)
    path.chmod(0o555 if path.is_dir() else 0o444)


def make_writable(path: Path) -> None:
    for folder, dirs, files in os.walk(path):
        Path(folder).chmod(0o700)
        for name in dirs + files:
            p = Path(folder) / name
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | stat.S_IWUSR | stat.S_IRUSR |
                        (stat.S_IXUSR if p.is_dir() else 0))
    path.chmod(0o700)


@contextmanager
def without_root(workspace: Path) -> Iterator[None]:
    """Run the block with the permissions of an ordinary user: as root (who may write
    anywhere), hand ``workspace`` to ``nobody`` and take its effective ids meanwhile."""
    if os.geteuid() != 0:
        yield
        return
    nobody = pwd.getpwnam("nobody")
    for folder, dirs, files in os.walk(workspace):
        os.lchown(folder, nobody.pw_uid, nobody.pw_gid)
        for name in dirs + files:
            os.lchown(Path(folder) / name, nobody.pw_uid, nobody.pw_gid)
    ancestor = workspace.parent
    # The way in must be open to nobody (search only, no listing). It stays open: the
    # ancestors (/tmp/pytest-of-root/pytest-N) are shared by the xdist workers, and one
    # worker closing them again while another is inside this block failed that one's
    # test with a PermissionError (seen in CI).
    while ancestor != ancestor.parent:
        mode = ancestor.stat().st_mode
        if not mode & stat.S_IXOTH:
            ancestor.chmod(mode | stat.S_IXOTH)
        ancestor = ancestor.parent
    os.setegid(nobody.pw_gid)
    os.seteuid(nobody.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        for folder, dirs, files in os.walk(workspace):
            os.lchown(folder, 0, 0)
            for name in dirs + files:
                os.lchown(Path(folder) / name, 0, 0)


# -- servers that are not there, or never answer ----------------------------------------


def closed_port() -> int:
    """A local TCP port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def copy_workspace(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, symlinks=True)
    return dest
