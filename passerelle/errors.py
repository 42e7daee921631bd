"""The toolkit's exceptions.

One root, :class:`PasserelleError`; the command line catches only that root, prints
one line starting with ``error:`` and exits with the error's ``exit_code``. Anything
else that escapes is a bug and keeps its traceback.

Two families give the documented exit codes:

* :class:`BadInput` (exit 2): a missing or malformed file, an unknown model, a bad
  option value.
* :class:`Refused` (exit 1): the input was well formed but a check said no
  (parity failed, verification failed, a gate or a budget refused).
"""

from __future__ import annotations


class PasserelleError(Exception):
    """Root of every error the toolkit raises on purpose."""

    exit_code: int = 2


class BadInput(PasserelleError):
    """The input is missing, malformed or unknown (exit code 2)."""

    exit_code = 2


class Refused(PasserelleError):
    """A check refused well-formed input (exit code 1)."""

    exit_code = 1


class CorpusError(BadInput):
    """A corpus directory is missing, incomplete or malformed."""


class ModelDirError(BadInput):
    """A model directory is missing, incomplete or corrupt."""


class ModelNotFound(BadInput):
    """No registered model or version by that name."""


class RegistryError(BadInput):
    """The MLflow store cannot be reached or answered something unusable."""


class ConversionError(BadInput):
    """A model could not be converted to ONNX."""


class ParityError(Refused):
    """The ONNX model does not reproduce the source framework's outputs."""


class GateRefused(Refused):
    """The export gate refused: no PASS audit verdict for these ONNX bytes, no override."""
