"""A vendor's custom Keras layer, importable as ``tests.custom_layers:Scale`` (not
registered with Keras: loading a model that uses it needs ``--custom-objects``)."""

from __future__ import annotations

from typing import Any

import tensorflow as tf


class Scale(tf.keras.layers.Layer):  # type: ignore[misc]
    """Multiplies its input by a fixed factor."""

    def __init__(self, factor: float = 2.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x: Any) -> Any:
        return x * self.factor

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "factor": self.factor}
