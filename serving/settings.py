"""Server-wide and per-model serving settings.

``ServingSettings`` is built once by the CLI or the composition root (from arguments,
then ``MODELLOOP_*`` environment variables) and passed in; nothing reads the
environment per request or at import. ``ModelConfig`` is parsed from the optional
``<repo>/<name>/config.json`` of each model.

Example:

```python
settings = ServingSettings(repo=Path("models"), rest_port=0)
config = ModelConfig.model_validate_json('{"version_policy": {"latest": {"num_versions": 2}}}')
config.version_policy.select([1, 2, 3])  # [2, 3]
```
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from modelloop.serving.types import RolloutPolicy
from modelloop.tokens import check_token, read_token_file

# TF Serving restricts label names to this alphabet (model_server_config docs).
_LABEL = re.compile(r"^[A-Za-z0-9_]+$")
_MIB = 1024 * 1024


class BatchingSettings(BaseModel):
    """Dynamic batching knobs, named after TF Serving's ``BatchingParameters``.

    The queue of one model version holds at most
    ``max_enqueued_batches * max_batch_size`` rows; a request that would overflow it is
    rejected with :class:`~modelloop.serving.errors.QueueFull`. ``max_batch_size`` is also
    the most rows a single request may carry, with batching on or off.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    """Merge concurrent requests of one model version into one runtime call."""
    max_batch_size: int = Field(default=32, ge=1)
    """The most rows in one merged batch, and in one request."""
    batch_timeout_micros: int = Field(default=1000, ge=0)
    """How long the first request of a batch waits for company; 0 = run at once."""
    max_enqueued_batches: int = Field(default=64, ge=1)
    """Queue bound, in batches of ``max_batch_size`` rows."""
    num_batch_threads: int = Field(default=1, ge=1)
    """Threads that run batches of one model version concurrently."""
    inline_max_micros: int = Field(default=200, ge=0)
    """Run calls on the event loop instead of a thread while the model's measured call time
    stays below this (a tiny model answers faster than the thread hop); 0 = always a thread."""


class LatestPolicy(BaseModel):
    """Serve the ``num_versions`` highest versions."""

    model_config = ConfigDict(extra="forbid")

    num_versions: int = Field(default=1, ge=1)
    """How many of the highest versions to serve."""


class AllPolicy(BaseModel):
    """Serve every version on disk."""

    model_config = ConfigDict(extra="forbid")


class SpecificPolicy(BaseModel):
    """Serve exactly the listed versions (those that exist on disk)."""

    model_config = ConfigDict(extra="forbid")

    versions: list[int] = Field(min_length=1)
    """The versions to serve."""


class VersionPolicy(BaseModel):
    """TF Serving's ``ServableVersionPolicy``: exactly one of ``latest``, ``all``, ``specific``.

    Example:

    ```python
    VersionPolicy.model_validate({"specific": {"versions": [1, 3]}}).select([1, 2, 3])  # [1, 3]
    ```
    """

    model_config = ConfigDict(extra="forbid")

    latest: LatestPolicy | None = None
    """Serve the highest N versions (the default, with N = 1)."""
    all: AllPolicy | None = None
    """Serve every version."""
    specific: SpecificPolicy | None = None
    """Serve the listed versions."""

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionPolicy:
        chosen = [k for k in ("latest", "all", "specific") if getattr(self, k) is not None]
        if not chosen:
            self.latest = LatestPolicy()
        elif len(chosen) > 1:
            raise ValueError(f"version_policy takes exactly one of latest, all, specific; got {chosen}")
        return self

    def select(self, versions: Iterable[int]) -> list[int]:
        """The versions this policy wants loaded, ascending.

        Args:
            versions: The versions present on disk.

        Returns:
            The subset to load; versions the policy names but the disk lacks are left out.
        """
        present = sorted(set(versions))
        if self.all is not None:
            return present
        if self.specific is not None:
            wanted = set(self.specific.versions)
            return [v for v in present if v in wanted]
        n = self.latest.num_versions if self.latest is not None else 1
        return present[-n:]


FREE_FORM_SECTIONS = ("drift", "feedback", "retrain", "rollout")
"""The keys of ``config.json`` that serving does not read; other packages read them."""


class ModelConfig(BaseModel):
    """The optional ``<repo>/<name>/config.json`` of one model; every key is optional.

    Unknown keys are an error, so a typo (``version_polcy``) fails loudly instead of
    silently serving the wrong versions.

    Example:

    ```json
    {"version_policy": {"latest": {"num_versions": 2}},
     "version_labels": {"stable": 3, "canary": 4},
     "batching": {"max_batch_size": 64, "batch_timeout_micros": 2000},
     "runtime": "onnx", "onnx_providers": ["CPUExecutionProvider"]}
    ```
    """

    model_config = ConfigDict(extra="forbid")

    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    """Which versions to load; defaults to the latest one."""
    version_labels: dict[str, int] = Field(default_factory=dict)
    """Label -> version (``{"stable": 3}``); several labels may name one version."""
    batching: BatchingSettings | None = None
    """Batching for this model; None = the server's default."""
    runtime: Literal["onnx", "savedmodel", "python"] | None = None
    """Runtime; None = Python when ``model.py`` exists, else ONNX when ``model.onnx`` exists,
    else SavedModel."""
    onnx_providers: list[str] | None = None
    """ONNX Runtime providers in preference order; None = the server's choice."""
    intra_op_num_threads: int | None = Field(default=None, ge=0)
    """Threads inside one operator; None = the server's default (0 = runtime default)."""
    inter_op_num_threads: int | None = Field(default=None, ge=0)
    """Threads across operators; None = the server's default (0 = runtime default)."""
    allow_spinning: bool | None = None
    """Let ONNX Runtime's idle threads spin; None = the server's default (off)."""
    drift: dict[str, Any] = Field(default_factory=dict)
    """Free-form drift settings, read by monitoring."""
    feedback: dict[str, Any] = Field(default_factory=dict)
    """Free-form label-check settings (quarantine thresholds), read by monitoring and the retrain CLI."""
    retrain: dict[str, Any] = Field(default_factory=dict)
    """Free-form retrain gate settings (``epochs``, ``accuracy_floor``, ...), read by the retrain pipeline."""
    rollout: dict[str, Any] = Field(default_factory=dict)
    """The rollout policy over the server's defaults (:class:`~modelloop.serving.types.RolloutPolicy`);
    checked on its own, so that an invalid one is refused without failing the rest of the config."""
    refuse_nan: bool = False
    """Refuse requests whose float inputs hold NaN or ±Inf (400 / INVALID_ARGUMENT); by
    default they are served, and monitoring counts them as missing values."""
    log_sample: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of answered requests written to the prediction log (1 = every one, 0 = none)."""
    pinned: bool = False
    """With ``--max-loaded-models``: load this model's versions at start and never evict them."""

    @field_validator("version_labels")
    @classmethod
    def _check_labels(cls, labels: dict[str, int]) -> dict[str, int]:
        for label, version in labels.items():
            if not _LABEL.match(label):
                raise ValueError(f"version label {label!r} must match [A-Za-z0-9_]+")
            if version < 1:
                raise ValueError(f"version label {label!r} names version {version}; versions start at 1")
        return labels


class ServingSettings(BaseSettings):
    """Server-wide settings; environment variables use the prefix ``MODELLOOP_``.

    Nested batching fields read from ``MODELLOOP_BATCHING__MAX_BATCH_SIZE`` and so on.

    Example:

    ```python
    settings = ServingSettings(repo=Path("models"), grpc_port=0, rest_port=0)
    ```
    """

    model_config = SettingsConfigDict(env_prefix="MODELLOOP_", env_nested_delimiter="__", extra="ignore")

    repo: Path
    """The model repository root; with ``repo_url``, the local copy of that repository."""
    repo_url: str | None = None
    """A repository in object storage (``s3://bucket/prefix``) that ``repo`` mirrors; None = local."""
    host: str = "127.0.0.1"
    """Interface both servers bind."""
    rest_port: int = Field(default=8501, ge=0, le=65535)
    """REST port; 0 = pick a free one."""
    grpc_port: int = Field(default=8500, ge=0, le=65535)
    """gRPC port; 0 = pick a free one."""
    poll_interval_s: float = Field(default=1.0, gt=0)
    """How often the registry compares the repository with what is loaded."""
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    """Batching default for models whose config.json has none."""
    grpc_max_message_bytes: int = Field(default=64 * _MIB, gt=0)
    """Largest gRPC message sent or received."""
    max_body_bytes: int = Field(default=64 * _MIB, gt=0)
    """Largest REST request body; larger ones get 413."""
    admin_token: SecretStr | None = None
    """Bearer token of the admin routes (``MODELLOOP_ADMIN_TOKEN``); None = routes off."""
    admin_token_file: Path | None = None
    """A file holding the admin token (``MODELLOOP_ADMIN_TOKEN_FILE``, a mounted Secret); read once."""
    cors_origins: list[str] = Field(default_factory=list)
    """Origins allowed by CORS; empty = CORS off."""
    grace_period_s: float = Field(default=20.0, ge=0)
    """How long a drain waits for in-flight requests."""
    onnx_providers: list[str] | None = None
    """ONNX Runtime providers in preference order; None = TensorRT, CUDA, CPU as available."""
    intra_op_num_threads: int | None = Field(default=None, ge=0)
    """Default intra-op threads of every runtime; None = the process's CPUs (affinity and
    cgroup quota) shared out over the workers; 0 = ONNX Runtime's own default (host-sized)."""
    inter_op_num_threads: int | None = Field(default=None, ge=0)
    """Default inter-op threads of every runtime; None = runtime default."""
    allow_spinning: bool = False
    """Let ONNX Runtime's idle threads spin (lower latency on dedicated cores, burned CPU
    and throttled quota on shared ones)."""
    workers: int = Field(default=1, ge=1)
    """Server processes sharing this host's CPUs (``--workers``); runtimes size their
    thread pools to their share."""
    worker_max_restarts: int = Field(default=5, ge=0)
    """With several workers: crashes in a row after which a worker stops the server."""
    worker_restart_backoff_s: float = Field(default=0.5, gt=0)
    """With several workers: the first restart delay of a crashed worker (it doubles)."""
    max_loaded_models: int | None = Field(default=None, ge=1)
    """The most versions held in memory at once (``--max-loaded-models``); None loads every
    version at start. With a budget, versions load on their first request and the least
    recently used idle, unpinned one is unloaded to make room (:mod:`~modelloop.serving.residency`)."""
    load_wait_s: float = Field(default=30.0, gt=0)
    """With ``max_loaded_models``: how long a request waits for its version to load (or for
    room to load it) before a 503 / UNAVAILABLE."""
    warmup: bool = True
    """Warm a new version up before it takes traffic: the samples it ships (``warmup.json``,
    ``assets.extra/tf_serving_warmup_requests``), else one synthetic row (a Python model:
    nothing)."""
    max_header_bytes: int = Field(default=64 * 1024, gt=0)
    """Largest HTTP request head (request line and headers); beyond it the answer is 431."""
    header_timeout_s: float = Field(default=10.0, gt=0)
    """Seconds a client may take to send a request head; beyond it the answer is 408."""
    tls_cert_file: Path | None = None
    """PEM certificate (chain) for TLS on both ports; None serves plaintext."""
    tls_key_file: Path | None = None
    """PEM private key of ``tls_cert_file``."""
    control_plane_url: str | None = None
    """The control plane (``modelloop monitor``) that reads this server's prediction log;
    the feedback and ``/monitoring`` routes are forwarded to it. None (or ``in-process``):
    the server reads its own log and runs the analysis itself (one process, or worker 0 of
    several). ``modelloop serve`` fills in ``http://127.0.0.1:8502`` when neither the flag
    nor ``MODELLOOP_CONTROL_PLANE_URL`` names one."""
    rollout: RolloutPolicy = Field(default_factory=RolloutPolicy)
    """Rollout defaults of every model (``MODELLOOP_ROLLOUT__MODE=canary`` and so on); a
    model's ``"rollout"`` section in ``config.json`` overrides them field by field."""

    @model_validator(mode="after")
    def _read_admin_token_file(self) -> ServingSettings:
        if self.admin_token is not None:
            # Set but empty or blank must not mean "the empty token": refuse to start.
            check_token(self.admin_token.get_secret_value(), "MODELLOOP_ADMIN_TOKEN")
        if self.admin_token_file is None:
            return self
        if self.admin_token is not None:
            raise ValueError("set MODELLOOP_ADMIN_TOKEN or MODELLOOP_ADMIN_TOKEN_FILE, not both")
        what = "MODELLOOP_ADMIN_TOKEN_FILE"
        self.admin_token = SecretStr(check_token(read_token_file(self.admin_token_file, what), what))
        return self

    @model_validator(mode="after")
    def _in_process_control_plane(self) -> ServingSettings:
        if self.control_plane_url is not None and self.control_plane_url.strip() == "in-process":
            self.control_plane_url = None
        return self

    @model_validator(mode="after")
    def _check_tls(self) -> ServingSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        for path in (self.tls_cert_file, self.tls_key_file):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {str(path)!r} does not exist")
        return self

    @property
    def tls(self) -> bool:
        """Whether both ports serve TLS."""
        return self.tls_cert_file is not None
