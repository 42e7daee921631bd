"""Lineage for rights requests: which model versions, at which sites, derive from what.

Built only from signed ledger records: this site's own (each signature checked with its
keys) and its peers' exports (``records export``; each checked with the peer's keys in
this site's trust store). A version is a node ``(site, model, version)``; edges:

* ``model_registered`` at S: dataset ``dataset_fingerprint`` -> (S, model, version);
* ``finetune`` at S: dataset -> (S, model, version) and (S, model, source_version) ->
  (S, model, version);
* ``bundle_received`` at S: (from, model, version) -> (S, local_model, local_version);
* ``bundle_created`` at S to R, when no record of R's ledger names it: (S, model,
  version) -> (R, model, ``?``), status ``unknown`` (R's export would tell);
* status ``withdrawn`` when a ``model_withdrawn`` or ``notice_received`` record of the
  site holding it names the version, else ``active``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from passerelle.errors import BadInput, Refused
from registry.store import VersionRef
from transfer.deploy import finished, site_records
from transfer.identity import public_identity
from transfer.ledger import read_export, verify_records
from transfer.ledger_site import peer_keys
from transfer.records import Record, RecordKind

Node = tuple[str, str, str]  # site, model, version ("?" when unknown)


@dataclass(frozen=True)
class Derived:
    site: str
    model: str
    version: str
    status: str  # active, withdrawn, unknown
    derived_from: str | None  # "site:model/version" or "dataset:<digest>"
    how: str

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "model": self.model, "version": self.version,
                "status": self.status, "derived_from": self.derived_from, "how": self.how}


class _Graph:
    def __init__(self) -> None:
        self.edges: dict[str, list[tuple[Node, str]]] = {}
        self.withdrawn: set[Node] = set()
        self.received_records: set[str] = set()

    def add(self, parent: str, child: Node, how: str) -> None:
        entries = self.edges.setdefault(parent, [])
        if all(c != child for c, _ in entries):
            entries.append((child, how))

    def read(self, records: Sequence[Record]) -> None:
        for r in records:
            f, s = r.fields, r.site
            if r.kind is RecordKind.MODEL_REGISTERED and _strs(f, "model", "version"):
                if isinstance(f.get("dataset_fingerprint"), str) and f["dataset_fingerprint"]:
                    self.add(f"dataset:{f['dataset_fingerprint']}",
                             (s, f["model"], f["version"]), "trained on the dataset")
            elif r.kind is RecordKind.FINETUNE and finished(r) and _strs(f, "model", "version"):
                child = (s, f["model"], f["version"])
                if isinstance(f.get("dataset"), str):
                    self.add(f"dataset:{f['dataset']}", child, "fine-tuned on the dataset")
                if isinstance(f.get("source_version"), str):
                    self.add(_key((s, f["model"], f["source_version"])), child,
                             "fine-tuned from it")
            elif r.kind is RecordKind.BUNDLE_RECEIVED and _strs(
                    f, "from", "model", "version", "local_model", "local_version"):
                self.add(_key((f["from"], f["model"], f["version"])),
                         (s, f["local_model"], f["local_version"]),
                         f"received from {f['from']}")
                if isinstance(f.get("peer_record"), str):
                    self.received_records.add(f["peer_record"])
            elif r.kind in (RecordKind.MODEL_WITHDRAWN, RecordKind.NOTICE_RECEIVED):
                for text in f.get("withdrawn", []):
                    if isinstance(text, str) and "/" in text:
                        name, _, version = text.rpartition("/")
                        self.withdrawn.add((s, name, version))

    def read_sent(self, records: Sequence[Record]) -> None:
        """Transfers whose receiving end is not among the records read."""
        for r in records:
            f = r.fields
            if r.kind is RecordKind.BUNDLE_CREATED and _strs(f, "model", "version") and \
                    r.id not in self.received_records:
                for site in f.get("to", []):
                    if isinstance(site, str):
                        self.add(_key((r.site, f["model"], f["version"])),
                                 (site, f["model"], "?"),
                                 f"sent by {r.site} (no record of {site} read)")

    def descendants(self, root: str) -> list[Derived]:
        out: list[Derived] = []
        seen: set[Node] = set()
        todo = [root]
        while todo:
            parent = todo.pop(0)
            for child, how in self.edges.get(parent, []):
                if child in seen:
                    continue
                seen.add(child)
                status = "unknown" if child[2] == "?" else \
                    "withdrawn" if child in self.withdrawn else "active"
                out.append(Derived(*child, status, parent, how))
                todo.append(_key(child))
        return out


def _key(node: Node) -> str:
    return f"{node[0]}:{node[1]}/{node[2]}"


def _strs(fields: Any, *names: str) -> bool:
    return all(isinstance(fields.get(n), str) for n in names)


def peer_records(home: Path, export: Path) -> list[Record]:
    """A peer's ledger export, every record signed by that peer's pinned keys."""
    records = read_export(export)
    sites = {r.site for r in records}
    if len(sites) != 1:
        raise BadInput(f"{export}: not one site's ledger export")
    site = sites.pop()
    verify_records(records, peer_keys(home, site))
    return records


def lineage(home: Path, dataset: str | None = None, model: VersionRef | None = None,
            peers: Sequence[Path] = (), url: str | None = None) -> list[Derived]:
    """Every version derived from ``dataset`` (a corpus fingerprint) or from ``model`` (a
    version of this site's registry), itself included, with its site and status."""
    if (dataset is None) == (model is None):
        raise BadInput("name exactly one of --dataset DIGEST or --model NAME/VERSION")
    if dataset is not None and not re.fullmatch(r"(sha256|hmac):[0-9a-f]{64}", dataset):
        raise BadInput(f"{dataset!r} is not a dataset fingerprint (sha256:<64 hex digits>, or "
                       "hmac:<64 hex digits> as this site's keyed dataset digests are)")
    own = site_records(home, url)
    if not own and not peers:
        raise Refused("this home has no ledger to answer from (run `passerelle site init`)")
    graph = _Graph()
    everything = list(own)
    for export in peers:
        everything += peer_records(home, export)
    graph.read(everything)
    graph.read_sent(everything)
    if dataset is not None:
        return graph.descendants(f"dataset:{dataset}")
    assert model is not None  # noqa: S101 - checked above
    me = public_identity(home).site
    node = (me, model.name, model.version)
    status = "withdrawn" if node in graph.withdrawn else "active"
    return [Derived(*node, status, None, "this site's version"),
            *graph.descendants(_key(node))]
