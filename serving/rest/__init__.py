"""modelloop.serving.rest."""
