"""Input scaling that does not amplify noise: a floored standardisation, or a known pixel range.

A plain standardisation divides each feature by its standard deviation in the training
rows. A feature that is (nearly) constant there, a pixel that is almost never inked, gets
a divisor near zero, so a little ink at serving time becomes an enormous input and the
model answers confidently and wrongly. Two remedies, chosen per spec:

- **Tabular features** are centred on their training mean and divided by their standard
  deviation, floored at :data:`SCALE_FLOOR` of their training range. The floor bounds every
  training value to within ``1 / SCALE_FLOOR`` scale units of the mean; no feature of the
  built-in tabular specs is near it (their smallest std is 7.6 % of the range), only sparse
  ones are. A feature constant in training gets scale 1, as scikit-learn's ``StandardScaler``
  does, so its value passes through centred and unamplified.
- **Image specs** declare their pixel range (``PIXEL_RANGE``); every pixel is mapped from
  that range onto ``[0, 1]``, whatever the training rows happened to hold.

The scaling lives inside the model as a ``Normalization`` layer with fixed mean and variance
(:meth:`InputScaling.layer`), so clients keep sending raw values, and the shallow baselines
see the same scaled features (:meth:`InputScaling.transform`).

Example:

```python
scaling = fit_scaling(x_train, pixel_range=None)
model = spec.build_model(scaling.layer(), hparams)
print(scaling.describe(feature_names)["floored"])
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import keras

SCALE_FLOOR = 0.05
"""The smallest scale of a non-constant feature, as a share of its training range."""

ScalingKind = Literal["standardize", "pixel_range"]


@dataclass(frozen=True)
class InputScaling:
    """How raw features become model inputs, ``(x - offset) / scale``, and where they live.

    Attributes:
        kind: ``"standardize"`` (floored, tabular) or ``"pixel_range"`` (image specs).
        offset: Subtracted per feature: the training mean, or the pixel range's low end.
        scale: Divided per feature: the floored standard deviation, or the range's width.
        floored: Per feature, whether the floor (or the constant-feature rule) replaced
            its standard deviation.
        low: Per feature, the low end of the range inputs are expected in: the training
            minimum, or the pixel range's low end.
        high: Per feature, the high end of that range.
        train_min: Per feature, the training minimum (for both kinds).
        train_max: Per feature, the training maximum (for both kinds).
        train_std: Per feature, the training standard deviation (for both kinds).
    """

    kind: ScalingKind
    offset: np.ndarray
    scale: np.ndarray
    floored: np.ndarray
    low: np.ndarray
    high: np.ndarray
    train_min: np.ndarray
    train_max: np.ndarray
    train_std: np.ndarray

    @property
    def constant(self) -> np.ndarray:
        """Per feature, whether it held one value in every training row."""
        return self.train_max - self.train_min <= 1e-12 * np.maximum(1.0, np.abs(self.train_max))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Scales raw rows the way the model's first layer does (for the shallow baselines)."""
        return ((np.asarray(x, dtype=np.float64) - self.offset) / self.scale).astype(np.float32)

    def layer(self) -> keras.layers.Normalization:
        """A ``Normalization`` layer with this offset and scale, named ``normalization``.

        Its mean and variance are fixed in its config, so the layer needs no ``adapt``,
        saves with the model, and exports to SavedModel and ONNX as two constants.
        """
        import keras

        layer = keras.layers.Normalization(
            axis=-1,
            mean=self.offset.astype(np.float32),
            variance=np.square(self.scale).astype(np.float32),
            name="normalization",
        )
        # Built now, eagerly: built on its first call inside a model it would make its
        # mean and variance tensors in whatever graph that call traces (a subclassed
        # model's first call does), and an eager call later could not use them.
        layer.build((None, len(self.offset)))
        return layer

    def describe(self, feature_names: list[str]) -> dict[str, Any]:
        """The ``"scaling"`` entry of ``baseline.json``: the kind, the floor and what it touched."""
        return {
            "kind": self.kind,
            "scale_floor": SCALE_FLOOR if self.kind == "standardize" else None,
            "floored": [name for name, hit in zip(feature_names, self.floored, strict=True) if hit],
        }


def fit_scaling(
    x_train: np.ndarray, pixel_range: tuple[float, float] | None = None, *, floor: float = SCALE_FLOOR
) -> InputScaling:
    """Fits the scaling of a spec's inputs on its training rows.

    Args:
        x_train: Raw training features, ``[n, n_features]``.
        pixel_range: The spec's ``PIXEL_RANGE``, or None for tabular features. Defaults
            to None.
        floor: Smallest scale as a share of each feature's training range. Defaults to
            :data:`SCALE_FLOOR`.

    Returns:
        The scaling; nothing in it depends on rows other than ``x_train``.

    Example:
        >>> x = np.array([[0.0, 1.0], [0.0, 3.0]], dtype=np.float32)
        >>> fit_scaling(x).scale.tolist()
        [1.0, 1.0]
    """
    x = np.asarray(x_train, dtype=np.float64)
    n_features = x.shape[1]
    train_min, train_max, std = x.min(axis=0), x.max(axis=0), x.std(axis=0)
    if pixel_range is not None:
        low, high = (float(v) for v in pixel_range)
        return InputScaling(
            kind="pixel_range",
            offset=np.full(n_features, low),
            scale=np.full(n_features, high - low),
            floored=np.zeros(n_features, dtype=bool),
            low=np.full(n_features, low),
            high=np.full(n_features, high),
            train_min=train_min,
            train_max=train_max,
            train_std=std,
        )
    spread = train_max - train_min
    constant = spread <= 1e-12 * np.maximum(1.0, np.abs(train_max))
    floored_std = np.maximum(std, floor * spread)
    scale = np.where(constant, 1.0, floored_std)
    # The floor "touched" a feature when it raised the divisor by more than rounding.
    floored = constant | (floored_std > std * (1.0 + 1e-9))
    return InputScaling(
        kind="standardize",
        offset=x.mean(axis=0),
        scale=scale,
        floored=floored,
        low=train_min,
        high=train_max,
        train_min=train_min,
        train_max=train_max,
        train_std=std,
    )
