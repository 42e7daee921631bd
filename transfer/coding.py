"""Batch coding (``passerelle predict``): a file of stays in, JSON Lines of codes out.

Input: a corpus directory (``stays.jsonl`` with its manifest, checked as
``passerelle data generate`` writes it) or a JSON Lines file of stays, one object per
line with ``sections`` (an object of section texts) or ``text``, and an optional
``stay_id``. Every stay is read and checked before the model is verified and loaded, and
the output is written to a temporary file beside ``--out`` and renamed only when every
stay was coded: a malformed stay (exit 2) or a refused model (exit 1) leaves no file.

Output: one line per stay, in input order::

    {"stay_id": "Y-S000001", "codes": [{"code": "I21.0", "label": "...",
                                        "probability": 0.91}, ...]}
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from passerelle.errors import BadInput
from registry.store import ModelStore, VersionRef
from transfer.acts import Recorder, recorder, subject
from transfer.records import RecordKind
from transfer.scoring import Coder, MalformedStay, Stay, check_top_k, load_verified, parse_stay

BATCH = 256
MAX_INPUT_BYTES = 1 << 30  # 1 GiB of letters
MAX_LINE_CHARS = 1 << 20

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Coded:
    out: Path
    stays: int
    model: VersionRef
    onnx_digest: str
    signer: str
    origin: str


def read_stays(data: Path) -> list[dict[str, Any]]:
    """The raw stay objects of a corpus directory or a JSON Lines file (BadInput if not)."""
    if data.is_dir():
        from passerelle.corpus import read_corpus

        corpus = read_corpus(data)  # manifest and digests checked
        return [{"stay_id": s.stay_id, "sections": s.sections.as_dict()} for s in corpus.stays]
    if not data.is_file():
        raise BadInput(f"{data}: no such file or directory")
    if data.stat().st_size > MAX_INPUT_BYTES:
        raise BadInput(f"{data}: larger than {MAX_INPUT_BYTES} bytes")
    docs = []
    try:
        with data.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if len(line) > MAX_LINE_CHARS:
                    raise MalformedStay(f"{data}:{number}: line longer than "
                                        f"{MAX_LINE_CHARS} characters")
                if not line.strip():
                    continue
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise MalformedStay(f"{data}:{number}: not JSON ({e.msg})") from e
    except UnicodeDecodeError as e:
        raise MalformedStay(f"{data}: not UTF-8 text") from e
    except OSError as e:
        raise BadInput(f"{data}: cannot read: {e.strerror}") from e
    if not docs:
        raise BadInput(f"{data}: no stay to code")
    return docs


def check_out(out: Path) -> None:
    if out.exists():
        raise BadInput(f"{out}: already exists")
    if not out.absolute().parent.is_dir():
        raise BadInput(f"{out.absolute().parent}: no such directory")


def code_file(store: ModelStore, ref: VersionRef, data: Path, out: Path,
              top_k: int, progress: Progress | None = None) -> Coded:
    """``predict``: check the input, verify and load the version, code, write ``out``."""
    check_top_k(top_k)
    check_out(out)
    docs = read_stays(data)
    with recorder(store.home) as rec:
        coder = load_verified(store, ref)
        where = data.name
        stays = [parse_stay(d, f"{where}: stay {i + 1}", coder.sections)
                 for i, d in enumerate(docs)]
        m = coder.model
        write_codes(coder, stays, out, top_k, progress, lambda: record_use(
            rec, coder, "predict", {"stays": len(stays), "top_k": top_k}))
    return Coded(out, len(stays), ref, m.onnx_digest, m.signer, m.origin)


def record_use(rec: Recorder, coder: Coder, use: str, fields: dict[str, Any]) -> None:
    """``model_used``: which verified version coded stays here, how many, how (counts
    only: never a stay, its id or its codes)."""
    m = coder.model
    rec.record(RecordKind.MODEL_USED, subject("onnx", str(m.info.ref), m.onnx_digest),
               {"model": m.info.ref.name, "version": m.info.ref.version,
                "onnx_digest": m.onnx_digest, "signed_by": m.signer, "origin": m.origin,
                "use": use, **fields})


def write_codes(coder: Coder, stays: Sequence[Stay], out: Path, top_k: int,
                progress: Progress | None = None,
                before_replace: Callable[[], None] | None = None) -> None:
    """Code ``stays`` in batches and write JSON Lines to ``out`` atomically;
    ``before_replace`` (the ledger record) runs before the file is put in place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.absolute().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for start in range(0, len(stays), BATCH):
                for line in coder.code_json(stays[start:start + BATCH], top_k):
                    f.write(line + "\n")
                if progress is not None:
                    progress("coding stays", min(start + BATCH, len(stays)), len(stays))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # codes of patients' stays: as private as the letters
        if before_replace is not None:
            before_replace()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
