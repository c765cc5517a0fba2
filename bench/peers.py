"""The peers of ``python -m bench --peers``: KServe's and MLServer's servers on the same model.

Each peer gets a virtualenv of its own under ``bench/.cache/peers/<name>`` with its pinned
release and the ONNX Runtime version ours runs (so the model call costs the same), made on
first use (a minute or two each, from the package index) and kept while the pins are the
same. Its server script (``bench/peer_kserve.py``, ``bench/peer_mlserver.py``) serves the
digits ONNX model with ``session.run`` per request, as each project's docs show a custom
model, and prints its addresses as ``modelloop serve`` does.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.models import CACHE

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Peer:
    """One peer server: its pins, its script and the digits protocols it serves."""

    name: str
    requirements: tuple[str, ...]
    script: str
    protocols: tuple[str, ...]


def _onnxruntime() -> str:
    # Ours may be the onnxruntime-gpu distribution; the peers get the CPU one of that version.
    import onnxruntime

    return f"onnxruntime=={onnxruntime.__version__}"


PEERS: tuple[Peer, ...] = (
    Peer("kserve", ("kserve==0.21.0",), "peer_kserve.py", ("tfserving_rest", "v2_rest", "v2_grpc")),
    Peer("mlserver", ("mlserver==1.7.1",), "peer_mlserver.py", ("v2_rest", "v2_grpc")),
)


def ensure_venv(peer: Peer, cache: Path = CACHE) -> Path:
    """The peer's Python, its virtualenv made (or remade, when its pins changed) first.

    The virtualenvs live in this checkout's ``bench/.cache`` whatever ``--cache`` says
    (that is where the models are).

    Raises:
        subprocess.CalledProcessError: ``venv`` or ``pip`` failed.
    """
    root = cache / "peers" / peer.name
    python = root / "bin" / "python"
    pins = "\n".join((*peer.requirements, _onnxruntime())) + "\n"
    stamp = root / ".installed"
    if python.exists() and stamp.exists() and stamp.read_text() == pins:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins.split()],
        check=True,
        timeout=1200,
    )
    stamp.write_text(pins)
    return python


def server_args(peer: Peer, model: Path) -> list[str]:
    """The peer's server command line after its Python."""
    return [str(HERE / peer.script), str(model)]
