"""modelloop: train, export, serve, monitor and retrain Keras models."""

__version__ = "0.1.0"
