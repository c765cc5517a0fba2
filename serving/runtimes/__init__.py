"""modelloop.serving.runtimes."""
