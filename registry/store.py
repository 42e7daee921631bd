"""The source site's MLflow Model Registry: register versions with provenance, find them,
fetch their artifacts and attach exports to them.

The store is MLflow's own: by default a SQLite database and a local artifact folder
under the site's home; any ``MLFLOW_TRACKING_URI`` (an MLflow server backed by
PostgreSQL, say) works the same way. Nothing here talks to the database directly.

Provenance is written as model-version tags under the ``passerelle.`` prefix; the
dataset fingerprint is the digest of the training corpus manifest, never the data.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from passerelle.contract import PrivacyUnit as PrivacyUnit
from passerelle.errors import BadInput, ModelNotFound, Refused, RegistryError
from registry.model_dir import ModelDir

EXPERIMENT = "passerelle"
TAG = "passerelle."
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# SENDER.MODEL (transfer.exchange.received_name): a site name (64) and a model name (128)
_RECEIVED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,192}$")
RECEIVE_TAG = TAG + "receive"  # on the run of a received model: the local name
# On the run of a local registration (``model register``, ``finetune``): "FINGERPRINT NAME"
# (the site's identity fingerprint, "" without one), so that what a killed registration
# left can be told apart from anything else in a shared registry (clean_unrecorded).
REGISTER_TAG = TAG + "register"
FINETUNE_TAG = TAG + "finetune"
# Test hook for the kill tests: seconds to sleep once the new version exists, before its
# ledger record (on_registered) is written.
SLEEP_BEFORE_RECORD_ENV = "PASSERELLE_TEST_SLEEP_BEFORE_RECORD"


def run_mark(site_fingerprint: str, name: str) -> str:
    """The value of :data:`RECEIVE_TAG`, :data:`REGISTER_TAG` or :data:`FINETUNE_TAG` on
    the run of a version of ``name`` made at the site with this fingerprint."""
    return f"{site_fingerprint} {name}"


class NameTaken(Refused):
    """A registered model name that holds another model (received models are never
    merged into a local model, nor local ones into a received model)."""


@dataclass(frozen=True)
class Provenance:
    """Why and from what a model was made; every field becomes a version tag."""

    purpose: str
    legal_basis: str
    data_controller: str
    training_site: str
    privacy_unit: PrivacyUnit
    dataset_fingerprint: str

    def __post_init__(self) -> None:
        for name in ("purpose", "legal_basis", "data_controller", "training_site"):
            value = getattr(self, name)
            if not value.strip() or "\n" in value or len(value) > 500:
                raise BadInput(f"{name.replace('_', ' ')} must be one non-empty line")
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", self.dataset_fingerprint):
            raise BadInput("dataset fingerprint must be a sha256 digest")

    def tags(self) -> dict[str, str]:
        return {
            TAG + "purpose": self.purpose,
            TAG + "legal_basis": self.legal_basis,
            TAG + "data_controller": self.data_controller,
            TAG + "training_site": self.training_site,
            TAG + "privacy_unit": self.privacy_unit.value,
            TAG + "dataset_fingerprint": self.dataset_fingerprint,
        }


@dataclass(frozen=True)
class VersionRef:
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"

    @classmethod
    def parse(cls, text: str) -> VersionRef:
        name, sep, version = text.rpartition("/")
        if not sep or not _RECEIVED_NAME.match(name) or not version.isdigit():
            raise BadInput(f"{text!r} is not NAME/VERSION (e.g. pmsi-coder/1)")
        return cls(name, str(int(version)))


@dataclass(frozen=True)
class VersionInfo:
    ref: VersionRef
    run_id: str
    source: str
    tags: Mapping[str, str]


HTTP_DEFAULTS = {
    # MLflow waits 120 s per request and retries 7 times with exponential backoff (about
    # 4 minutes of silence against a server that is down). Ours: at most 3 attempts of
    # 10 s each. The user's own values win (set them in the environment).
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
"""Connection settings for MLflow tracking servers (http:// and https:// stores)."""


def default_tracking_uri(home: Path) -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite store in the site's home."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home.resolve() / 'mlflow.db'}"


class ModelStore:
    """A thin, typed face over one MLflow tracking and registry store."""

    def __init__(self, home: Path, tracking_uri: str | None = None) -> None:
        self.home = home
        self.uri = tracking_uri or default_tracking_uri(home)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        # MLflow prints run links on stdout for HTTP stores, which would break --json.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        if self.uri.startswith(("http://", "https://")):
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
        self._client_cache: Any = None
        self._experiment_id: str | None = None

    @property
    def _client(self) -> Any:
        """The MlflowClient, made on first use: MLflow (~180 MB resident) is imported
        only by commands that reach the registry, after their own checks."""
        if self._client_cache is None:
            from mlflow import MlflowClient

            # MLflow sets its loggers up when imported; quiet them after that.
            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)
            with _store_errors(self.uri):  # a bogus URI is one line, not a traceback
                client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            if self.uri.startswith("sqlite:") and self.home.is_dir():
                # Two first commands on a fresh home would both create MLflow's schema
                # (and one fail): create it under the home's lock.
                with _home_lock(self.home), _store_errors(self.uri):
                    client.search_experiments(max_results=1)
                    client.search_registered_models(max_results=1)
            self._client_cache = client
        return self._client_cache

    @property
    def client(self) -> Any:
        return self._client

    def _absent(self) -> bool:
        """Whether the store is this home's SQLite database and it was never created."""
        return (self.uri == f"sqlite:///{self.home.resolve() / 'mlflow.db'}"
                and not (self.home / "mlflow.db").exists())

    def check_reachable(self) -> None:
        """Reach the store now with one cheap request (RegistryError if it cannot be), so a
        long step finds a server that is down first; this home's SQLite store that does
        not exist yet is not created to say so."""
        if self._absent():
            return
        with _store_errors(self.uri):
            self._client.search_registered_models(max_results=1)

    @property
    def display_uri(self) -> str:
        """The store's URI with any password replaced, fit to print."""
        return _redact(self.uri)

    def _experiment(self) -> str:
        if self._experiment_id is None:
            with _store_errors(self.uri):
                exp = self._client.get_experiment_by_name(EXPERIMENT)
                if exp is not None:
                    self._experiment_id = str(exp.experiment_id)
                else:
                    location = None
                    if self.uri.startswith("sqlite:"):
                        location = (self.home.resolve() / "mlartifacts").as_uri()
                    self._experiment_id = str(
                        self._client.create_experiment(EXPERIMENT, artifact_location=location)
                    )
        return str(self._experiment_id)

    def register(self, model_dir: ModelDir, name: str, provenance: Provenance,
                 on_registered: Callable[[VersionInfo], None] | None = None,
                 site: str = "") -> VersionInfo:
        """Log the model directory in a run and make it a new version of ``name``.

        ``on_registered(version)`` runs last (the ledger records the act there). On any
        failure, its own included, the run, the version (and a registered model this call
        created) are deleted, so the registry is as it was. The run is tagged
        :data:`REGISTER_TAG` (``site``: the registering site's fingerprint) so that what a
        killed register left can be removed (:meth:`clean_unrecorded`).
        """
        tags = {
            **provenance.tags(),
            TAG + "framework": model_dir.metadata.framework.value,
            TAG + "architecture": model_dir.metadata.architecture,
            TAG + "model_dir_digest": model_dir.digest,
        }
        meta = model_dir.metadata
        if meta.onnx_digest is not None:  # v2: what the model directory says it ships
            tags |= {TAG + "input_kind": meta.input_kind.value,
                     TAG + "input_dtype": meta.dtype.value,
                     TAG + "source_kind": str(meta.source.get("kind", "")),
                     TAG + "registered_onnx_digest": meta.onnx_digest}
        from registry.tracking import accuracy_metrics

        return self._new_version(name, f"register {name} (trained at "
                                 f"{provenance.training_site})", model_dir.path, "model", tags,
                                 _run_params(model_dir), on_registered,
                                 accuracy_metrics(model_dir.metadata.metrics),
                                 run_tags={REGISTER_TAG: run_mark(site, name)})

    def register_received(self, model_dir: Path, name: str, tags: Mapping[str, str],
                          on_registered: Callable[[VersionInfo], None] | None = None,
                          run_name: str | None = None,
                          metrics: Mapping[str, float] | None = None, *,
                          sender: str | None = None, source_model: str | None = None,
                          receiver: str = "", derived_by: str | None = None) -> VersionInfo:
        """Register a model received from ``sender``: a new run logging ``model_dir``
        under ``onnx/`` and a new version of ``name`` carrying ``tags`` (its lineage) and
        ``metrics`` on its run, named after what happened
        (:func:`registry.tracking.run_name`).

        ``name`` must be free or already hold models received from that sender under
        that source name (:meth:`check_received_name`). The run is tagged
        ``passerelle.receive`` (``receiver`` and ``name``: the receiving site's
        fingerprint, as a registry may be shared) so that a killed receive's leftovers
        can be found (:meth:`clean_received`). Undone entirely on any failure, as :meth:`register`.
        Without ``sender`` (a model derived here from a received one, e.g. fine-tuned),
        a new version of ``name`` with ``tags``, its run tagged ``derived_by`` (the act's
        tag, :data:`FINETUNE_TAG` for ``finetune``; ``receiver``: this site's fingerprint)
        when given.
        """
        from registry.tracking import run_name as name_of

        title = run_name or name_of(name, tags, TAG)
        if sender is None or source_model is None:
            return self._new_version(name, title, model_dir, "onnx", dict(tags), {},
                                     on_registered, metrics,
                                     run_tags={derived_by: run_mark(receiver, name)}
                                     if derived_by else None,
                                     model_tags={}, name_pattern=_RECEIVED_NAME)
        self.check_received_name(name, sender, source_model)
        return self._new_version(
            name, title, model_dir, "onnx", dict(tags), {}, on_registered, metrics,
            run_tags={RECEIVE_TAG: run_mark(receiver, name)},
            model_tags={TAG + "received_from": sender, TAG + "source_model": source_model},
            name_pattern=_RECEIVED_NAME, link=True)

    def check_received_name(self, name: str, sender: str, source_model: str) -> None:
        """Refuse to put a received model under a name that holds something else."""
        from mlflow.exceptions import MlflowException

        try:
            with _store_errors(self.uri, passthrough=(MlflowException,)):
                model = self._client.get_registered_model(name)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return
            raise RegistryError(f"model registry at {self.display_uri}: "
                                f"{_redact(str(e.message))}") from e
        tags = dict(model.tags)
        if tags.get(TAG + "received_from") != sender or \
                tags.get(TAG + "source_model") != source_model:
            raise NameTaken(f"registered model {name!r} is not {source_model!r} received "
                            f"from {sender!r}; the received model is not merged into it")

    def received_versions(self, name: str, bundle_digest: str) -> list[VersionInfo]:
        """The versions of ``name`` registered from the bundle with this file digest."""
        return [v for v in self._version_infos(name)
                if v.tags.get(TAG + "bundle_digest") == bundle_digest]

    def clean_received(self, name: str, keep: Callable[[VersionInfo], bool],
                       receiver: str = "") -> list[str]:
        """Remove what killed receives of ``name`` left (:meth:`clean_unrecorded` of the
        runs tagged :data:`RECEIVE_TAG` by ``receiver``)."""
        return self.clean_unrecorded(name, RECEIVE_TAG, run_mark(receiver, name), keep)

    def clean_unrecorded(self, name: str, run_tag: str, mark: str,
                         keep: Callable[[VersionInfo], bool]) -> list[str]:
        """Remove what killed acts of ``name`` left: versions whose run carries
        ``run_tag = mark`` for which ``keep`` is false (no ledger record), and runs so
        tagged without a version, with their artifacts. Returns what was removed
        (``version NAME/V``, ``run ID``). Call it under a lock that keeps the live acts
        of this mark out (a live act looks like a killed one until it records)."""
        if self._absent():  # nothing was ever registered here
            return []
        with _store_errors(self.uri):
            runs = self._client.search_runs(
                [self._experiment()], filter_string=f"tags.`{run_tag}` = '{mark}'")
        marked = {run.info.run_id for run in runs if run.data.tags.get(run_tag) == mark}
        if not marked:
            return []
        removed = []
        linked = set()
        for info in self._version_infos(name):
            if info.run_id not in marked:
                continue
            if keep(info):
                linked.add(info.run_id)
                continue
            with _store_errors(self.uri):
                self._client.delete_model_version(name, info.ref.version)
            self._drop_run(info.run_id)
            linked.add(info.run_id)
            removed.append(f"version {info.ref}")
        for run_id in sorted(marked - linked):
            self._drop_run(run_id)
            removed.append(f"run {run_id}")
        return removed

    def run_tags(self, info: VersionInfo) -> dict[str, str]:
        """The tags of the version's run (none if the run is not there)."""
        from mlflow.exceptions import MlflowException

        try:
            with _store_errors(self.uri, passthrough=(MlflowException,)):
                run = self._client.get_run(info.run_id)
        except MlflowException:
            return {}
        return {str(k): str(v) for k, v in run.data.tags.items()}

    def _version_infos(self, name: str) -> list[VersionInfo]:
        with _store_errors(self.uri):
            found = self._client.search_model_versions(f"name = '{name}'")
        return [VersionInfo(VersionRef(name, str(v.version)), str(v.run_id), str(v.source),
                            dict(v.tags)) for v in found]

    def _drop_run(self, run_id: str) -> None:
        """Delete a run and, for a local artifact store, its artifacts (delete_run alone
        only marks the run deleted and keeps the files)."""
        from mlflow.exceptions import MlflowException

        try:
            with _store_errors(self.uri, passthrough=(MlflowException,)):
                uri = str(self._client.get_run(run_id).info.artifact_uri)
                self._client.delete_run(run_id)
        except MlflowException:
            return
        _remove_local_artifacts(uri)

    def _new_version(
        self, name: str, run_name: str, local_dir: Path, artifact_path: str,
        tags: Mapping[str, str], params: Mapping[str, str],
        on_registered: Callable[[VersionInfo], None] | None,
        metrics: Mapping[str, float] | None = None,
        run_tags: Mapping[str, str] | None = None,
        model_tags: Mapping[str, str] | None = None,
        name_pattern: re.Pattern[str] | None = None,
        link: bool = False,
    ) -> VersionInfo:
        """One run holding ``local_dir`` under ``artifact_path`` (with an ``MLmodel`` file
        giving its signature), one new version of ``name``.

        ``link``: hard-link the files into a local artifact store instead of copying them;
        only for a folder inside the site's private home that nothing rewrites (a verified
        received bundle's install). A vendor's model directory is always copied: a later
        edit of it must not change what the registry holds."""
        from registry.tracking import log_signature

        if not (name_pattern or _NAME).match(name):
            raise BadInput(f"{name!r} is not a valid model name (letters, digits, . _ -)")
        from mlflow.exceptions import MlflowException

        experiment = self._experiment()
        client = self._client
        created_model = False
        run_id = None
        version: str | None = None
        try:
            with _store_errors(self.uri):
                run = client.create_run(experiment, run_name=run_name, tags=dict(run_tags or {}))
                run_id = run.info.run_id
                _log_artifacts(client, run, local_dir, artifact_path, link)
                log_signature(client, run_id, local_dir, artifact_path, run_name)
                for key, value in params.items():
                    client.log_param(run_id, key, value)
                self._log_metrics(run_id, metrics or {})
                client.set_terminated(run_id)
                try:
                    client.get_registered_model(name)
                except MlflowException as e:
                    if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise
                    client.create_registered_model(name, tags=dict(model_tags or {}))
                    created_model = True
                else:
                    if model_tags is None and TAG + "received_from" in \
                            client.get_registered_model(name).tags:
                        raise NameTaken(f"registered model {name!r} holds models received "
                                        "from another site; a local model is not merged "
                                        "into it")
                mv = client.create_model_version(
                    name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id,
                    tags=dict(tags))
                version = str(mv.version)
            info = self.get(VersionRef(name, version))
            pause = os.environ.get(SLEEP_BEFORE_RECORD_ENV)
            if pause:
                time.sleep(float(pause))
            if on_registered is not None:
                on_registered(info)
        except BaseException:
            self._undo_register(run_id, name if created_model else None,
                                None if created_model else (name, version))
            raise
        return info

    def _undo_register(self, run_id: str | None, model_name: str | None,
                       version: tuple[str, str | None] | None = None) -> None:
        try:
            if version is not None and version[1] is not None:
                self._client.delete_model_version(version[0], version[1])
            if model_name is not None:
                self._client.delete_registered_model(model_name)
            if run_id is not None:
                self._drop_run(run_id)
        except Exception:  # noqa: S110 - best effort; the original error is re-raised
            pass

    def get(self, ref: VersionRef) -> VersionInfo:
        """The version, or :class:`ModelNotFound`."""
        if self._absent():  # nothing registered yet: do not create the store to say so
            raise ModelNotFound(f"no registered model version {ref}")
        from mlflow.exceptions import MlflowException

        try:
            with _store_errors(self.uri, passthrough=(MlflowException,)):
                mv = self._client.get_model_version(ref.name, ref.version)
        except MlflowException as e:
            if e.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
                raise ModelNotFound(f"no registered model version {ref}") from e
            raise RegistryError(f"model registry at {self.display_uri}: "
                                f"{_redact(str(e.message))}") from e
        return VersionInfo(ref=ref, run_id=str(mv.run_id), source=str(mv.source),
                           tags=dict(mv.tags))

    def download(self, info: VersionInfo, artifact_path: str, dst: Path) -> Path:
        with _store_errors(self.uri):
            return Path(self._client.download_artifacts(info.run_id, artifact_path, str(dst)))

    def attach(self, info: VersionInfo, local_dir: Path, artifact_path: str,
               tags: Mapping[str, str]) -> None:
        """Log a directory to the version's run and set version tags."""
        with _store_errors(self.uri):
            self._client.log_artifacts(info.run_id, str(local_dir), artifact_path)
        self.set_tags(info, tags)

    def log_metrics(self, ref: VersionRef, metrics: Mapping[str, float]) -> None:
        """Log figures as MLflow metrics of the version's run (chartable, comparable)."""
        self._log_metrics(self.get(ref).run_id, metrics)

    def _log_metrics(self, run_id: str, metrics: Mapping[str, float]) -> None:
        import math

        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        found = [Metric(key, float(value), stamp, 0) for key, value in sorted(metrics.items())
                 if math.isfinite(float(value))]
        with _store_errors(self.uri):
            for start in range(0, len(found), 500):
                self._client.log_batch(run_id, metrics=found[start:start + 500])

    def set_tags(self, info: VersionInfo, tags: Mapping[str, str]) -> None:
        with _store_errors(self.uri):
            for key, value in tags.items():
                self._client.set_model_version_tag(info.ref.name, info.ref.version, key, value)

    def versions(self, name: str) -> list[str]:
        with _store_errors(self.uri):
            found = self._client.search_model_versions(f"name = '{name}'")
        return sorted((str(v.version) for v in found), key=int)


def _log_artifacts(client: Any, run: Any, local_dir: Path, artifact_path: str,
                   link: bool) -> None:
    """``log_artifacts``; with ``link``, into a local artifact folder on the same file
    system the files are hard-linked (the same bytes, no second copy of a large model)."""
    from urllib.parse import unquote, urlparse

    uri = urlparse(str(run.info.artifact_uri))
    if link and uri.scheme == "file" and all(p.is_file() for p in local_dir.iterdir()):
        target = Path(unquote(uri.path)) / artifact_path
        try:
            target.mkdir(parents=True, exist_ok=False)
            for src in sorted(local_dir.iterdir()):
                os.link(src, target / src.name)
            return
        except OSError:
            shutil.rmtree(target, ignore_errors=True)
    client.log_artifacts(run.info.run_id, str(local_dir), artifact_path)


def _remove_local_artifacts(artifact_uri: str) -> None:
    from urllib.parse import unquote, urlparse

    uri = urlparse(artifact_uri)
    if uri.scheme == "file" and uri.path:
        shutil.rmtree(unquote(uri.path), ignore_errors=True)


@contextmanager
def _home_lock(home: Path) -> Iterator[None]:
    import fcntl

    with (home / ".mlflow.lock").open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _run_params(model_dir: ModelDir) -> dict[str, str]:
    cfg = model_dir.metadata.training.get("config", {})
    flat = {"architecture": model_dir.metadata.architecture,
            "framework": model_dir.metadata.framework.value,
            "n_classes": str(len(model_dir.metadata.codes))}
    for key in ("epochs", "batch_size", "learning_rate", "embedding_dim", "hidden_units",
                "seed"):
        if key in cfg:
            flat[key] = str(cfg[key])
    return flat


@contextmanager
def _store_errors(uri: str, passthrough: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn MLflow and connection failures into one-line :class:`RegistryError`."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except BadInput:
        raise
    except passthrough:
        raise
    except MlflowException as e:
        message = str(e.message).splitlines()[0] if e.message else type(e).__name__
        raise RegistryError(f"model registry at {_redact(uri)}: {_redact(message)}") from e
    except Exception as e:
        if isinstance(e, OSError) or type(e).__module__.startswith(
            ("requests", "urllib3", "sqlalchemy")
        ):
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RegistryError(f"model registry at {_redact(uri)}: {_redact(first)}") from e
        raise


def _redact(uri: str) -> str:
    """Drop a password from a URI, or from a message that quotes one (MLflow's own errors
    quote the whole tracking URL), before it is printed: the password of ``user:password@``
    and the value of a ``password``, ``passwd``, ``pwd``, ``token``, ``secret``,
    ``api_key``, ``access_key`` or ``auth_token`` query parameter (PostgreSQL and
    SQLAlchemy URIs take a password there)."""
    uri = re.sub(r"//([^:/@\s]+):[^@\s]*@", r"//\1:***@", uri)
    return _SECRET_PARAM.sub(r"\1***", uri)


_SECRET_PARAM = re.compile(
    r"([?&;](?:password|passwd|pwd|token|secret|api[_-]?key|access[_-]?key|"
    r"auth[_-]?token)=)[^&;#\s]*", re.IGNORECASE)
