"""Ways to start a retrain: a local subprocess, a Kubernetes Job, or a dry run for tests.

Every trigger has one coroutine, ``start(model, reason=..., key=...)``, which returns as
soon as the run is launched (never after it finishes, so the webhook answers at once) and
raises :class:`TriggerError` when it cannot launch one.

Counting (``modelloop_retrain_runs_total``): the server counts the runs it triggered.
:class:`SubprocessTrigger` waits for its child on the event loop and hands the outcome to
``on_finish`` (the child prints its result as one JSON line and exits 0 blessed,
3 rejected, 1 failed). A Kubernetes Job's outcome lives in the Job and its JSON run record;
the server counts only Jobs it could not create, as ``failed``.

Example:

```python
trigger = SubprocessTrigger(Path("models"), on_finish=lambda run: print(run.outcome))
await trigger.start("digits", reason="ModelDriftDetected")
```
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import signal
import string
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic_settings import BaseSettings, SettingsConfigDict

from modelloop.errors import ModelloopError

logger = logging.getLogger(__name__)

EXIT_BLESSED, EXIT_FAILED, EXIT_REJECTED = 0, 1, 3
"""Exit codes of ``modelloop retrain``."""
_OUTCOME_BY_EXIT = {EXIT_BLESSED: "blessed", EXIT_REJECTED: "rejected"}


class TriggerError(ModelloopError):
    """A retrain could not be started."""


class RetrainTrigger(Protocol):
    """Starts a retrain of one model without waiting for it."""

    async def start(self, model: str, *, reason: str = "", key: str = "") -> None:
        """Launches a retrain of ``model``.

        Args:
            model: The model to retrain.
            reason: Why (alert name or in-process rule), for logs and labels.
            key: A de-duplication key of the cause (group key and start time), so a
                retried launch of the same cause is recognised. Empty = none.

        Raises:
            TriggerError: Nothing was launched.
        """
        ...


@dataclass(frozen=True)
class RetrainRun:
    """A finished retrain the server launched.

    Attributes:
        model: The model.
        outcome: ``blessed``, ``rejected`` or ``failed``.
        returncode: The child's exit status.
        result: The child's JSON result line, if it printed one.
    """

    model: str
    outcome: str
    returncode: int | None
    result: dict[str, Any] = field(default_factory=dict)


def outcome_of(returncode: int | None, result: Mapping[str, Any]) -> str:
    """The outcome of a finished ``modelloop retrain``: its JSON line first, else its exit code."""
    reported = result.get("outcome")
    if reported in ("blessed", "rejected", "failed"):
        return str(reported)
    return _OUTCOME_BY_EXIT.get(returncode if returncode is not None else -1, "failed")


def _last_json_line(output: bytes) -> dict[str, Any]:
    for line in reversed(output.decode(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                return {}
            return value if isinstance(value, dict) else {}
    return {}


class SubprocessTrigger:
    """Runs ``python -m modelloop retrain --repo R --name N [--store URL]`` as a child process.

    The child is spawned and awaited on the event loop (``asyncio`` subprocess), so the
    server keeps answering while it trains. Its standard error goes to the server's, its
    standard output (the JSON result) is read when it exits. One run per model at a time.

    Args:
        repo: The model repository the child retrains in.
        store_url: ``--store`` of the child; None = the child's own default. Defaults to None.
        state_dir: ``--state-dir`` of the child (run records). Defaults to None.
        on_finish: Called on the event loop with every finished run. Defaults to None.
        python: The interpreter. Defaults to this one.
        extra_args: More ``modelloop retrain`` arguments (``--epochs 5``). Defaults to none.
    """

    def __init__(
        self,
        repo: Path,
        *,
        store_url: str | None = None,
        state_dir: Path | None = None,
        on_finish: Callable[[RetrainRun], None] | None = None,
        python: str = sys.executable,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.repo = repo
        self.store_url = store_url
        self.state_dir = state_dir
        self.on_finish = on_finish
        self.python = python
        self.extra_args = extra_args
        self._running: dict[str, asyncio.subprocess.Process] = {}
        self._tasks: set[asyncio.Task[RetrainRun]] = set()
        self.finished: list[RetrainRun] = []

    def command(self, model: str) -> list[str]:
        """The child's command line."""
        cmd = [self.python, "-m", "modelloop", "retrain", "--repo", str(self.repo), "--name", model]
        if self.store_url is not None:
            cmd += ["--store", self.store_url]
        if self.state_dir is not None:
            cmd += ["--state-dir", str(self.state_dir)]
        return cmd + list(self.extra_args)

    def running(self) -> list[str]:
        """Models with a retrain in progress."""
        return sorted(self._running)

    async def start(self, model: str, *, reason: str = "", key: str = "") -> None:
        """Spawns the child and returns; a task awaits it.

        Raises:
            TriggerError: A retrain of this model is running, or the child cannot be spawned.
        """
        del key  # One run per model at a time already stops a retried cause.
        if model in self._running:
            raise TriggerError(f"a retrain of {model!r} is already running")
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command(model), stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
            )
        except OSError as exc:
            raise TriggerError(f"cannot start {self.python!r}: {exc.strerror}") from exc
        logger.info("retrain of %s started (pid %d, reason %s)", model, proc.pid, reason or "-")
        self._running[model] = proc
        task = asyncio.get_running_loop().create_task(self._wait(model, proc), name=f"retrain-{model}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wait(self, model: str, proc: asyncio.subprocess.Process) -> RetrainRun:
        try:
            stdout, _ = await proc.communicate()
        finally:
            self._running.pop(model, None)
        result = _last_json_line(stdout or b"")
        run = RetrainRun(model, outcome_of(proc.returncode, result), proc.returncode, result)
        logger.info(
            "retrain of %s finished: %s (exit %s) %s",
            model,
            run.outcome,
            proc.returncode,
            result.get("reason", ""),
        )
        self.finished.append(run)
        if self.on_finish is not None:
            self.on_finish(run)
        return run

    async def wait_idle(self, timeout: float | None = None) -> list[RetrainRun]:
        """Waits until every launched run has finished; returns them (tests, drain)."""
        if not self._tasks:
            return []
        done, _ = await asyncio.wait(set(self._tasks), timeout=timeout)
        return [t.result() for t in done if not t.cancelled() and t.exception() is None]

    async def close(self, timeout: float = 10.0) -> None:
        """Stops running children (SIGTERM, then SIGKILL): an unfinished run publishes nothing."""
        for proc in list(self._running.values()):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for proc in list(self._running.values()):
                if proc.returncode is None:
                    proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=timeout)


_NOT_DNS = re.compile(r"[^a-z0-9-]+")


def job_name(model: str, key: str = "", *, now: float | None = None) -> str:
    """A valid, deterministic Job name: ``retrain-<model>-<hash of the cause>``.

    The same cause (``key``) gives the same name, so a retried create answers 409
    instead of starting a second Job. Without a key the time is the cause.
    """
    slug = _NOT_DNS.sub("-", model.lower()).strip("-")[:40].rstrip("-") or "model"
    cause = key or f"{time.time() if now is None else now:.6f}"
    digest = hashlib.sha256(f"{model}\0{cause}".encode()).hexdigest()[:10]
    return f"retrain-{slug}-{digest}"


_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubernetesJobSettings(BaseSettings):
    """Where the Kubernetes trigger finds its template; env prefix ``MODELLOOP_RETRAIN_JOB_``."""

    model_config = SettingsConfigDict(env_prefix="MODELLOOP_RETRAIN_JOB_", extra="ignore")

    template: Path = Path("/etc/modelloop/retrain-job-template.yaml")
    """The Job template (``k8s/base/retrain-job-template.yaml``, mounted from a ConfigMap)."""
    namespace: str | None = None
    """Namespace of the Jobs; None = the server pod's own."""
    image: str = "modelloop:latest"
    """Image that runs ``modelloop retrain``; use the server's own."""

    def resolved_namespace(self) -> str:
        """The namespace, defaulting to the pod's service-account namespace, else ``default``."""
        if self.namespace:
            return self.namespace
        try:
            return _SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
        except OSError:
            return "default"


class KubernetesJobTrigger:
    """Creates a ``batch/v1`` Job per retrain from a YAML template, through the Kubernetes API.

    The template (``k8s/base/retrain-job-template.yaml``) may use ``${JOB_NAME}``,
    ``${MODEL}``, ``${NAMESPACE}`` and ``${IMAGE}``; the reason goes into an annotation.

    Args:
        api: A ``kubernetes.client.BatchV1Api`` (or anything with ``create_namespaced_job``).
        template_path: The Job template.
        namespace: Where Jobs are created.
        image: The image that runs ``modelloop retrain``. Defaults to ``modelloop:latest``.
    """

    def __init__(
        self, api: Any, template_path: Path, namespace: str, *, image: str = "modelloop:latest"
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.image = image
        try:
            self._template = string.Template(template_path.read_text())
        except OSError as exc:
            raise TriggerError(f"cannot read Job template {str(template_path)!r}: {exc.strerror}") from exc

    def render(self, model: str, *, reason: str = "", key: str = "") -> dict[str, Any]:
        """The Job manifest for one retrain.

        Raises:
            TriggerError: The template names an unknown placeholder or is not a Job.
        """
        from modelloop.export.publish import PublishError, validate_model_name

        try:
            validate_model_name(model)  # The name goes into YAML text: only safe characters.
        except PublishError as exc:
            raise TriggerError(str(exc)) from None
        name = job_name(model, key)
        try:
            text = self._template.substitute(
                JOB_NAME=name, MODEL=model, NAMESPACE=self.namespace, IMAGE=self.image
            )
            body = yaml.safe_load(text)
        except (KeyError, ValueError, yaml.YAMLError) as exc:
            raise TriggerError(f"Job template cannot be rendered: {type(exc).__name__}: {exc}") from exc
        if not isinstance(body, dict) or body.get("kind") != "Job":
            raise TriggerError("Job template must be one batch/v1 Job")
        annotations = body.setdefault("metadata", {}).setdefault("annotations", {})
        annotations["modelloop.dev/reason"] = reason or "manual"
        if key:
            annotations["modelloop.dev/cause"] = key[:1024]
        return body

    async def start(self, model: str, *, reason: str = "", key: str = "") -> None:
        """Creates the Job; an existing Job of the same cause counts as started.

        Raises:
            TriggerError: The API refused the Job (other than "already exists").
        """
        body = self.render(model, reason=reason, key=key)
        name = body["metadata"]["name"]
        try:
            # The client is blocking HTTP: keep it off the event loop.
            await asyncio.to_thread(self.api.create_namespaced_job, namespace=self.namespace, body=body)
        except Exception as exc:
            status = getattr(exc, "status", None)
            if status == 409:
                logger.info("retrain Job %s already exists: not created again", name)
                return
            raise TriggerError(f"cannot create Job {name}: {status or type(exc).__name__} {exc}") from exc
        logger.info("retrain Job %s/%s created for %s (%s)", self.namespace, name, model, reason or "-")


class DryRunTrigger:
    """Records what would be started; for tests and ``trigger="none"``.

    Args:
        error: When set, ``start`` raises :class:`TriggerError` with this message.
            Defaults to None.
    """

    def __init__(self, error: str | None = None) -> None:
        self.error = error
        self.calls: list[tuple[str, str, str]] = []

    async def start(self, model: str, *, reason: str = "", key: str = "") -> None:
        """Records ``(model, reason, key)``.

        Raises:
            TriggerError: ``error`` is set.
        """
        if self.error is not None:
            raise TriggerError(self.error)
        self.calls.append((model, reason, key))
