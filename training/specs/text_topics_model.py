"""The ``model.py`` of the ``text-topics`` spec: strings in, topic probabilities and label out.

``modelloop export`` copies this file verbatim into every version of the spec, where the
server's Python runtime runs it; training imports :func:`featurize` from it, so the server
featurizes exactly as training did. It therefore imports nothing of modelloop: the
standard library, NumPy, and ONNX Runtime once loaded. The exporter writes
``model_settings.json`` beside it (the ONNX file, its input and output names, the labels
and the featurizer's size).

Example (in a version directory)::

    model = Model()
    model.load(Path("models/text-topics/1"))
    model.predict({"text": np.array([b"set a breakpoint at line 12"], dtype=object)})["label"]
    # array([b'debugging'], dtype=object)
"""

from __future__ import annotations

import itertools
import json
import re
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

SETTINGS_FILE = "model_settings.json"
TEXT_INPUT = "text"
PROBABILITIES_OUTPUT = "probabilities"
LABEL_OUTPUT = "label"
_WORD = re.compile(r"[a-z0-9_]+")


def featurize(texts: Iterable[bytes | str], dimensions: int) -> np.ndarray:
    """A hashed bag of words and word pairs per text, log-scaled and L2-normalised.

    Each lower-cased word and each pair of neighbouring words adds one to the column
    ``crc32(token) % dimensions``: CRC-32 is the same in every process (Python's ``hash``
    of a string is salted per process), so training and serving hash alike.

    Args:
        texts: Strings, or UTF-8 bytes (invalid bytes are replaced).
        dimensions: Columns of the result.

    Returns:
        float32 ``[len(texts), dimensions]``; an empty text gives a row of zeros.
    """
    rows = list(texts)
    out = np.zeros((len(rows), dimensions), dtype=np.float32)
    for i, text in enumerate(rows):
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        words = _WORD.findall(str(text).lower())
        for token in [*words, *(f"{a} {b}" for a, b in itertools.pairwise(words))]:
            out[i, zlib.crc32(token.encode()) % dimensions] += 1.0
    np.log1p(out, out=out)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


class Model:
    """Featurizes the ``text`` input, runs ``model.onnx`` and names the most likely topic."""

    def load(self, version_dir: Path) -> None:
        """Reads ``model_settings.json`` and opens the ONNX model on one CPU thread.

        One thread per call: the server's batcher runs calls on its own threads, and a
        network this small gains nothing from more.
        """
        import onnxruntime as ort

        version_dir = Path(version_dir)
        settings: dict[str, Any] = json.loads((version_dir / SETTINGS_FILE).read_text())
        self.dimensions = int(settings["dimensions"])
        self.labels = [str(label).encode() for label in settings["labels"]]
        self.onnx_input = str(settings["onnx_input"])
        self.onnx_output = str(settings["onnx_output"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(version_dir / settings["onnx_file"]), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``text`` BYTES ``[n]`` -> ``probabilities`` float32 ``[n, k]`` and ``label`` BYTES ``[n]``."""
        texts = np.asarray(inputs[TEXT_INPUT], dtype=object).reshape(-1)
        features = featurize(texts.tolist(), self.dimensions)
        probabilities = self.session.run([self.onnx_output], {self.onnx_input: features})[0]
        labels = np.array([self.labels[i] for i in probabilities.argmax(axis=1)], dtype=object)
        return {PROBABILITIES_OUTPUT: probabilities, LABEL_OUTPUT: labels}
