"""modelloop.serving.codecs."""
