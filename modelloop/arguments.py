"""The ``modelloop`` command line's arguments: every subcommand's parser and the checks of its values.

Only the standard library and light project modules are imported here, so ``modelloop --help``
and argument errors answer at once. The commands themselves live in :mod:`modelloop.cli`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelloop import __version__
from modelloop.errors import ModelloopError

STATE_DIR_DEFAULT = "$XDG_STATE_HOME/modelloop/<repo name>-<hash of its path>, ~/.local/state/... without it"
"""Where the state of a repository goes unless ``--state-dir`` says (see ``default_state_dir``)."""

REPO_HELP = "model repository: a directory, file:///path or s3://bucket/prefix"
DEFAULT_CONTROL_PLANE_URL = "http://127.0.0.1:8502"
"""Where ``serve`` finds its control plane by default: ``modelloop monitor`` on this host."""


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}: not an integer") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {port}: must be 0..65535")
    return port


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``, else a one-line reason."""

    def number(value: str) -> int:
        try:
            parsed = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {value!r}") from None
        if parsed < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {parsed}")
        return parsed

    return number


_positive = _at_least(1)
_folds = _at_least(2)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="modelloop",
        description="Train, export, serve, monitor and retrain Keras models.",
    )
    parser.add_argument("--version", action="version", version=f"modelloop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser("train", help="train a task spec and write a run directory")
    train.add_argument(
        "spec", metavar="SPEC", help="digits, digits-cnn, breast-cancer, diabetes or a .py file"
    )
    train.add_argument("--out", required=True, type=Path, metavar="RUN_DIR", help="run directory to create")
    train.add_argument("--epochs", type=_positive, default=None, help="most epochs (default: the spec's)")
    train.add_argument("--seed", type=int, default=42, help="seed of split and weights (default: 42)")
    train.add_argument(
        "--folds", type=_folds, default=0, metavar="K", help="report K-fold cross-validation first"
    )
    train.add_argument(
        "--tune",
        type=_positive,
        default=0,
        metavar="TRIALS",
        help="check capacity, then search the spec's SEARCH_SPACE with KerasTuner for TRIALS trials "
        "(on the validation split, or the K folds with --folds) and train with the best",
    )
    train.add_argument(
        "--distributed",
        action="store_true",
        help="train with MultiWorkerMirroredStrategy across the workers in TF_CONFIG",
    )
    train.add_argument(
        "--tf-config-from-index",
        action="store_true",
        help="derive TF_CONFIG from JOB_COMPLETION_INDEX and MODELLOOP_WORKER_HOSTS (implies --distributed)",
    )

    export = sub.add_parser("export", help="export a run to the model repository as the next version")
    export.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    export.add_argument(
        "--repo",
        required=True,
        metavar="REPO",
        help="model repository: a directory, file:///path or s3://bucket/prefix",
    )
    export.add_argument("--name", default=None, help="model name (default: the spec's name)")

    serve = sub.add_parser("serve", help="serve every model in a repository over REST and gRPC")
    serve.add_argument(
        "--repo",
        required=True,
        metavar="REPO",
        help="model repository: a directory, file:///path or s3://bucket/prefix",
    )
    _add_server_arguments(serve)

    up = sub.add_parser("up", help="train and export digits if the repo is empty, then serve it")
    up.add_argument("--repo", default="models", help="model repository directory (default: ./models)")
    _add_server_arguments(up)
    up.add_argument("--epochs", type=_positive, default=None, help=argparse.SUPPRESS)
    up.add_argument(
        "--rollout",
        choices=["canary", "shadow", "off"],
        default="canary",
        help="how new versions of the digits it trains roll out (default: canary)",
    )
    _add_retrain_parser(sub)
    _add_simulate_parser(sub)
    _add_rollout_parser(sub)
    _add_monitor_parser(sub)
    _add_log_parser(sub)
    return parser


def _add_monitor_parser(sub: Any) -> None:
    monitor = sub.add_parser(
        "monitor", help="run the control plane: read the prediction log, watch drift and accuracy, retrain"
    )
    monitor.add_argument("--repo", required=True, metavar="REPO", help="model repository directory")
    monitor.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    monitor.add_argument("--port", type=_port, default=8502, help="HTTP port; 0 picks one (default: 8502)")
    _add_store_arguments(monitor)
    monitor.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _add_log_parser(sub: Any) -> None:
    log = sub.add_parser("log", help="the prediction log")
    actions = log.add_subparsers(dest="log_action", required=True, metavar="ACTION")
    export = actions.add_parser("export", help="write a model's logged predictions as Parquet")
    export.add_argument("--model", required=True, help="the model")
    export.add_argument(
        "--since",
        default="0",
        metavar="T",
        help="logged at or after T: Unix seconds or ISO 8601 (default: everything kept)",
    )
    export.add_argument("--out", type=Path, required=True, metavar="FILE", help="the Parquet file to write")
    export.add_argument(
        "--repo",
        default="models",
        metavar="REPO",
        help="the repository whose state holds the log (default: ./models)",
    )
    _add_store_arguments(export)


def _add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="prediction and feedback store: sqlite:///PATH or postgresql://... (default: SQLite)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"monitoring state (default: {STATE_DIR_DEFAULT})",
    )
    parser.add_argument(
        "--log-url",
        default=None,
        metavar="URL",
        help="the prediction log as segment objects: s3://bucket/prefix or a directory (file://); "
        "every server and the control plane name the same one (default: a table of the store)",
    )


def _add_retrain_parser(sub: Any) -> None:
    retrain = sub.add_parser(
        "retrain", help="retrain a model on its spec's data plus feedback; publish v+1 only if blessed"
    )
    retrain.add_argument("--repo", required=True, metavar="REPO", help="model repository directory")
    retrain.add_argument("--name", required=True, help="the model to retrain")
    retrain.add_argument(
        "--store", default=None, metavar="URL", help="feedback store (default: the monitoring store)"
    )
    retrain.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"run records (default: {STATE_DIR_DEFAULT})",
    )
    retrain.add_argument("--epochs", type=_positive, default=None, help="most epochs (default: config.json)")
    retrain.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _add_simulate_parser(sub: Any) -> None:
    simulate = sub.add_parser("simulate", help="send labelled digits traffic (and --drift) to a server")
    simulate.add_argument("--url", required=True, help="REST base URL, e.g. http://127.0.0.1:8501")
    simulate.add_argument("--drift", action="store_true", help="then send inverted, noisy digits")
    simulate.add_argument("--drift-only", action="store_true", help="skip the normal phase")
    simulate.add_argument("--requests", type=_positive, default=200, help="requests per phase (default: 200)")
    simulate.add_argument("--batch", type=_positive, default=1, help="rows per request (default: 1)")
    simulate.add_argument("--rate", type=float, default=0.0, help="requests per second (default: no limit)")
    simulate.add_argument("--model", default="digits", help="the served digits model (default: digits)")
    simulate.add_argument("--seed", type=int, default=0, help="seed of rows and noise (default: 0)")
    simulate.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="labeler token for the feedback (default: $MODELLOOP_FEEDBACK_TOKEN, else the "
        "feedback.token `up` wrote in the state directory, when it exists)",
    )
    simulate.add_argument(
        "--repo",
        default="models",
        metavar="REPO",
        help="the repository the server serves, to find its state directory (default: ./models)",
    )
    simulate.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"the server's state directory (default: {STATE_DIR_DEFAULT})",
    )


def _add_rollout_parser(sub: Any) -> None:
    rollout = sub.add_parser(
        "rollout", help="show, promote, roll back or pause a model's rollout, or clear its state"
    )
    rollout.add_argument("action", choices=["status", "promote", "rollback", "pause", "clear"])
    rollout.add_argument("name", help="the model")
    rollout.add_argument("--url", required=True, help="REST base URL, e.g. http://127.0.0.1:8501")
    rollout.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="admin token for promote, rollback, pause, clear (default: $MODELLOOP_ADMIN_TOKEN)",
    )


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--rest-port", type=_port, default=8501, help="REST port; 0 picks one")
    parser.add_argument("--grpc-port", type=_port, default=8500, help="gRPC port; 0 picks one")
    parser.add_argument("--poll-interval", type=float, default=None, help="seconds between repository polls")
    parser.add_argument(
        "--max-loaded-models",
        type=_positive,
        default=None,
        help="most model versions in memory; others load on first request, least recently used unloaded",
    )
    parser.add_argument("--grace-period", type=float, default=None, help="seconds to drain on SIGTERM")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate: TLS on both ports")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    _add_store_arguments(parser)
    parser.add_argument(
        "--no-monitoring", action="store_true", help="no prediction log, feedback, drift or accuracy"
    )
    parser.add_argument(
        "--control-plane",
        default=None,
        metavar="URL|in-process",
        help="the control plane (modelloop monitor) that reads this server's log: feedback and "
        "/monitoring routes are forwarded to it (serve's default: MODELLOOP_CONTROL_PLANE_URL, else "
        f"{DEFAULT_CONTROL_PLANE_URL}; up starts its own); in-process: this server reads its own "
        "log and runs the analysis itself, on its CPU (one process, or worker 0 of --workers N)",
    )
    parser.add_argument(
        "--workers",
        default="1",
        metavar="N|auto",
        help="server processes sharing both ports; auto = the CPUs this process may use (default: 1)",
    )
    # Set by the supervisor of --workers N for each worker it starts; not for users.
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-count", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)


def worker_count(value: str) -> int:
    """The number of workers ``--workers`` asks for: a positive number, or ``auto``.

    Raises:
        ModelloopError: Anything else, with a one-line reason.

    Example:

    >>> worker_count("2")
    2
    """
    text = value.strip().lower()
    if text == "auto":
        from modelloop.serving.cpus import cpu_budget

        return cpu_budget().count
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ModelloopError(f"invalid --workers {value!r}: give a number of processes (1 or more) or 'auto'")
    return int(text)


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The ``serve`` arguments every worker of ``--workers N`` runs with (the ports apart)."""
    argv = ["--repo", str(args.repo), "--host", args.host, "--log-level", args.log_level]
    for flag, value in (
        ("--poll-interval", args.poll_interval),
        ("--max-loaded-models", args.max_loaded_models),
        ("--grace-period", args.grace_period),
        ("--tls-cert", args.tls_cert),
        ("--tls-key", args.tls_key),
        ("--store", args.store),
        ("--state-dir", args.state_dir),
        ("--log-url", args.log_url),
        ("--control-plane", args.control_plane),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if args.no_monitoring:
        argv.append("--no-monitoring")
    return argv
