"""``modelloop up``: the main job on embedded defaults.

It trains and publishes digits into an empty repository, starts the control plane
(``modelloop monitor``, a child process it restarts if it dies) and serves with
``--control-plane`` pointing at it, so that the server only answers and logs while the
control plane watches drift and accuracy and retrains.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelloop.process import BoundAddresses

from modelloop.errors import ModelloopError
from modelloop.export.publish import list_versions
from modelloop.layout import CONFIG_FILE

logger = logging.getLogger(__name__)

_READY = "modelloop: control plane listening on "
# Restarts of a control plane that keeps dying, before up gives it up (serving goes on).
_MAX_RESTARTS = 5

DEFAULT_SPEC = "digits"
# The first image of scikit-learn's digits, a zero: what the printed curl line sends.
SAMPLE_DIGIT = [
    0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
    0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0,
]  # fmt: skip


def repo_has_models(repo: Path) -> bool:
    """Whether any model under ``repo`` has at least one integer version."""
    if not repo.is_dir():
        return False
    return any(
        list_versions(child) for child in repo.iterdir() if child.is_dir() and not child.name.startswith(".")
    )


# The rollout ``up`` gives digits: a new version (a blessed retrain) is a canary that walks
# 10 -> 50 -> 100 % on live guardrails, so that the demo shows it.
DEMO_ROLLOUT = {
    "steps": [10, 50, 100],
    "step_min_requests": 100,
    "min_labels": 50,
    "max_error_rate": 0.01,
    "max_accuracy_drop": 0.05,
    "max_latency_ratio": 2.0,
}


def write_rollout_config(model_dir: Path, mode: str) -> None:
    """Sets the ``"rollout"`` section of ``<model_dir>/config.json``, keeping its other keys."""
    path = model_dir / CONFIG_FILE
    config = json.loads(path.read_text()) if path.is_file() else {}
    config["rollout"] = {"mode": mode, **DEMO_ROLLOUT}
    tmp = path.with_name(f".{CONFIG_FILE}.tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(path)


def ensure_default_model(
    repo: Path, *, epochs: int | None = None, seed: int = 42, rollout: str = "canary"
) -> Path | None:
    """Trains and exports ``digits`` into ``repo`` if the repository holds no model.

    Args:
        repo: The model repository.
        epochs: Training epochs. Defaults to the spec's.
        seed: Training seed. Defaults to 42.
        rollout: The rollout mode written into digits' ``config.json`` (``canary``,
            ``shadow`` or ``off``). Defaults to ``canary``.

    Returns:
        The published version directory, or None when the repo already had models.
    """
    if repo_has_models(repo):
        return None
    from modelloop.export.exporter import export_run
    from modelloop.training.spec import load_spec
    from modelloop.training.train import train

    spec = load_spec(DEFAULT_SPEC)
    with tempfile.TemporaryDirectory(prefix="modelloop-run-") as tmp:
        run = train(spec, Path(tmp) / "run", epochs=epochs, seed=seed)
        metric = run.metrics["main_metric"]
        print(f"trained {spec.name}: test {metric} {run.metrics['test'][metric]:.4f}")
        version_dir = export_run(run.run_dir, repo).version_dir
    write_rollout_config(version_dir.parent, rollout)
    return version_dir


def _die_with_parent() -> None:
    """In the child: SIGTERM when ``up`` dies, even by SIGKILL (Linux; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class ControlPlaneProcess:
    """``modelloop monitor`` as a child of ``up``: started, watched, restarted, stopped.

    Args:
        argv: The ``monitor`` arguments (``--repo``, ``--state-dir``, ...), without ``--port``.
        port: The port to bind; 0 picks one at the first start, and restarts reuse it.
        env: The child's environment. Defaults to this process's.
    """

    def __init__(self, argv: list[str], port: int = 0, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.port = port
        self.env = env
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None
        self._stopping = False
        self._watcher: threading.Thread | None = None

    def _spawn(self, timeout: float = 120.0) -> None:
        cmd = [sys.executable, "-m", "modelloop", "monitor", *self.argv, "--port", str(self.port)]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=self.env, preexec_fn=_die_with_parent
        )
        self._proc = proc
        deadline = time.monotonic() + timeout
        for line in proc.stdout or ():
            if line.startswith(_READY):
                self.url = line[len(_READY) :].strip()
                self.port = int(self.url.rsplit(":", 1)[1])
                break
            if time.monotonic() > deadline:
                break
        if not self.url or proc.poll() is not None:
            self.stop()
            raise ModelloopError("the control plane (modelloop monitor) did not start; see its log above")
        # Keep draining its stdout so that it never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()

    def start(self) -> str:
        """Starts the control plane and a watcher that restarts it; returns its URL.

        Raises:
            ModelloopError: It did not start.
        """
        self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="control-plane-watch", daemon=True)
        self._watcher.start()
        return self.url

    def _watch(self) -> None:
        restarts = 0
        while not self._stopping and self._proc is not None:
            code = self._proc.wait()
            if self._stopping:
                return
            restarts += 1
            if restarts > _MAX_RESTARTS:
                logger.error("the control plane keeps exiting (%d); serving goes on without it", code)
                return
            logger.warning("the control plane exited with %d; restarting it (%d)", code, restarts)
            time.sleep(min(0.5 * 2**restarts, 10.0))
            try:
                self._spawn()
            except ModelloopError as exc:
                logger.error("%s", exc)

    def stop(self, timeout: float = 15.0) -> None:
        """Stops the control plane: SIGTERM, then SIGKILL after ``timeout``."""
        self._stopping = True
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def print_welcome(
    addresses: BoundAddresses, feedback_token: Path | None = None, control_plane: str | None = None
) -> None:
    """Prints the URLs of a running ``up`` and a ``curl`` line to paste.

    Args:
        addresses: Where the server listens.
        feedback_token: The file holding the labeler token ``up`` configured, if it did.
        control_plane: The control plane's URL, if one runs.
    """
    from modelloop.process import print_addresses

    print_addresses(addresses)
    row = json.dumps({"instances": [SAMPLE_DIGIT]}, separators=(",", ":"))
    base = addresses.rest_url
    feedback = f"{base}/v1/models/{DEFAULT_SPEC}/feedback"
    if feedback_token is not None:
        feedback += f'  (Authorization: Bearer $(cat {feedback_token}), source "default")'
    print(
        f"""
  TF Serving REST  {base}/v1/models/{DEFAULT_SPEC}
  OIP V2 REST      {base}/v2/models/{DEFAULT_SPEC}
  gRPC             {addresses.grpc_target}  (TF Serving PredictionService and OIP inference)
  API docs         {base}/docs
  metrics          {base}/metrics
  status page      {base}/
  feedback         {feedback}
  control plane    {control_plane or "(none)"}  (health page, drift, accuracy, retraining)

  curl -s -X POST {base}/v1/models/{DEFAULT_SPEC}:predict -H 'content-type: application/json' \\
       -d '{row}'

Ctrl-C drains and stops.""",
        flush=True,
    )
