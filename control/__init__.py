"""modelloop's control plane: the monitor loop, rollout judging, retraining and their HTTP surface."""
