"""Why a site identity, a trust decision or a bundle was refused.

Every class is a :class:`~passerelle.errors.Refused` (exit code 1) or a
:class:`~passerelle.errors.BadInput` (exit code 2) with its own one-line message, so a
site administrator reads *which* check said no.
"""

from __future__ import annotations

from passerelle.errors import BadInput, Refused


class IdentityError(BadInput):
    """The site's identity is missing, malformed or cannot be unlocked."""


class TrustError(BadInput):
    """The trust store is malformed, or a trust operation makes no sense."""


class UnknownSite(BadInput):
    """No trusted site by that name (a ``--to`` that was never added)."""


class BadIdentityFile(Refused):
    """An identity file whose signature or fingerprint does not check."""


class MalformedBundle(Refused):
    """The bundle file is not a well-formed Passerelle bundle (or is truncated)."""


class UntrustedSigner(Refused):
    """The sender's key is not pinned in this site's trust store."""


class RevokedSigner(Refused):
    """The sender's key was revoked in this site's trust store."""


class SignatureInvalid(Refused):
    """A signature (outer header or inner model signature) does not verify."""


class NotAddressedToUs(Refused):
    """The bundle names other recipients than this site."""


class DigestMismatch(Refused):
    """The payload's digest or size differs from the signed header."""


class DecryptionFailed(Refused):
    """The payload could not be decrypted with this site's identity."""


class StatementMismatch(Refused):
    """The signed transfer statement inside disagrees with the outer header."""


class Expired(Refused):
    """The bundle's expiry time has passed (freeze attack), or it is not yet valid."""


class ValidityTooLong(Refused):
    """The bundle is valid for longer than this site's ``transfer.max_validity_days``."""


class AlreadyReceived(Refused):
    """Internal: the bundle is already registered here (``bundle receive`` says so, exit 0)."""


class Rollback(Refused):
    """An older version or sequence number than one already received."""


class UnsafeArchive(Refused):
    """An archive member is unsafe: absolute path, '..', link, device or too large."""


class UnsafeModel(Refused):
    """The ONNX model uses external data, model-local functions or unknown domains."""
