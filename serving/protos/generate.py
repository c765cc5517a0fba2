"""Regenerates the Python modules of ``grpc_service.proto``.

Run it after editing the ``.proto``::

    .venv/bin/python -m modelloop.serving.protos.generate

It calls ``grpc_tools.protoc`` (the ``grpcio-tools`` dev dependency) and rewrites the
generated ``import grpc_service_pb2`` in ``grpc_service_pb2_grpc.py`` to an absolute
import under ``modelloop.serving.protos``, because protoc emits a top-level import that
would only work with this folder on ``sys.path``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_NAME = "grpc_service.proto"
GENERATED = ("grpc_service_pb2.py", "grpc_service_pb2.pyi", "grpc_service_pb2_grpc.py")
PACKAGE = "modelloop.serving.protos"


def generate(out_dir: Path, proto: Path = PROTO_DIR / PROTO_NAME) -> list[Path]:
    """Generates the ``grpc_service`` modules into ``out_dir``.

    Args:
        out_dir: Folder that receives ``grpc_service_pb2.py``, ``.pyi`` and
            ``grpc_service_pb2_grpc.py``; created if missing.
        proto: The ``.proto`` to compile; the module names follow its file name, so it is
            a ``grpc_service.proto``. Defaults to ours.

    Returns:
        The paths written.

    Raises:
        RuntimeError: protoc failed.

    Example:

    >>> import tempfile
    >>> paths = generate(Path(tempfile.mkdtemp()))
    >>> sorted(p.name for p in paths)
    ['grpc_service_pb2.py', 'grpc_service_pb2.pyi', 'grpc_service_pb2_grpc.py']
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # protoc runs in a child process: grpc_tools links its own copy of protobuf, which
    # crashes a process that has already loaded TensorFlow's (as the test suite has).
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto.parent}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(proto),
    ]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed on {proto}: {result.stderr.strip()}")
    grpc_module = out_dir / "grpc_service_pb2_grpc.py"
    text = grpc_module.read_text()
    text, count = re.subn(
        r"^import grpc_service_pb2 as grpc__service__pb2$",
        f"from {PACKAGE} import grpc_service_pb2 as grpc__service__pb2",
        text,
        flags=re.MULTILINE,
    )
    if count != 1:
        raise RuntimeError("generated grpc module has no 'import grpc_service_pb2' line to rewrite")
    grpc_module.write_text(text)
    return [out_dir / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    """Command line entry: regenerates the modules in place (or into ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help="output folder (default: in place)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
