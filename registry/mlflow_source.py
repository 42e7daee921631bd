"""A vendor's model in the vendor's own MLflow: resolve its URI, take one safe flavor, and
download that flavor's files (nothing else) into a folder of ours.

Accepted URIs (tracking URI given, else ``$MLFLOW_TRACKING_URI``; never MLflow's ``./mlruns``
default)::

    models:/NAME/VERSION     a registered version (``models:/NAME/latest``: the highest one)
    models:/NAME@ALIAS       the version an alias points at
    models:/m-<id>           an MLflow 3 LoggedModel
    runs:/RUN_ID/PATH        a model logged in a run (MLflow 3: the run's LoggedModel PATH)

Stage forms (``models:/NAME/Production``) are refused: stages are deprecated in MLflow and
move under the caller's feet; give the version or an alias.

Flavors, in order of preference when a model has several (the first one that can be taken
is taken; :attr:`ResolvedSource.flavor` says which):

1. ``onnx``: the ``.onnx`` file (external tensor data, MLflow's default, is downloaded too
   and then inlined, so the file stands alone);
2. ``tensorflow`` / ``keras`` with a Keras model: the ``.keras`` file or the SavedModel
   folder; the ``custom_objects.cloudpickle`` files MLflow writes beside it are never
   downloaded (custom layers come from ``--custom-objects``);
3. ``sklearn`` saved with ``serialization_format="skops"``: the ``.skops`` file (its
   ``skops_trusted_types`` in MLmodel are the vendor's declaration and are not used here:
   the loader refuses untrusted types itself).

Pickle flavors (sklearn pickle/cloudpickle, a ``python_function`` PythonModel stored with
cloudpickle, pytorch, ...) are refused. Nothing is loaded here: MLmodel is read with
``yaml.safe_load`` and files are only downloaded and hashed.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from passerelle.digests import canonical_json, sha256_bytes, sha256_file
from passerelle.errors import BadInput
from registry.store import HTTP_DEFAULTS, _redact

_log = logging.getLogger(__name__)

Framework = Literal["keras", "sklearn", "onnx"]

PREFERENCE = ("onnx", "tensorflow", "keras", "sklearn")
"""Flavors Passerelle takes, best first."""

_PICKLE_FLAVORS = {
    # flavor -> what makes it a pickle
    "pytorch": "torch.save pickles the model",
    "statsmodels": "statsmodels models are pickled",
    "pmdarima": "pmdarima models are pickled",
    "fastai": "fastai learners are pickled",
}
_PICKLE_ADVICE = ("is a pickle flavor; log it with serialization_format='skops', or as ONNX "
                  "(mlflow.onnx)")

# All matched whole (fullmatch): "$" would let a trailing newline through.
_NAME = r"[^/@\s][^/@\x00-\x1f\x7f]{0,255}"
_MODEL_VERSION = re.compile(rf"models:/({_NAME})/([0-9]{{1,10}}|[Ll][Aa][Tt][Ee][Ss][Tt])")
_MODEL_ALIAS = re.compile(rf"models:/({_NAME})@([A-Za-z0-9_-]{{1,255}})")
_MODEL_ID = re.compile(r"models:/(m-[A-Za-z0-9]{1,64})")
_MODEL_STAGE = re.compile(rf"models:/({_NAME})/([A-Za-z]+)")
_RUN = re.compile(r"runs:/([A-Za-z0-9_-]{1,64})/([A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*)")
_SEGMENT_BAD = {"", ".", ".."}

_ENV = {
    **HTTP_DEFAULTS,
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # tqdm bars on stderr otherwise
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


@dataclass(frozen=True)
class ResolvedSource:
    """A vendor's MLflow model, resolved and downloaded into a folder of ours."""

    path: Path  # model.keras | SavedModel folder | model.skops | model.onnx, under dst
    framework: Framework
    flavor: str  # the MLflow flavor it came from: tensorflow | keras | sklearn | onnx
    uri: str  # as resolved: version number, and model id "(m-...)" when not in the URI
    digest: str  # sha256 over the files downloaded (MLmodel and the flavor's files)


@dataclass(frozen=True)
class _Located:
    """Where a resolved model's artifacts are (its MLmodel is at ``root``/MLmodel)."""

    root: str
    uri: str


@dataclass(frozen=True)
class _Choice:
    flavor: str
    framework: Framework
    fetch: Callable[[_Fetcher], Path]


def resolve_mlflow_source(uri: str, tracking_uri: str | None, dst: Path) -> ResolvedSource:
    """Resolve ``uri`` in the MLflow at ``tracking_uri`` and download its model into ``dst``.

    ``dst`` must not exist; it is created here and removed again on any failure. Every
    failure the caller can fix (a malformed or unknown URI, a missing version or alias, a
    server that does not answer, a missing artifact, a pickle flavor) is a
    :class:`BadInput` whose message names the URI and the tracking URI (password redacted).
    """
    tracking = _tracking_uri(tracking_uri)
    where = f"{uri} (MLflow at {_redact(tracking)})"
    _check_uri_form(uri)
    _check_store_exists(tracking, where)
    try:
        dst.mkdir()
    except FileExistsError as e:
        raise BadInput(f"{dst} already exists; give a new folder for the downloaded model") from e
    except OSError as e:
        raise BadInput(f"cannot create {dst}: {e.strerror or e}") from e
    try:
        with _mlflow_env(), _mlflow_errors(where):
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
            # (1) the URI -> a version -> its LoggedModel (or run artifacts): where files are
            located = _locate(client, uri, tracking, where)
            # (2) MLmodel, read as data; (3) one flavor chosen or the model refused
            fetcher = _Fetcher(located.root, tracking, dst, where)
            flavors = _read_mlmodel(fetcher.download("MLmodel"), where)
            choice = _choose(flavors, where)
            # (4) that flavor's files only; the digest of what MLflow served
            path = choice.fetch(fetcher)
            digest = _tree_digest(dst, where)
            # (5) the file made to stand alone (ONNX external data inlined)
            path = _finish(path, choice.framework, where)
        _log.info("%s: flavors %s, took %s", where, ", ".join(sorted(flavors)), choice.flavor)
        return ResolvedSource(path=path, framework=choice.framework, flavor=choice.flavor,
                              uri=located.uri, digest=digest)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise


# -- the URI and the store ------------------------------------------------------------------

def _tracking_uri(given: str | None) -> str:
    uri = given or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.strip():
        raise BadInput("no MLflow tracking URI: give --from-tracking-uri URI or set "
                       "MLFLOW_TRACKING_URI")
    return uri.strip()


def _check_uri_form(uri: str) -> None:
    if _MODEL_VERSION.fullmatch(uri) or _MODEL_ALIAS.fullmatch(uri) or _MODEL_ID.fullmatch(uri):
        return
    if m := _MODEL_STAGE.fullmatch(uri):
        raise BadInput(f"{uri}: stage {m.group(2)!r} is not accepted (MLflow stages are "
                       f"deprecated); give models:/{m.group(1)}/VERSION or models:/"
                       f"{m.group(1)}@ALIAS")
    if (m := _RUN.fullmatch(uri)) and not (set(m.group(2).split("/")) & _SEGMENT_BAD):
        return
    raise BadInput(f"{uri!r} is not an MLflow model URI: give models:/NAME/VERSION, "
                   "models:/NAME@ALIAS, models:/m-MODEL_ID or runs:/RUN_ID/PATH")


def _check_store_exists(tracking: str, where: str) -> None:
    """A SQLite or file store that is not there would be created by MLflow: refuse it."""
    local: str | None = None
    if tracking.startswith("sqlite:///"):
        local = tracking.removeprefix("sqlite:///").split("?", 1)[0]
    elif tracking.startswith("file://"):
        local = tracking.removeprefix("file://")
    elif "://" not in tracking and not tracking.startswith("databricks"):
        local = tracking
    if local is not None and not Path(local).exists():
        raise BadInput(f"{where}: no MLflow store at {local}")


@contextmanager
def _mlflow_env() -> Iterator[None]:
    """Short HTTP timeouts, no progress bars, quiet loggers, for this call only (the
    user's environment values win)."""
    added = [key for key in _ENV if key not in os.environ]
    for key in added:
        os.environ[key] = _ENV[key]
    import mlflow  # noqa: F401  (configures its loggers when first imported: before ours)

    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic", "urllib3")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)  # retries and INFO lines would go to stderr
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        for key in added:
            os.environ.pop(key, None)


@contextmanager
def _mlflow_errors(where: str) -> Iterator[None]:
    """MLflow, connection, file and parse failures -> one-line :class:`BadInput`."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except BadInput:
        raise
    except MlflowException as e:
        raise BadInput(f"{where}: {_first_line(str(e.message) or type(e).__name__)}") from e
    except Exception as e:
        if isinstance(e, OSError) or type(e).__module__.startswith(
            ("requests", "urllib3", "sqlalchemy", "yaml", "google.protobuf", "onnx")
        ):
            raise BadInput(f"{where}: {_first_line(str(e) or type(e).__name__)}") from e
        raise


def _first_line(text: str) -> str:
    line = next((s.strip() for s in text.splitlines() if s.strip()), text)
    line = _redact(line)
    return line if len(line) <= 400 else line[:397] + "..."


# -- resolution -------------------------------------------------------------------------

def _locate(client: Any, uri: str, tracking: str, where: str) -> _Located:
    if m := _MODEL_ID.fullmatch(uri):
        return _logged_model(client, m.group(1), uri, tracking, where)
    if m := _MODEL_ALIAS.fullmatch(uri):
        name = m.group(1)
        client.get_registered_model(name)  # an unknown name says so, not "alias not found"
        version = client.get_model_version_by_alias(name, m.group(2))
        return _model_version(client, name, str(version.version), tracking, where)
    if m := _MODEL_VERSION.fullmatch(uri):
        name, version = m.group(1), m.group(2)
        if version.lower() == "latest":
            version = _latest_version(client, name, where)
        else:
            client.get_registered_model(name)
        return _model_version(client, name, str(int(version)), tracking, where)
    m = _RUN.fullmatch(uri)
    assert m is not None  # noqa: S101  (_check_uri_form let only these four forms through)
    return _run_model(client, m.group(1), m.group(2), tracking, where)


def _latest_version(client: Any, name: str, where: str) -> str:
    """The highest version number of ``name`` (get_latest_versions is deprecated: stages)."""
    if "'" in name or "\\" in name:
        raise BadInput(f"{where}: give the version number for a name with quotes")
    client.get_registered_model(name)  # an unknown name says so
    found = client.search_model_versions(filter_string=f"name = '{name}'", max_results=1,
                                         order_by=["version_number DESC"])
    if not found:
        raise BadInput(f"{where}: model {name!r} has no versions")
    return str(found[0].version)


def _model_version(client: Any, name: str, version: str, tracking: str,
                   where: str) -> _Located:
    mv = client.get_model_version(name, version)
    if str(mv.status) != "READY":
        raise BadInput(f"{where}: version {version} of {name!r} is not ready ({mv.status})")
    resolved = f"models:/{name}/{mv.version}"
    # MLflow 3 leaves ModelVersion.model_id empty on a SQLite store; its source says it.
    model_id = mv.model_id or _model_id_of(str(mv.source or ""))
    if model_id:
        located = _logged_model(client, model_id, resolved, tracking, where)
        return _Located(located.root, f"{resolved} ({model_id})")
    return _Located(str(client.get_model_version_download_uri(name, mv.version)), resolved)


def _logged_model(client: Any, model_id: str, resolved: str, tracking: str,
                  where: str) -> _Located:
    model = client.get_logged_model(model_id)
    if str(model.status) != "READY":
        raise BadInput(f"{where}: logged model {model_id} is {model.status}, not READY "
                       "(its logging did not finish)")
    root = str(model.artifact_location)
    _check_artifact_location(root, tracking, where)
    return _Located(root, resolved)


def _run_model(client: Any, run_id: str, path: str, tracking: str, where: str) -> _Located:
    run = client.get_run(run_id)
    resolved = f"runs:/{run_id}/{path}"
    # MLflow 3: log_model(name=PATH) in a run makes a LoggedModel PATH whose source run is
    # the run (its files are the model's, not the run's). Older models sit in the run.
    name = path.split("/", 1)[0]
    token: str | None = None
    while True:
        page = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                           filter_string=f"name = '{name}'", page_token=token)
        for model in page:
            if model.source_run_id == run_id and path == name:
                located = _logged_model(client, model.model_id, resolved, tracking, where)
                return _Located(located.root, f"{resolved} ({model.model_id})")
        token = page.token
        if not token:
            break
    root = f"{str(run.info.artifact_uri).rstrip('/')}/{path}"
    _check_artifact_location(root, tracking, where)
    return _Located(root, resolved)


def _model_id_of(source: str) -> str | None:
    m = _MODEL_ID.fullmatch(source)
    return m.group(1) if m else None


def _check_artifact_location(root: str, tracking: str, where: str) -> None:
    """A remote server does not get to make us copy files of this machine."""
    remote = urlparse(tracking).scheme in ("http", "https", "databricks")
    if remote and urlparse(root).scheme in ("", "file"):
        raise BadInput(f"{where}: the server gives a local path as the artifact location "
                       f"({root}); refused (run the server with --serve-artifacts)")


# -- MLmodel and the flavors ------------------------------------------------------------

def _read_mlmodel(path: Path, where: str) -> Mapping[str, Mapping[str, Any]]:
    import yaml  # type: ignore[import-untyped]

    if path.stat().st_size > 1 << 20:
        raise BadInput(f"{where}: MLmodel is larger than 1 MiB")
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    flavors = doc.get("flavors") if isinstance(doc, dict) else None
    if not isinstance(flavors, dict) or not flavors or not all(
        isinstance(k, str) and isinstance(v, dict) for k, v in flavors.items()
    ):
        raise BadInput(f"{where}: MLmodel lists no flavors")
    return flavors


def _choose(flavors: Mapping[str, Mapping[str, Any]], where: str) -> _Choice:
    """The first flavor in :data:`PREFERENCE` that can be taken, else the first refusal."""
    refusals: list[BadInput] = []
    for flavor in PREFERENCE:
        if flavor not in flavors:
            continue
        try:
            return _take(flavor, flavors, where)
        except BadInput as e:
            refusals.append(e)
    if refusals:
        raise refusals[0]
    for flavor, why in _PICKLE_FLAVORS.items():
        if flavor in flavors:
            raise BadInput(f"{where}: the {flavor} flavor ({why}) {_PICKLE_ADVICE}")
    pyfunc = flavors.get("python_function", {})
    if pyfunc.get("loader_module") == "mlflow.pyfunc.model":
        python_model = str(pyfunc.get("python_model", ""))
        if "cloudpickle_version" in pyfunc or python_model.endswith(".pkl"):
            raise BadInput(f"{where}: the python_function flavor (a PythonModel stored with "
                           f"cloudpickle) {_PICKLE_ADVICE}")
        raise BadInput(f"{where}: a python_function model defined by code ({python_model}) is "
                       "not a model file Passerelle can take; log it as ONNX (mlflow.onnx)")
    raise BadInput(f"{where}: flavors {', '.join(sorted(flavors))}: none Passerelle takes "
                   "(onnx, tensorflow/keras with a Keras model, sklearn saved with skops)")


def _take(flavor: str, flavors: Mapping[str, Mapping[str, Any]], where: str) -> _Choice:
    conf = flavors[flavor]
    if flavor == "onnx":
        data = _relative(conf.get("data", "model.onnx"), where)
        return _Choice("onnx", "onnx", lambda f: f.onnx(data))
    if flavor in ("tensorflow", "keras"):
        # MLflow 2 wrote both flavors for tf.keras models; the keras one describes the file.
        conf = flavors.get("keras", conf)
        model_type = conf.get("model_type", "keras")
        if model_type != "keras":
            raise BadInput(f"{where}: the {flavor} flavor holds a {model_type} model, not a "
                           "Keras model; log the Keras model itself, or as ONNX (mlflow.onnx)")
        if conf.get("save_exported_model"):
            raise BadInput(f"{where}: the keras flavor holds an exported inference artifact "
                           "(save_exported_model=True), not a Keras model; log it with "
                           "save_exported_model=False")
        data = _relative(conf.get("data", "data"), where)
        return _Choice(flavor, "keras", lambda f: f.keras(data))
    assert flavor == "sklearn"  # noqa: S101  (PREFERENCE)
    fmt = conf.get("serialization_format", "cloudpickle")
    if fmt != "skops":
        raise BadInput(f"{where}: the sklearn flavor (serialization_format={fmt!r}) "
                       f"{_PICKLE_ADVICE}")
    data = _relative(conf.get("pickled_model", "model.skops"), where)
    if not data.endswith(".skops"):
        raise BadInput(f"{where}: the sklearn flavor says skops but its file is {data!r}")
    return _Choice("sklearn", "sklearn", lambda f: f.file(data))


def _relative(value: object, where: str) -> str:
    """A path inside the model's artifacts, as MLmodel gives it (never .., never absolute)."""
    text = str(value) if isinstance(value, str) else ""
    parts = text.split("/")
    if not text or text.startswith("/") or "\\" in text or set(parts) & _SEGMENT_BAD:
        raise BadInput(f"{where}: MLmodel names {value!r}, not a path inside the model")
    return text


# -- downloads ----------------------------------------------------------------------------

# What a vendor's MLflow may make us download for one model, in all (MLmodel and the
# flavor's files): checked on the sizes MLflow lists before each download, and on the
# bytes on disk after it (a server may list less than it serves).
MAX_DOWNLOAD_BYTES = 4 << 30


class _Fetcher:
    """Downloads files of one model's artifacts into ``dst``, keeping their relative paths,
    at most :data:`MAX_DOWNLOAD_BYTES` in all."""

    def __init__(self, root: str, tracking: str, dst: Path, where: str) -> None:
        self.root = root.rstrip("/")
        self.tracking = tracking
        self.dst = dst
        self.where = where

    def _listed_bytes(self, rel: str) -> int:
        """The size MLflow lists for ``rel``, a file or a folder (summed, recursively)."""
        import mlflow.artifacts

        parent, name = posixpath.dirname(rel), posixpath.basename(rel)
        infos = mlflow.artifacts.list_artifacts(
            artifact_uri=self._uri(parent) if parent else self.root,
            tracking_uri=self.tracking) or []
        for info in infos:
            if posixpath.basename(str(info.path)) == name:
                return self._folder_bytes(rel) if info.is_dir else int(info.file_size or 0)
        return 0  # not listed: the download says it is missing

    def _folder_bytes(self, rel: str) -> int:
        import mlflow.artifacts

        total = 0
        for info in mlflow.artifacts.list_artifacts(artifact_uri=self._uri(rel),
                                                    tracking_uri=self.tracking) or []:
            child = posixpath.join(rel, posixpath.basename(str(info.path)))
            total += self._folder_bytes(child) if info.is_dir else int(info.file_size or 0)
        return total

    def _on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.dst.rglob("*")
                   if p.is_file() and not p.is_symlink())

    def _check_size(self, more: int, rel: str) -> None:
        total = self._on_disk() + more
        if total > MAX_DOWNLOAD_BYTES:
            raise BadInput(f"{self.where}: the model's files would take {total} bytes "
                           f"(with {rel}), more than the {MAX_DOWNLOAD_BYTES} bytes Passerelle "
                           "downloads for one model")

    def _uri(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def download(self, rel: str) -> Path:
        """``rel`` (a file or a folder) -> ``dst/rel``; missing: :class:`BadInput`."""
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        self._check_size(self._listed_bytes(rel), rel)  # before: what MLflow lists
        parent = self.dst / posixpath.dirname(rel)
        parent.mkdir(parents=True, exist_ok=True)
        try:
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=self._uri(rel), dst_path=str(parent), tracking_uri=self.tracking))
        except MlflowException as e:
            # "The following failures occurred ...:\n##### File X #####\n<the cause>"
            lines = [s.strip() for s in str(e.message).splitlines() if s.strip()]
            raise BadInput(f"{self.where}: artifact {rel} is missing or cannot be downloaded "
                           f"from {_redact(self.root)} ({_first_line(lines[-1])})") from e
        target = self.dst / rel
        if not target.exists() or local.resolve() != target.resolve():
            raise BadInput(f"{self.where}: artifact {rel} is missing")
        self._check_size(0, rel)  # after: what came (a server may list less)
        return target

    def listing(self, rel: str) -> dict[str, bool]:
        """Names directly under the folder ``rel`` -> is a folder."""
        import mlflow.artifacts

        infos = mlflow.artifacts.list_artifacts(artifact_uri=self._uri(rel),
                                                tracking_uri=self.tracking) or []
        return {posixpath.basename(str(i.path)): bool(i.is_dir) for i in infos}

    def file(self, rel: str) -> Path:
        path = self.download(rel)
        if not path.is_file():
            raise BadInput(f"{self.where}: artifact {rel} is not a file")
        return path

    def keras(self, data: str) -> Path:
        """The Keras model MLflow's tensorflow or keras flavor wrote under ``data``."""
        entries = self.listing(data)
        if entries.get("model.keras") is False:
            return self.file(f"{data}/model.keras")
        if entries.get("model") is True:
            path = self.download(f"{data}/model")
            if not (path / "saved_model.pb").is_file():
                raise BadInput(f"{self.where}: {data}/model holds no saved_model.pb")
            return path
        if "model.h5" in entries:
            raise BadInput(f"{self.where}: the Keras model is an HDF5 file (save_format='h5'), "
                           "which Passerelle does not take; log it with save_format 'tf' "
                           "(SavedModel) or as a .keras file")
        raise BadInput(f"{self.where}: artifact {data}/model (the Keras model) is missing")

    def onnx(self, rel: str) -> Path:
        """The ONNX file and the external tensor data files it names."""
        import onnx
        from onnx.external_data_helper import _get_all_tensors, uses_external_data

        path = self.file(rel)
        model = onnx.load(str(path), load_external_data=False)
        base = posixpath.dirname(rel)
        for location in sorted({
            entry.value for t in _get_all_tensors(model) if uses_external_data(t)
            for entry in t.external_data if entry.key == "location"
        }):
            self.file(posixpath.join(base, _relative(location, self.where)) if base
                      else _relative(location, self.where))
        return path


def _tree_digest(dst: Path, where: str) -> str:
    """sha256 of the canonical {relative path: sha256} of every file under ``dst``."""
    files: dict[str, str] = {}
    for path in sorted(dst.rglob("*")):
        if path.is_symlink():
            raise BadInput(f"{where}: the download holds a symbolic link "
                           f"({path.relative_to(dst)})")
        if path.is_file():
            files[path.relative_to(dst).as_posix()] = sha256_file(path)
    return sha256_bytes(canonical_json(files))


def _finish(path: Path, framework: Framework, where: str) -> Path:
    """Make the chosen file stand alone where loaders expect it."""
    if framework == "onnx":
        return _inline_onnx(path, where)
    if framework == "keras" and path.is_file() and not zipfile.is_zipfile(path):
        raise BadInput(f"{where}: {path.name} is not a .keras archive")
    return path


def _inline_onnx(path: Path, where: str) -> Path:
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    header = onnx.load(str(path), load_external_data=False)
    external = {entry.value for t in _get_all_tensors(header) if uses_external_data(t)
                for entry in t.external_data if entry.key == "location"}
    if not external:
        return path
    model = onnx.load(str(path))  # reads the external files beside it (checked: inside dst)
    if model.ByteSize() >= 2**31:
        raise BadInput(f"{where}: the ONNX model is 2 GiB or more with its tensor data")
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, path)
    for location in external:
        (path.parent / location).unlink()
    return path
