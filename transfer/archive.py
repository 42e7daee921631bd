"""Deterministic tar packing and a strict, bounded reader of the same subset.

Packing: regular files and directories only, sorted names, mtime 0, uid/gid 0, no
user names, modes 0644/0755, POSIX ustar headers (no PAX or GNU extension records): the
same directory always gives the same bytes.

Unpacking does not use :mod:`tarfile` (whose header parsing has been quadratic on PAX
headers, CPython CVE-2024-6232, and recursive on GNU long names). It reads exactly the
subset ``pack`` writes, one 512-byte header at a time:

* a ustar header (magic ``ustar\\0``, version ``00``) with a valid checksum, octal
  numeric fields (no base-256), NUL-padded text fields, printable ASCII names;
* type ``0`` (regular file) or ``5`` (directory) and nothing else: PAX (``x``, ``g``),
  GNU (``L``, ``K``, ``S``, ...) extension records are refused on their header, before
  their content is read, as are links, devices and FIFOs;
* safe relative names (no absolute path, ``..``, ``.``), bounded length and depth, no
  duplicate and no name below a file, at most ``max_members`` members and
  ``max_total_bytes`` of content;
* after the end-of-archive marker only zero bytes up to the end of the stream.

The reader is a sink (:class:`Unpacker`, fed pieces of the stream as they are
decrypted); :func:`unpack_stream` pulls a file object into it. Memory is bounded
whatever the input: one 512-byte header and the piece being fed (``_CHUNK``, 1 MiB,
from :func:`unpack_stream`) at a time, plus the member names (at most ``max_members`` of
``max_name_length`` bytes). CPU is linear in the stream's length. Every file is
created with O_EXCL|O_NOFOLLOW, mode 0600, and hashed (SHA-256) as it is written.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from transfer.errors import UnsafeArchive

_CHUNK = 1 << 20
_BLOCK = 512
_MAGIC = b"ustar\x00"
_VERSION = b"00"
_REFUSED_TYPES = {
    b"x": "PAX extended headers are refused",
    b"g": "PAX global headers are refused",
    b"L": "GNU long names are refused",
    b"K": "GNU long link names are refused",
    b"S": "sparse members are refused",
    b"1": "links are refused",
    b"2": "links are refused",
    b"3": "devices and FIFOs are refused",
    b"4": "devices and FIFOs are refused",
    b"6": "devices and FIFOs are refused",
}


@dataclass(frozen=True)
class Limits:
    """Hard limits, enforced while streaming."""

    max_total_bytes: int = 8 << 30
    max_members: int = 64
    max_name_length: int = 200
    max_depth: int = 4


_RECORD = 20 * _BLOCK  # tar's record size: the stream ends padded to a multiple of it


@dataclass(frozen=True)
class _Entry:
    rel: str
    path: Path
    size: int  # -1 for a folder


def _entries(src: Path) -> list[_Entry]:
    paths: list[Path] = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            paths.append(Path(root) / name)
    entries = []
    for path in sorted(paths, key=lambda p: p.relative_to(src).as_posix()):
        rel = path.relative_to(src).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise UnsafeArchive(f"{rel}: only regular files and folders can be packed")
        entries.append(_Entry(rel, path, -1 if path.is_dir() else path.stat().st_size))
    return entries


def _header(entry: _Entry) -> bytes:
    info = tarfile.TarInfo(entry.rel)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.size < 0:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.type, info.mode, info.size = tarfile.REGTYPE, 0o644, entry.size
    return info.tobuf(tarfile.USTAR_FORMAT, "ascii", "strict")


class PackedStream:
    """The deterministic ustar stream of a folder, read as a file (``read(n)``), so that
    it can be encrypted as it is produced: no tar file is ever written.

    ``size`` is known before the first byte is read (headers, contents, padding and the
    end-of-archive record). A file that changes size while it is read is an error.
    """

    def __init__(self, src: Path) -> None:
        self._entries = _entries(src)
        body = sum(_BLOCK + (e.size + -e.size % _BLOCK if e.size > 0 else 0)
                   for e in self._entries) + 2 * _BLOCK
        self.size = body + -body % _RECORD
        self._chunks = self._generate()
        self._pending = b""
        self._offset = 0

    def _generate(self) -> Iterator[bytes]:
        written = 0
        for entry in self._entries:
            yield _header(entry)
            written += _BLOCK
            if entry.size < 0:
                continue
            left = entry.size
            with entry.path.open("rb") as f:
                while left:
                    chunk = f.read(min(left, _CHUNK))
                    if not chunk:
                        raise UnsafeArchive(f"{entry.rel}: shrank while it was packed")
                    left -= len(chunk)
                    yield chunk
                if f.read(1):
                    raise UnsafeArchive(f"{entry.rel}: grew while it was packed")
            written += entry.size
            if entry.size % _BLOCK:
                yield bytes(-entry.size % _BLOCK)
                written += -entry.size % _BLOCK
        yield bytes(self.size - written)  # end-of-archive blocks and record padding

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (fewer at a chunk's end, as a raw stream); b"" at the end."""
        if n is None or n < 0:
            rest = bytes(self._pending[self._offset:]) + b"".join(self._chunks)
            self._pending, self._offset = b"", 0
            return rest
        if self._offset >= len(self._pending):
            self._pending, self._offset = next(self._chunks, b""), 0
        view = memoryview(self._pending)[self._offset:self._offset + n]
        self._offset += len(view)
        return bytes(view)


def pack(src: Path, out: BinaryIO) -> None:
    """Write ``src``'s tree to ``out`` as a deterministic ustar stream."""
    stream = PackedStream(src)
    while chunk := stream.read(_CHUNK):
        out.write(chunk)


# ------------------------------------------------------------------ strict reader

def _text(field: bytes, what: str) -> str:
    value, _, rest = field.partition(b"\x00")
    if rest.strip(b"\x00"):
        raise UnsafeArchive(f"archive header: {what} has bytes after its end")
    if any(c < 0x20 or c > 0x7E for c in value):
        raise UnsafeArchive(f"archive header: {what} is not printable ASCII")
    return value.decode("ascii")


def _octal(field: bytes, what: str) -> int:
    digits = field.rstrip(b"\x00 ").lstrip(b" ")
    if not digits:
        return 0
    if len(digits) > 12 or any(c not in b"01234567" for c in digits):
        raise UnsafeArchive(f"archive header: {what} is not an octal number")
    return int(digits, 8)


@dataclass(frozen=True)
class _Header:
    name: str
    size: int
    is_dir: bool


def _parse_header(block: bytes, limits: Limits) -> _Header:
    if block[257:263] != _MAGIC or block[263:265] != _VERSION:
        raise UnsafeArchive("archive header: not a POSIX ustar header (GNU or old tar "
                            "formats are refused)")
    expected = _octal(block[148:156], "checksum")
    actual = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if expected != actual:
        raise UnsafeArchive("archive header: bad checksum")
    kind = block[156:157]
    name = _text(block[0:100], "name")
    prefix = _text(block[345:500], "prefix")
    full = f"{prefix}/{name}" if prefix else name
    if kind in _REFUSED_TYPES:
        raise UnsafeArchive(f"archive member {full!r}: {_REFUSED_TYPES[kind]}")
    if kind not in (b"0", b"\x00", b"5"):
        raise UnsafeArchive(f"archive member {full!r}: only regular files and folders "
                            "are accepted")
    if _text(block[157:257], "link name"):
        raise UnsafeArchive(f"archive member {full!r}: links are refused")
    size = _octal(block[124:136], "size")
    is_dir = kind == b"5"
    if is_dir and size:
        raise UnsafeArchive(f"archive member {full!r}: a folder with content")
    return _Header(full, size, is_dir)


def _check_name(name: str, limits: Limits) -> PurePosixPath:
    if not name or len(name) > limits.max_name_length or "\\" in name:
        raise UnsafeArchive(f"archive member {name!r}: unusable name")
    if name.startswith("/"):
        raise UnsafeArchive(f"archive member {name!r}: absolute path")
    if any(part in ("..", ".", "") for part in name.rstrip("/").split("/")):
        raise UnsafeArchive(f"archive member {name!r}: '..' or '.' in the path")
    path = PurePosixPath(name.rstrip("/"))
    if len(path.parts) > limits.max_depth:
        raise UnsafeArchive(f"archive member {name!r}: nested too deep")
    return path


def unpack(archive: Path, dest: Path, limits: Limits = Limits()) -> dict[str, str]:
    """Extract the tar file ``archive`` into the empty folder ``dest`` (see unpack_stream)."""
    with archive.open("rb") as raw:
        return unpack_stream(raw, dest, limits)


def unpack_stream(raw: BinaryIO, dest: Path, limits: Limits = Limits()) -> dict[str, str]:
    """Extract a ustar stream into the empty folder ``dest``, refusing anything unsafe.

    Returns ``{relative path: "sha256:<hex>"}`` of the files written. Reads ``raw`` to
    its end: after the end-of-archive marker only zero padding may follow.
    """
    unpacker = Unpacker(dest, limits)
    try:
        while chunk := raw.read(_CHUNK):
            unpacker.feed(chunk)
        return unpacker.close()
    finally:
        unpacker.abort()


class Unpacker:
    """The strict reader as a sink: :meth:`feed` it the stream in pieces of any size,
    then :meth:`close` it (which refuses a stream that ends early).

    Pushed rather than pulled, so that a decryptor's output can be unpacked as it is
    produced, on any thread, with no pipe and no extra copy. Each file's bytes are
    hashed and written straight from the piece fed (hashlib and file writes release
    the GIL on large buffers). Memory: one 512-byte header and the member names.
    """

    def __init__(self, dest: Path, limits: Limits = Limits()) -> None:
        self._dest = dest
        self._limits = limits
        self._block = bytearray()  # a header being gathered
        self._files: dict[PurePosixPath, str] = {}
        self._dirs: set[PurePosixPath] = set()
        self._total = 0
        self._count = 0
        self._out: io.FileIO | None = None  # the file being written
        self._header: _Header | None = None
        self._rel = PurePosixPath()
        self._digest: Any = None
        self._left = 0  # content bytes of the current file still to come
        self._pad = 0  # padding bytes still to come after it
        self._ended = False  # the end-of-archive marker was read

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            if self._ended:
                if bytes(view).count(0) != len(view):
                    raise UnsafeArchive("data after the end of the archive")
                return
            if self._left:
                view = self._content(view)
            elif self._pad:
                take = min(self._pad, len(view))
                self._pad -= take
                view = view[take:]
            else:
                take = min(_BLOCK - len(self._block), len(view))
                self._block += view[:take]
                view = view[take:]
                if len(self._block) == _BLOCK:
                    block, self._block = bytes(self._block), bytearray()
                    self._start_member(block)

    def close(self) -> dict[str, str]:
        """The digests of the files written, once the whole archive was fed."""
        if not self._ended:
            if self._left:
                assert self._header is not None  # noqa: S101 - set with _left
                raise UnsafeArchive(f"archive member {self._header.name!r}: truncated")
            raise UnsafeArchive(f"archive is truncated "
                                f"({'in padding' if self._pad else 'in a header'})")
        return {p.as_posix(): d for p, d in self._files.items()}

    def abort(self) -> None:
        """Close the file being written, if any (on every path out)."""
        if self._out is not None:
            self._out.close()
            self._out = None

    def _start_member(self, block: bytes) -> None:
        if block.count(0) == _BLOCK:
            self._ended = True  # end-of-archive marker
            return
        limits = self._limits
        self._count += 1
        if self._count > limits.max_members:
            raise UnsafeArchive(f"archive has more than {limits.max_members} members")
        header = _parse_header(block, limits)
        rel = _check_name(header.name, limits)
        if rel in self._files or rel in self._dirs:
            raise UnsafeArchive(f"archive member {header.name!r}: duplicate name")
        for parent in rel.parents:
            if parent in self._files:
                raise UnsafeArchive(f"archive member {header.name!r}: below a file "
                                    f"({parent})")
        target = self._dest.joinpath(*rel.parts)
        try:
            if header.is_dir:
                target.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._dirs.add(rel)
                return
            self._total += header.size
            if self._total > limits.max_total_bytes:
                raise UnsafeArchive(f"archive content exceeds {limits.max_total_bytes} "
                                    "bytes")
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            try:
                fd = os.open(target, flags, 0o600)
            except FileExistsError as e:
                raise UnsafeArchive(f"archive member {header.name!r}: duplicate "
                                    "name") from e
        except OSError as e:
            raise UnsafeArchive(f"archive member {header.name!r}: cannot be written "
                                f"({e.strerror})") from e
        self._out = io.FileIO(fd, "wb")
        self._header, self._rel, self._digest = header, rel, hashlib.sha256()
        self._left, self._pad = header.size, -header.size % _BLOCK
        self._files[rel] = ""  # its digest once written
        if not self._left:
            self._end_file()

    def _content(self, view: memoryview) -> memoryview:
        assert self._out is not None and self._header is not None  # noqa: S101
        part = view[:self._left]
        self._digest.update(part)
        try:
            while part:
                part = part[self._out.write(part) or 0:]
        except OSError as e:
            raise UnsafeArchive(f"archive member {self._header.name!r}: cannot be written "
                                f"({e.strerror})") from e
        taken = min(self._left, len(view))
        self._left -= taken
        if not self._left:
            self._end_file()
        return view[taken:]

    def _end_file(self) -> None:
        assert self._out is not None and self._header is not None  # noqa: S101
        self._out.close()
        self._out = None
        self._files[self._rel] = "sha256:" + self._digest.hexdigest()
