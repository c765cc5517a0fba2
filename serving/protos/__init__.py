"""modelloop.serving.protos."""
