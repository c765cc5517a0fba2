"""modelloop."""
