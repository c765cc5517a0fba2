"""Keras callbacks of a training run."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import keras

from modelloop.layout import RUN_HISTORY_CSV, RUN_TENSORBOARD_DIR


class EpochLine(keras.callbacks.Callback):
    """Prints one compact line per epoch, for logs that are not a terminal.

    Keras's progress bar redraws itself with carriage returns, which turns a CI log into
    noise; this prints ``epoch 3/40 loss=0.41 val_loss=0.38 ... 0.4s`` instead.
    """

    def __init__(self, epochs: int, stream: Any = None) -> None:
        super().__init__()
        self._epochs = epochs
        self._stream = stream if stream is not None else sys.stdout
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._start = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        values = " ".join(f"{k}={v:.4g}" for k, v in sorted((logs or {}).items()) if k != "learning_rate")
        elapsed = time.monotonic() - self._start
        print(f"epoch {epoch + 1}/{self._epochs} {values} {elapsed:.1f}s", file=self._stream, flush=True)


def standard_callbacks(
    run_dir: Path, *, monitor: str, mode: str, patience: int, epochs: int, interactive: bool
) -> list[keras.callbacks.Callback]:
    """EarlyStopping (best weights restored), ModelCheckpoint, TensorBoard and CSV history.

    Args:
        run_dir: The run directory the artefacts go to.
        monitor: Validation quantity to watch, e.g. ``"val_loss"``.
        mode: ``"min"`` or ``"max"``.
        patience: Epochs without improvement before stopping.
        epochs: Planned epochs, for the progress line.
        interactive: Whether Keras's own progress bar is used; otherwise one line
            per epoch is printed.
    """
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.EarlyStopping(
            monitor=monitor, mode=mode, patience=patience, restore_best_weights=True
        ),
        keras.callbacks.ModelCheckpoint(
            str(run_dir / "checkpoint.keras"), monitor=monitor, mode=mode, save_best_only=True
        ),
        keras.callbacks.TensorBoard(log_dir=str(run_dir / RUN_TENSORBOARD_DIR), write_graph=False),
        keras.callbacks.CSVLogger(str(run_dir / RUN_HISTORY_CSV)),
    ]
    if not interactive:
        callbacks.append(EpochLine(epochs))
    return callbacks
