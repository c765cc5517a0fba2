"""Constants the reliability test modules share."""

ADMIN_TOKEN = "reliability-token-0123456789"
