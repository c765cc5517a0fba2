"""Retraining: the policy and its triggers (alert webhook, in-process rules), and the retrain job."""
