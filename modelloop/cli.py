"""The ``modelloop`` command line: what each subcommand does.

The parser and the checks of argument values are in :mod:`modelloop.arguments`. Heavy imports
(TensorFlow, Keras, ONNX Runtime) happen inside each command, so ``modelloop --help`` and
argument errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelloop.arguments import DEFAULT_CONTROL_PLANE_URL, build_parser, worker_argv, worker_count
from modelloop.errors import ModelloopError
from modelloop.storage import default_state_dir, parse_repository


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _cmd_train(args: argparse.Namespace) -> int:
    if args.tune and (args.distributed or args.tf_config_from_index):
        raise ModelloopError("--tune cannot be combined with --distributed")
    if args.distributed or args.tf_config_from_index:
        _quiet_tensorflow()
        from modelloop.training.distributed import train_distributed

        return train_distributed(
            args.spec,
            args.out,
            epochs=args.epochs,
            seed=args.seed,
            folds=args.folds,
            from_index=args.tf_config_from_index,
        )
    from modelloop.training.spec import load_spec

    spec = load_spec(args.spec)
    if args.tune and not spec.search_space:
        raise ModelloopError(f"spec {spec.name!r} declares no SEARCH_SPACE, so --tune has nothing to search")
    _quiet_tensorflow()
    from modelloop.training.train import train

    result = train(spec, args.out, epochs=args.epochs, seed=args.seed, folds=args.folds, tune=args.tune)
    _print_summary(spec.name, result.metrics)
    print(result.run_dir)
    return 0


def _print_summary(name: str, m: dict[str, Any]) -> None:
    metric = m["main_metric"]
    base = ", ".join(f"{k} {v[metric]:.4f}" for k, v in m["baselines"].items())
    test = m["test"][metric]
    print(f"trained {name}: test {metric} {test:.4f} (baselines: {base}); best epoch {m['best_epoch']}")
    print(f"strongest shallow baseline: {m['strongest_baseline']}")
    rob = m["robustness"]
    for who, scores in (("model", rob["model"]), *rob["baselines"].items()):
        shown = ", ".join(f"{key} {value[metric]:.4f}" for key, value in scores.items())
        print(f"robustness {who}: {shown}")
    if m["kfold"]:
        kf = m["kfold"]
        print(f"{kf['folds']}-fold validation {metric}: {kf['mean']:.4f} +/- {kf['std']:.4f}")
    if m["tuning"]:
        best = m["tuning"]["best"]
        tuned = m["tuning"]
        print(
            f"tuning: {tuned['trials_run']} trials in {tuned['seconds']:.0f} s; best {tuned['objective']} "
            f"{best['score']:.4f} with {best['hparams']}"
        )


def _cmd_export(args: argparse.Namespace) -> int:
    from modelloop.export.publish import validate_model_name

    location = parse_repository(args.repo)
    if args.name is not None:
        validate_model_name(args.name)
    _quiet_tensorflow()
    if location.remote:
        from modelloop.export.remote import export_run_remote

        url, parity = export_run_remote(args.run_dir, location, name=args.name)
        print(f"parity passed: {parity.summary()}", file=sys.stderr)
        print(url)
        return 0
    from modelloop.export.exporter import export_run

    result = export_run(args.run_dir, location.local_path("export"), name=args.name)
    print(f"parity passed: {result.parity.summary()}", file=sys.stderr)
    if result.model_py is not None:
        print(
            f"model.py parity passed: max abs diff {result.model_py['max_abs_diff']:.3g} against Keras "
            f"on {result.model_py['rows']} sample inputs",
            file=sys.stderr,
        )
    print(result.version_dir)
    return 0


def _settings_error(exc: Any) -> ModelloopError:
    """A pydantic ValidationError as the CLI's one-line error."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    return ModelloopError(f"invalid setting {where}: {message}" if where else f"invalid settings: {message}")


def _serving_settings(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The serving, monitoring and labeler settings of ``serve`` and ``up``."""
    from pydantic import ValidationError

    from modelloop.monitoring.settings import LabelerSettings, MonitoringSettings
    from modelloop.serving.settings import ServingSettings

    location = parse_repository(args.repo)
    overrides: dict[str, Any] = {
        "repo": location.path if location.path is not None else _repository_cache(location),
        "host": args.host,
        "rest_port": args.rest_port,
        "grpc_port": args.grpc_port,
    }
    # Always given, so a stray MODELLOOP_REPO_URL never turns a local directory into a cache.
    overrides["repo_url"] = location.url if location.remote else None
    if args.poll_interval is not None:
        overrides["poll_interval_s"] = args.poll_interval
    if args.max_loaded_models is not None:
        overrides["max_loaded_models"] = args.max_loaded_models
    if args.grace_period is not None:
        overrides["grace_period_s"] = args.grace_period
    if args.tls_cert is not None:
        overrides["tls_cert_file"] = args.tls_cert
    if args.tls_key is not None:
        overrides["tls_key_file"] = args.tls_key
    overrides["workers"] = args.worker_count or worker_count(args.workers)
    if args.control_plane is not None:
        overrides["control_plane_url"] = args.control_plane
    monitoring: dict[str, Any] = {}
    if args.no_monitoring:
        monitoring["enabled"] = False
    if args.store is not None:
        monitoring["store_url"] = args.store
    if args.log_url is not None:
        monitoring["log_url"] = args.log_url
    if args.state_dir is not None:
        monitoring["state_dir"] = args.state_dir
    try:
        settings = MonitoringSettings(**monitoring)
        return ServingSettings(**overrides), with_default_state_dir(settings, location), LabelerSettings()
    except ValidationError as exc:
        raise _settings_error(exc) from None


def with_default_state_dir(monitoring: Any, location: Any) -> Any:
    """The monitoring settings with the repository's own state directory, unless one was given.

    ``--state-dir`` or ``MODELLOOP_MONITORING_STATE_DIR`` win; otherwise the state goes
    where :func:`modelloop.storage.default_state_dir` says, the same for every command
    that names the repository, wherever it runs from.
    """
    if "state_dir" in monitoring.model_fields_set:
        return monitoring
    return monitoring.model_copy(update={"state_dir": default_state_dir(location)})


def _repository_cache(location: Any) -> Path:
    """The local copy of a remote repository: ``$MODELLOOP_REPO_CACHE/<hash of the URL>``,
    else a directory of this user's under the system's temporary directory.

    The workers of ``--workers N`` share it (each version lands by an atomic rename).
    """
    import hashlib
    import tempfile

    configured = os.environ.get("MODELLOOP_REPO_CACHE", "").strip()
    base = Path(configured) if configured else Path(tempfile.gettempdir()) / f"modelloop-{os.getuid()}"
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelloopError(f"cannot create the repository cache {str(base)!r}: {exc.strerror}") from None
    return base / hashlib.sha256(location.url.encode()).hexdigest()[:16]


def _setup_logging(level: str, worker: int | None = None) -> None:
    import logging

    who = "" if worker is None else f"worker {worker} "
    logging.basicConfig(
        level=level, format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s", stream=sys.stderr
    )


def _serve(
    args: argparse.Namespace,
    on_ready: Any = None,
    labelers: Any = None,
    worker_env: dict[str, str] | None = None,
) -> int:
    """Serves with the settings of ``args``: one process, one worker of several, or their supervisor.

    Args:
        args: The parsed ``serve`` or ``up`` arguments.
        on_ready: Called with the addresses once serving. Defaults to printing them.
        labelers: The labelers' tokens. Defaults to those of the environment.
        worker_env: Variables the workers get besides this process's environment (the
            token file ``up`` made). Defaults to none.
    """
    count = worker_count(args.workers)
    settings, monitoring, from_env = _serving_settings(args)
    labelers = labelers if labelers is not None else from_env
    from modelloop.process import WorkerRole, print_addresses
    from modelloop.server import serve

    if args.worker_index is not None:
        metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if args.worker_count is None or args.worker_fd is None or not metrics_dir:
            raise ModelloopError("--worker-index is for the workers that `serve --workers N` starts")
        role = WorkerRole(args.worker_index, args.worker_count, args.worker_fd, Path(metrics_dir))
        return serve(settings, monitoring=monitoring, labelers=labelers, role=role)
    if count == 1:
        return serve(settings, on_ready=on_ready, monitoring=monitoring, labelers=labelers)
    from modelloop.process import ServerError
    from modelloop.workers import Supervisor, WorkerOptions

    if settings.repo_url is None and not settings.repo.is_dir():
        raise ServerError(f"model repository {str(settings.repo)!r} does not exist or is not a directory")
    options = WorkerOptions(
        count=count,
        argv=worker_argv(args),
        host=settings.host,
        rest_port=settings.rest_port,
        grpc_port=settings.grpc_port,
        grace_period_s=settings.grace_period_s,
        tls=settings.tls,
        max_restarts=settings.worker_max_restarts,
        backoff_s=settings.worker_restart_backoff_s,
        env=dict(worker_env or {}),
    )
    return Supervisor(options, on_ready or print_addresses).run()


def _cmd_serve(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    _setup_logging(args.log_level, args.worker_index)
    if args.control_plane is None and not os.environ.get("MODELLOOP_CONTROL_PLANE_URL"):
        # A server answers and logs; the control plane on this host (modelloop monitor's
        # default port) reads the log. Until one runs, the log waits for it.
        args.control_plane = DEFAULT_CONTROL_PLANE_URL
    return _serve(args)


def _cmd_up(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    _setup_logging(args.log_level)
    from modelloop.up import ControlPlaneProcess, ensure_default_model, print_welcome

    worker_count(args.workers)  # a bad --workers fails before any training
    repo = parse_repository(args.repo).local_path("modelloop up")
    published = ensure_default_model(repo, epochs=args.epochs, rollout=args.rollout)
    if published is not None:
        print(f"modelloop: published {published}", flush=True)
    _, monitoring, labelers = _serving_settings(args)
    token_file: Path | None = None
    if monitoring.enabled and not labelers.configured:
        # The main job authenticates its labelers too: a token of its own, kept in the state
        # directory, where `modelloop simulate` finds it.
        from modelloop.monitoring.settings import LabelerSettings, ensure_feedback_token_file

        try:
            token_file = ensure_feedback_token_file(monitoring.state_dir)
        except OSError as exc:
            raise ModelloopError(
                f"cannot write the feedback token under {str(monitoring.state_dir)!r}: {exc}"
            ) from None
        labelers = LabelerSettings(feedback_token_file=token_file)

    # With --workers N the workers read the token file through the environment.
    env = {"MODELLOOP_FEEDBACK_TOKEN_FILE": str(token_file)} if token_file is not None else {}
    plane: ControlPlaneProcess | None = None
    if monitoring.enabled and args.control_plane is None:
        # The control plane reads the log, analyses and retrains; the server answers and logs.
        argv = ["--repo", str(repo), "--host", args.host, "--log-level", args.log_level]
        argv += ["--state-dir", str(monitoring.state_dir)]
        if args.store is not None:
            argv += ["--store", args.store]
        if args.log_url is not None:
            argv += ["--log-url", args.log_url]
        plane = ControlPlaneProcess(argv, env={**os.environ, **env})
        args.control_plane = plane.start()

    def ready(addresses: Any) -> None:
        print_welcome(addresses, feedback_token=token_file, control_plane=args.control_plane)

    try:
        return _serve(args, on_ready=ready, labelers=labelers, worker_env=env)
    finally:
        if plane is not None:
            plane.stop()


def _cmd_retrain(args: argparse.Namespace) -> int:
    """Exit status 0 blessed, 3 rejected, 1 failed; the last stdout line is the JSON result."""
    import json

    from pydantic import ValidationError

    from modelloop import layout
    from modelloop.control.retraining.gate import format_gate_report
    from modelloop.control.retraining.job import retrain
    from modelloop.control.retraining.settings import RetrainSettings
    from modelloop.control.retraining.trigger import EXIT_BLESSED, EXIT_FAILED, EXIT_REJECTED
    from modelloop.monitoring.quarantine import SourceQuarantine
    from modelloop.monitoring.settings import MonitoringSettings, resolve_quarantine
    from modelloop.monitoring.stores import StoreUnavailable, open_stores
    from modelloop.monitoring.stores.binding import RepositoryMismatch, repository_identity

    location = parse_repository(args.repo)
    repo = location.local_path("modelloop retrain")
    _quiet_tensorflow()
    _setup_logging(args.log_level)
    # A retrain reads feedback and writes its report: the store, not the prediction log.
    given = (("store_url", args.store), ("state_dir", args.state_dir))
    overrides = {k: v for k, v in given if v is not None}
    try:
        monitoring = with_default_state_dir(MonitoringSettings(**overrides), location)
    except ValidationError as exc:
        raise ModelloopError(f"invalid setting: {exc.errors()[0]['msg']}") from None
    settings = RetrainSettings.for_model(repo / args.name, epochs=args.epochs)
    try:
        # The same label checks the server runs: its thresholds, this model's overrides.
        config = layout.read_model_config(repo / args.name)
        block = config.get("feedback") or {}
        if not isinstance(block, dict):
            raise ValueError('invalid feedback settings: "feedback" must be an object')
        checks = resolve_quarantine(monitoring.quarantine, block)
    except (layout.LayoutError, ValueError) as exc:
        raise ModelloopError(str(exc)) from None
    try:
        stores = open_stores(monitoring.resolved_store_url())
    except StoreUnavailable as exc:
        raise ModelloopError(f"cannot open the feedback store: {exc.message}") from None
    try:
        # Labels of another repository's versions must not train this one.
        stores.binding.bind_repository(repository_identity(repo))
    except RepositoryMismatch as exc:
        stores.close()
        raise ModelloopError(exc.message) from None
    except StoreUnavailable as exc:
        stores.close()
        raise ModelloopError(f"cannot open the feedback store: {exc.message}") from None
    try:
        result = retrain(
            repo,
            args.name,
            stores.feedback,
            reports=stores.retrains,
            state_dir=monitoring.state_dir,
            settings=settings,
            screen=SourceQuarantine(stores.feedback, checks),
        )
    finally:
        stores.close()
    published = f"published {args.name} v{result.version}" if result.version else "nothing published"
    print(f"retrain {args.name}: {result.outcome}: {result.reason}; {published}", file=sys.stderr)
    if result.gate is not None:
        print(format_gate_report(result.gate), flush=True)
    print(json.dumps(result.to_dict()), flush=True)
    return {"blessed": EXIT_BLESSED, "rejected": EXIT_REJECTED}.get(result.outcome, EXIT_FAILED)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from modelloop.monitoring.simulate import simulate

    if args.rate < 0:
        raise ModelloopError(f"--rate must be >= 0, got {args.rate}")
    if args.drift_only and not args.drift:
        raise ModelloopError("--drift-only needs --drift")
    simulate(
        args.url,
        drift=args.drift,
        normal=not args.drift_only,
        requests=args.requests,
        batch=args.batch,
        rate=args.rate,
        model=args.model,
        seed=args.seed,
        token=_simulate_token(args.token_file, _simulate_state_dir(args)),
    )
    return 0


def _simulate_state_dir(args: argparse.Namespace) -> Path:
    """The state directory ``simulate`` looks in: ``--state-dir``, the variable, or ``--repo``'s."""
    if args.state_dir is not None:
        return Path(args.state_dir)
    configured = os.environ.get("MODELLOOP_MONITORING_STATE_DIR", "").strip()
    return Path(configured) if configured else default_state_dir(parse_repository(args.repo))


def _simulate_token(token_file: Path | None, state_dir: Path) -> str | None:
    """The labeler token ``simulate`` sends: the named file, the variable, or ``up``'s own token."""
    from modelloop.monitoring.settings import FEEDBACK_TOKEN_FILE
    from modelloop.tokens import read_token_file

    if token_file is None:
        if os.environ.get("MODELLOOP_FEEDBACK_TOKEN"):
            return os.environ["MODELLOOP_FEEDBACK_TOKEN"].strip()
        token_file = state_dir / FEEDBACK_TOKEN_FILE
        if not token_file.is_file():
            return None
    try:
        return read_token_file(token_file, "--token-file")
    except ValueError as exc:
        raise ModelloopError(str(exc)) from None


def _cmd_rollout(args: argparse.Namespace) -> int:
    from modelloop.control.rollout.cli import admin_token, run_rollout

    run_rollout(args.action, args.name, args.url, token=admin_token(args.token_file))
    return 0


def _monitoring_settings(args: argparse.Namespace, repo: str) -> Any:
    """The store and state directory of ``monitor`` and ``log``: the same defaults as ``serve``'s."""
    from pydantic import ValidationError

    from modelloop.monitoring.settings import MonitoringSettings

    given = (("store_url", args.store), ("state_dir", args.state_dir), ("log_url", args.log_url))
    overrides = {k: v for k, v in given if v is not None}
    try:
        return with_default_state_dir(MonitoringSettings(**overrides), parse_repository(repo))
    except ValidationError as exc:
        raise _settings_error(exc) from None


def _cmd_monitor(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    _setup_logging(args.log_level)
    from pydantic import ValidationError

    from modelloop.monitor import monitor
    from modelloop.monitoring.settings import LabelerSettings
    from modelloop.serving.settings import ServingSettings

    repo = parse_repository(args.repo).local_path("modelloop monitor")
    monitoring = _monitoring_settings(args, args.repo)
    try:
        # The admin token (the alert webhook's) and the labelers' tokens, as `serve` reads them.
        serving = ServingSettings(repo=repo)
        admin = serving.admin_token
        labelers = LabelerSettings()
    except ValidationError as exc:
        raise _settings_error(exc) from None
    plane = {
        "repo": repo,
        "monitoring": monitoring,
        "labelers": labelers,
        "admin_token": admin.get_secret_value() if admin is not None else None,
        "host": args.host,
        "port": args.port,
        "cors_origins": list(serving.cors_origins),
        "rollout": serving.rollout,
    }
    return monitor(plane)


def _since(text: str) -> float:
    from datetime import datetime

    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ModelloopError(f"invalid --since {text!r}: give Unix seconds or an ISO 8601 time") from None


def _cmd_log(args: argparse.Namespace) -> int:
    from modelloop.monitoring.predlog_objects import ObjectPredictionLog
    from modelloop.monitoring.predlog_store import SqlPredictionLog, export_parquet
    from modelloop.monitoring.stores import Stores, StoreUnavailable, open_stores
    from modelloop.storage import StorageError

    since = _since(args.since)
    monitoring = _monitoring_settings(args, args.repo)
    stores: Stores | None = None
    try:
        if monitoring.log_url is not None:
            # Objects under a prefix: nothing of the store is needed to read them.
            try:
                log: Any = ObjectPredictionLog(monitoring.log_url)
            except StorageError as exc:
                raise ModelloopError(f"invalid --log-url: {exc}") from None
        else:
            stores = open_stores(monitoring.resolved_store_url())
            log = SqlPredictionLog(stores.engine)
        rows = export_parquet(log, args.model, since, args.out)
    except StoreUnavailable as exc:
        raise ModelloopError(f"cannot read the prediction log: {exc.message}") from None
    except OSError as exc:
        raise ModelloopError(f"cannot write {str(args.out)!r}: {exc.strerror or exc}") from None
    finally:
        if stores is not None:
            stores.close()
    print(f"modelloop: wrote {rows} logged predictions of {args.model} to {args.out}", flush=True)
    return 0


COMMANDS = {
    "monitor": _cmd_monitor,
    "log": _cmd_log,
    "train": _cmd_train,
    "export": _cmd_export,
    "serve": _cmd_serve,
    "up": _cmd_up,
    "retrain": _cmd_retrain,
    "simulate": _cmd_simulate,
    "rollout": _cmd_rollout,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI and returns the exit status.

    User errors print ``modelloop: error: <reason>`` on one line and return 1;
    argument errors return 2, as argparse does.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ModelloopError as exc:
        print(f"modelloop: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("modelloop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
