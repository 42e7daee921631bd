"""Deterministic tar packing and safe, bounded unpacking.

Packing: regular files and directories only, sorted names, mtime 0, uid/gid 0, no
user names, modes 0644/0755, PAX format: the same directory always gives the same bytes.

Unpacking refuses, while streaming and before writing the member: absolute paths,
``..``, links, devices, FIFOs, sparse members, duplicate names, too many members, and
a total size over the limit; every file is created with O_EXCL|O_NOFOLLOW, mode 0600.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from transfer.errors import UnsafeArchive

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Hard limits, enforced while streaming."""

    max_total_bytes: int = 8 << 30
    max_members: int = 64
    max_name_length: int = 200
    max_depth: int = 4


def pack(src: Path, out: BinaryIO) -> None:
    """Write ``src``'s tree to ``out`` as a deterministic tar stream."""
    paths: list[Path] = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            paths.append(Path(root) / name)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(paths, key=lambda p: p.relative_to(src).as_posix()):
            rel = path.relative_to(src).as_posix()
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise UnsafeArchive(f"{rel}: only regular files and folders can be packed")
            info = tarfile.TarInfo(rel)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if path.is_dir():
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.mode = 0o644
                info.size = path.stat().st_size
                with path.open("rb") as f:
                    tar.addfile(info, f)


def _check_name(member: tarfile.TarInfo, limits: Limits) -> PurePosixPath:
    name = member.name
    if not name or len(name) > limits.max_name_length or "\x00" in name or "\\" in name:
        raise UnsafeArchive(f"archive member {name!r}: unusable name")
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("/"):
        raise UnsafeArchive(f"archive member {name!r}: absolute path")
    if any(part in ("..", ".", "") for part in name.rstrip("/").split("/")):
        raise UnsafeArchive(f"archive member {name!r}: '..' or '.' in the path")
    if len(path.parts) > limits.max_depth:
        raise UnsafeArchive(f"archive member {name!r}: nested too deep")
    return path


def unpack(archive: Path, dest: Path, limits: Limits = Limits()) -> None:
    """Extract the tar file ``archive`` into the empty folder ``dest`` (see unpack_stream)."""
    with archive.open("rb") as raw:
        unpack_stream(raw, dest, limits)


def unpack_stream(raw: BinaryIO, dest: Path, limits: Limits = Limits()) -> None:
    """Extract a tar stream into the empty folder ``dest``, refusing anything unsafe.

    Reads ``raw`` to its end: after the end-of-archive marker only zero padding may follow.
    """
    total = 0
    count = 0
    try:
        with tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                count += 1
                if count > limits.max_members:
                    raise UnsafeArchive(f"archive has more than {limits.max_members} members")
                rel = _check_name(member, limits)
                if member.issym() or member.islnk():
                    raise UnsafeArchive(f"archive member {member.name!r}: links are refused")
                if member.isdev() or member.isfifo():
                    raise UnsafeArchive(f"archive member {member.name!r}: devices and FIFOs "
                                        "are refused")
                if member.issparse() or not (member.isreg() or member.isdir()):
                    raise UnsafeArchive(f"archive member {member.name!r}: only regular files "
                                        "and folders are accepted")
                target = dest.joinpath(*rel.parts)
                if member.isdir():
                    target.mkdir(mode=0o700, parents=True, exist_ok=True)
                    continue
                total += member.size
                if total > limits.max_total_bytes:
                    raise UnsafeArchive(f"archive content exceeds {limits.max_total_bytes} "
                                        "bytes")
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                _extract(tar, member, target)
    except tarfile.TarError as e:
        raise UnsafeArchive(f"archive is malformed: {e}") from e
    except EOFError as e:
        raise UnsafeArchive("archive is truncated") from e
    while chunk := raw.read(_CHUNK):
        if chunk.count(0) != len(chunk):
            raise UnsafeArchive("data after the end of the archive")


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    src = tar.extractfile(member)
    if src is None:
        raise UnsafeArchive(f"archive member {member.name!r}: unreadable")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError as e:
        raise UnsafeArchive(f"archive member {member.name!r}: duplicate name") from e
    written = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > member.size:
                raise UnsafeArchive(f"archive member {member.name!r}: larger than declared")
            out.write(chunk)
    if written != member.size:
        raise UnsafeArchive(f"archive member {member.name!r}: truncated")
