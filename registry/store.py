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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from passerelle.errors import BadInput, ModelNotFound, RegistryError
from registry.model_dir import ModelDir

EXPERIMENT = "passerelle"
TAG = "passerelle."
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class PrivacyUnit(StrEnum):
    PATIENT = "patient"
    STAY = "stay"


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
        if not sep or not _NAME.match(name) or not version.isdigit():
            raise BadInput(f"{text!r} is not NAME/VERSION (e.g. pmsi-coder/1)")
        return cls(name, str(int(version)))


@dataclass(frozen=True)
class VersionInfo:
    ref: VersionRef
    run_id: str
    source: str
    tags: Mapping[str, str]


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
        from mlflow import MlflowClient

        # MLflow sets its loggers up when imported; quiet them after that.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)

        self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self._experiment_id: str | None = None

    @property
    def client(self) -> Any:
        return self._client

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
                 on_registered: Callable[[VersionInfo], None] | None = None) -> VersionInfo:
        """Log the model directory in a run and make it a new version of ``name``.

        ``on_registered(version)`` runs last (the ledger records the act there). On any
        failure, its own included, the run, the version (and a registered model this call
        created) are deleted, so the registry is as it was.
        """
        tags = {
            **provenance.tags(),
            TAG + "framework": model_dir.metadata.framework.value,
            TAG + "architecture": model_dir.metadata.architecture,
            TAG + "model_dir_digest": model_dir.digest,
        }
        from registry.tracking import accuracy_metrics

        return self._new_version(name, f"register {name} (trained at "
                                 f"{provenance.training_site})", model_dir.path, "model", tags,
                                 _run_params(model_dir), on_registered,
                                 accuracy_metrics(model_dir.metadata.metrics))

    def register_received(self, model_dir: Path, name: str, tags: Mapping[str, str],
                          on_registered: Callable[[VersionInfo], None] | None = None,
                          run_name: str | None = None,
                          metrics: Mapping[str, float] | None = None) -> VersionInfo:
        """Register a model received from another site (or fine-tuned here): a new run
        logging ``model_dir`` under ``onnx/`` and a new version of ``name`` carrying
        ``tags`` (its lineage) and ``metrics`` on its run. The run is named after what
        happened (see :func:`registry.tracking.run_name`). Undone entirely on any failure, as
        :meth:`register`."""
        from registry.tracking import run_name as name_of

        return self._new_version(name, run_name or name_of(name, tags, TAG), model_dir,
                                 "onnx", dict(tags), {}, on_registered, metrics)

    def _new_version(
        self, name: str, run_name: str, local_dir: Path, artifact_path: str,
        tags: Mapping[str, str], params: Mapping[str, str],
        on_registered: Callable[[VersionInfo], None] | None,
        metrics: Mapping[str, float] | None = None,
    ) -> VersionInfo:
        """One run holding ``local_dir`` under ``artifact_path`` (with an ``MLmodel`` file
        giving its signature), one new version of ``name``."""
        from registry.tracking import log_signature

        if not _NAME.match(name):
            raise BadInput(f"{name!r} is not a valid model name (letters, digits, . _ -)")
        from mlflow.exceptions import MlflowException

        experiment = self._experiment()
        client = self._client
        created_model = False
        run_id = None
        version: str | None = None
        try:
            with _store_errors(self.uri):
                run = client.create_run(experiment, run_name=run_name)
                run_id = run.info.run_id
                client.log_artifacts(run_id, str(local_dir), artifact_path)
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
                    client.create_registered_model(name)
                    created_model = True
                mv = client.create_model_version(
                    name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id,
                    tags=dict(tags))
                version = str(mv.version)
            info = self.get(VersionRef(name, version))
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
                self._client.delete_run(run_id)
        except Exception:  # noqa: S110 - best effort; the original error is re-raised
            pass

    def get(self, ref: VersionRef) -> VersionInfo:
        """The version, or :class:`ModelNotFound`."""
        from mlflow.exceptions import MlflowException

        try:
            with _store_errors(self.uri, passthrough=(MlflowException,)):
                mv = self._client.get_model_version(ref.name, ref.version)
        except MlflowException as e:
            if e.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
                raise ModelNotFound(f"no registered model version {ref}") from e
            raise RegistryError(f"model registry at {self.display_uri}: {e.message}") from e
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
        import time

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
        raise RegistryError(f"model registry at {_redact(uri)}: {message}") from e
    except Exception as e:
        if isinstance(e, OSError) or type(e).__module__.startswith(
            ("requests", "urllib3", "sqlalchemy")
        ):
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RegistryError(f"model registry at {_redact(uri)}: {first}") from e
        raise


def _redact(uri: str) -> str:
    """Drop a password from a URI before it is printed."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", uri)
