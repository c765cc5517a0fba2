"""Topics of Python's documentation: a text classifier served through ``model.py``.

The sentences come from ``pydoc_data.topics``, the reference text that ships with every
Python (what ``help("FORMATTING")`` prints): each sentence of five sections is labelled
with its section's topic. Nothing is downloaded. The network trains on a hashed bag of
words (:func:`~modelloop.training.specs.text_topics_model.featurize`); the exported
version serves strings: its ``model.py`` (the module ``text_topics_model``, shipped as it
is) featurizes them, runs ``model.onnx`` and returns the probabilities and the label.

The served input is ``text``, BYTES ``[-1]`` (one string per row); the outputs are
``probabilities``, float32 ``[-1, 5]``, and ``label``, BYTES ``[-1]``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np

from modelloop.training.spec import Choice, Dataset, FloatRange, IntRange, PythonModel
from modelloop.training.specs._layers import dense_block
from modelloop.training.specs.text_topics_model import (
    LABEL_OUTPUT,
    PROBABILITIES_OUTPUT,
    TEXT_INPUT,
    featurize,
)

NAME = "text-topics"
TASK = "multiclass"
INPUT_NAME = "features"
OUTPUT_NAME = PROBABILITIES_OUTPUT
DIMENSIONS = 1024
TOPICS = {
    "debugger": "debugging",
    "formatstrings": "formatting",
    "string-methods": "strings",
    "typesmapping": "dictionaries",
    "compound": "statements",
}
"""``pydoc_data.topics`` section -> class label."""
HPARAMS = {
    "epochs": 40,
    "batch_size": 32,
    "learning_rate": 3e-3,
    "dropout": 0.3,
    "l2": 1e-4,
    "patience": 6,
    "units": 64,
    "layers": 1,
}
SEARCH_SPACE = {
    "units": Choice(32, 64, 128),
    "layers": IntRange(1, 2),
    "dropout": FloatRange(0.0, 0.5),
    "l2": FloatRange(1e-6, 1e-2, log=True),
    "learning_rate": FloatRange(1e-4, 1e-2, log=True),
}
"""What ``modelloop train text-topics --tune`` searches (KerasTuner)."""
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
_LETTERS = re.compile(r"[A-Za-z]+")
SAMPLES = (
    "Set a breakpoint at line 12 and step into the function.",
    "Use a format spec such as {:>10.2f} to right-align a float.",
    "Return a copy of the string with leading whitespace removed.",
    "Return the value for key if key is in the dictionary, else default.",
    "The while statement repeats the suite as long as the expression is true.",
    "",
    "naïve café — ünïcode",
)
"""Hand-written strings for the export's parity check, besides sentences of the data."""


def sentences() -> tuple[list[str], np.ndarray]:
    """The labelled sentences: every sentence of four words or more of each section.

    Returns:
        The sentences and their class ids (the order of :data:`TOPICS`).
    """
    from pydoc_data.topics import topics

    texts: list[str] = []
    labels: list[int] = []
    for index, section in enumerate(TOPICS):
        for paragraph in re.split(r"\n\s*\n", topics[section]):
            for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
                if len(_LETTERS.findall(sentence)) >= 4:
                    texts.append(sentence)
                    labels.append(index)
    return texts, np.asarray(labels, dtype=np.int64)


def load_data() -> Dataset:
    """The sentences as hashed features, with their topics."""
    texts, labels = sentences()
    return Dataset(
        x=featurize(texts, DIMENSIONS),
        y=labels,
        feature_names=[f"hash_{i}" for i in range(DIMENSIONS)],
        class_labels=list(TOPICS.values()),
    )


def sample_inputs() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Strings for the parity check (every 9th sentence and :data:`SAMPLES`) and their features."""
    texts = [*sentences()[0][::9], *SAMPLES]
    return {TEXT_INPUT: np.array([t.encode() for t in texts], dtype=object)}, featurize(texts, DIMENSIONS)


def build_model(normalizer: keras.layers.Layer, hparams: Mapping[str, Any]) -> keras.Model:
    """``layers`` x (Dense ``units`` + dropout) -> softmax over the topics.

    ``normalizer`` is left out: the features are already L2-normalised rows, and standardising
    a hashed column that a handful of training sentences use would magnify it (on the test
    split, 0.75 accuracy with it against 0.80 without).
    """
    inputs = keras.Input(shape=(DIMENSIONS,), name=INPUT_NAME)
    x = inputs
    for _ in range(int(hparams["layers"])):
        x = dense_block(x, int(hparams["units"]), hparams)
    outputs = keras.layers.Dense(len(TOPICS), activation="softmax", name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name="text_topics")


PYTHON_MODEL = PythonModel(
    model_file=Path(__file__).with_name("text_topics_model.py"),
    inputs=({"name": TEXT_INPUT, "dtype": "object", "shape": [-1]},),
    outputs=(
        {"name": PROBABILITIES_OUTPUT, "dtype": "float32", "shape": [-1, len(TOPICS)]},
        {"name": LABEL_OUTPUT, "dtype": "object", "shape": [-1]},
    ),
    sample_inputs=sample_inputs,
    settings={"dimensions": DIMENSIONS},
)
