"""The public recipe API: how a vendor tells the audit how its model was trained.

The audit's reference models must be trained the way the target was (Carlini et al. 2022,
Zarifzadeh et al. 2024). A *recipe* is a plain function::

    def my_recipe(training: TrainingSet) -> Model: ...

where the model returned is a Keras model (logits or probabilities as the manifest's
``output.scores`` says), a scikit-learn estimator (``decision_function``, else
``predict_proba``) or an ``onnx.ModelProto`` (output ``logits``, else the first). Passerelle
encodes the stays itself (the target's vocabulary, input kind and dtype), calls the
function once per reference model with the half of the audit pool that model is IN for,
and scores what it returns on every pool stay.

A recipe is found by a *spec*:

- ``NAME``: an entry point of the group ``passerelle.recipes`` (declared by the vendor's
  package: ``[project.entry-points."passerelle.recipes"] my-recipe = "pkg.mod:func"``);
  Passerelle's own coder is ``passerelle-coder``;
- ``module:function``: imported from the Python path.

What the audit records about it (:class:`RecipeInfo`): its name, its kind (:class:`RecipeKind`),
and a digest: the sha256 of the source file of the module that defines the function (or,
for reference models handed over by the vendor, of those models' files).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from passerelle.digests import sha256_file
from passerelle.errors import BadInput

ENTRY_POINT_GROUP = "passerelle.recipes"
BUILTIN = "passerelle-coder"
ONNX_REINIT = "onnx-reinit"
_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*$")


class RecipeKind(StrEnum):
    """Where the reference models' recipe came from (recorded with the verdict)."""

    BUILTIN = "builtin"  # registry.audit.recipe.CoderRecipe on the target's config
    ENTRY_POINT = "entry-point"  # a function of the passerelle.recipes entry-point group
    MODULE = "module"  # a "module:function" spec
    ONNX_REINIT = "onnx-reinit"  # re-initialised copies of the ONNX, trained by the executor
    VENDOR_REFERENCES = "vendor-references"  # models the vendor trained on drawn halves


@dataclass(frozen=True)
class TrainingSet:
    """What a recipe is given: one half of the audit pool, encoded by Passerelle.

    ``inputs`` are encoded as the target's manifest says (token ids (n, max_len) or a bag
    of words (n, vocabulary_size), in the declared dtype); ``labels`` index ``codes`` (the
    target's label table, so the model's output width is ``len(codes)``); ``texts`` are
    the selected sections of each stay (for pipelines that tokenise themselves);
    ``steps`` the gradient steps the target took (None: the recipe's own schedule);
    ``vocabulary_size`` the width of the token-id space (ids are in [0, vocabulary_size))."""

    inputs: npt.NDArray[Any]
    labels: npt.NDArray[np.int64]
    texts: tuple[str, ...]
    codes: tuple[str, ...]
    seed: int
    steps: int | None
    vocabulary_size: int = 0

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.inputs.shape[0] != n or len(self.texts) != n:
            raise ValueError("inputs, labels and texts differ in length")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.codes)):
            raise ValueError("labels must index codes")


RecipeFunction = Callable[[TrainingSet], Any]


@dataclass(frozen=True)
class RecipeInfo:
    """What the audit records about the recipe of its reference models."""

    name: str
    kind: RecipeKind
    digest: str  # sha256:<hex> of the recipe's source file, or of the reference models

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind.value, "digest": self.digest}


@dataclass(frozen=True)
class LoadedRecipe:
    function: RecipeFunction
    info: RecipeInfo


def source_digest(function: Callable[..., Any]) -> str:
    """sha256 of the source file of the module that defines ``function``."""
    module = inspect.getmodule(function)
    file = getattr(module, "__file__", None)
    if not file or not Path(file).is_file():
        raise BadInput(f"recipe {getattr(function, '__qualname__', function)!r}: its source "
                       "file cannot be found (the audit records its digest)")
    return sha256_file(Path(file))


def load_recipe(spec: str) -> LoadedRecipe:
    """The recipe named by ``spec`` (an entry-point name or ``module:function``); BadInput
    if it cannot be found, imported, or is not callable."""
    if ":" in spec:
        if not _SPEC.match(spec):
            raise BadInput(f"--recipe {spec!r}: expected module:function")
        module_name, attr = spec.split(":")
        function = _import_function(spec, module_name, attr)
        kind = RecipeKind.MODULE
    else:
        if not _NAME.match(spec):
            raise BadInput(f"--recipe {spec!r}: not an entry-point name nor module:function")
        function = _entry_point(spec)
        kind = RecipeKind.ENTRY_POINT
    if not callable(function):
        raise BadInput(f"recipe {spec!r} is not callable (a {type(function).__name__})")
    return LoadedRecipe(function, RecipeInfo(spec, kind, source_digest(function)))


def _import_function(spec: str, module_name: str, attr: str) -> Any:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise BadInput(f"recipe {spec!r}: no module named {e.name!r}") from e
    except Exception as e:  # the vendor's module failed while importing: its error, one line
        raise BadInput(f"recipe {spec!r}: importing {module_name} failed: "
                       f"{type(e).__name__}: {_one_line(e)}") from e
    if not hasattr(module, attr):
        raise BadInput(f"recipe {spec!r}: module {module_name} has no {attr!r}")
    return getattr(module, attr)


def _entry_point(name: str) -> Any:
    found = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        known = sorted({ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)})
        raise BadInput(f"no recipe named {name!r} in the entry-point group "
                       f"{ENTRY_POINT_GROUP} (installed: {', '.join(known) or 'none'}); "
                       "or give module:function")
    if len({ep.value for ep in found}) > 1:
        raise BadInput(f"recipe {name!r} is declared by several packages: "
                       f"{', '.join(sorted(ep.value for ep in found))}")
    try:
        return found[0].load()
    except Exception as e:  # the vendor's package failed while importing
        raise BadInput(f"recipe {name!r} ({found[0].value}) cannot be loaded: "
                       f"{type(e).__name__}: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")
