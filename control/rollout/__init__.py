"""A rollout: its guardrails, its state machine, the controller that judges it, its routes and its CLI."""
