"""Why the ledger refused: a broken chain, an unknown record, an unreachable database.

:class:`LedgerBroken`, :class:`CheckpointMismatch` and :class:`PeerMismatch` are
:class:`~passerelle.errors.Refused` (exit code 1): the ledger was readable and a check
said no. The others are :class:`~passerelle.errors.BadInput` (exit code 2).
"""

from __future__ import annotations

from passerelle.errors import BadInput, Refused


class LedgerBroken(Refused):
    """A record fails verification; names the first bad record (seq and id) and why."""

    def __init__(self, seq: int, record_id: str, reason: str) -> None:
        super().__init__(f"ledger broken at record seq {seq} ({record_id}): {reason}")
        self.seq = seq
        self.record_id = record_id
        self.reason = reason


class UnrecordedRotation(Refused):
    """The home's signing key is not the last one this site's ledger records (a key
    rotation without its ``trust_rotated`` record, or keys swapped by hand)."""


class CheckpointMismatch(Refused):
    """The ledger does not hold the head named by a signed checkpoint (truncated or forked)."""


class PeerMismatch(Refused):
    """This site's ledger and a peer's export disagree about the transfers between them."""

    def __init__(self, problems: tuple[str, ...]) -> None:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{problems[0]}{more}")
        self.problems = problems


class BadCheckpoint(Refused):
    """A checkpoint file whose signature does not verify or whose signer is not trusted."""


class MalformedRecord(BadInput):
    """An envelope or statement that is not a well-formed ledger record."""


class UnknownRecord(BadInput):
    """No record with that id (or id prefix) in this site's ledger."""


class LedgerUnreachable(BadInput):
    """The ledger database URL is unusable or the database cannot be reached."""


class NotALedgerExport(BadInput):
    """A file given as a ledger export or checkpoint is not one."""


class LedgerSigningError(BadInput):
    """No usable signing key for appending to the ledger."""


class ActNotRecorded(BadInput):
    """An act could not be appended to the site's ledger (the command fails)."""
