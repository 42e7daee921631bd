"""registry.sources: what it takes of a vendor's scikit-learn file, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from passerelle.errors import BadInput
from registry.sources import load_source


def _forest(tmp_path: Path) -> tuple[object, np.ndarray]:
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(0)
    x = rng.random((80, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 1).astype(int) + (x[:, 2] > 0.5)
    return RandomForestClassifier(n_estimators=3, max_depth=4, random_state=0).fit(x, y), x


def test_a_random_forest_loads_once_its_trees_are_checked(tmp_path: Path) -> None:
    """skops does not trust sklearn's Tree by default (unchecked node indices): Passerelle
    trusts it only after checking every node array, and the forest predicts as saved."""
    import skops.io

    forest, x = _forest(tmp_path)
    skops.io.dump(forest, tmp_path / "forest.skops")
    assert skops.io.get_untrusted_types(file=tmp_path / "forest.skops") == [
        "sklearn.tree._tree.Tree"]
    loaded = load_source(tmp_path / "forest.skops", "sklearn")
    assert np.array_equal(loaded.predict_proba(x), forest.predict_proba(x))  # type: ignore[attr-defined]


@pytest.mark.parametrize("field, value", [("left_child", 10**6), ("right_child", 0),
                                          ("feature", 99)])
def test_a_crafted_tree_is_refused_before_it_can_run(tmp_path: Path, field: str,
                                                     value: int) -> None:
    """A node pointing outside the tree (or back to the root: a cycle), or splitting on a
    feature the model does not have, would make scikit-learn read out of bounds at the
    first prediction: refused at load, with one line."""
    import skops.io
    from sklearn.tree._tree import Tree

    forest, _ = _forest(tmp_path)
    est = forest.estimators_[0]  # type: ignore[attr-defined]
    state = est.tree_.__getstate__()
    nodes = state["nodes"].copy()
    nodes[field][0] = value
    state["nodes"] = nodes
    crafted = Tree(est.n_features_in_, np.asarray([est.n_classes_], dtype=np.intp),
                   est.n_outputs_)
    crafted.__setstate__(state)
    est.tree_ = crafted
    skops.io.dump(forest, tmp_path / "crafted.skops")
    with pytest.raises(BadInput, match="node arrays are out of bounds"):
        load_source(tmp_path / "crafted.skops", "sklearn")
