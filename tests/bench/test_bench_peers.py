"""The peers' wiring and their targets (no peer is installed or started here)."""

from __future__ import annotations

from pathlib import Path

from bench import peers
from bench.report import Report, Row
from bench.suite import PROTOCOLS, parse_args


def _row(key: str, throughput: float) -> Row:
    return Row(key=key, label=key, group="peer", connections=32, throughput=throughput)


def test_each_peer_names_its_pins_script_and_protocols() -> None:
    assert len({peer.name for peer in peers.PEERS}) == len(peers.PEERS)
    for peer in peers.PEERS:
        assert all("==" in pin for pin in peer.requirements)
        assert set(peer.protocols) <= set(PROTOCOLS)
        script, model = peers.server_args(peer, Path("/m/model.onnx"))
        assert Path(script).is_file() and model == "/m/model.onnx"
    assert parse_args(["--peers"]).peers


def test_the_v2_rest_target_is_against_the_best_peer_and_a_missing_peer_is_no_verdict() -> None:
    report = Report(timestamp="t", command="c", machine={}, settings={})
    report.rows = [
        _row("ours.tfserving_rest.c32", 3000.0),
        _row("kserve.tfserving_rest.c32", 1000.0),
        _row("ours.v2_rest.c32", 2400.0),
        _row("kserve.v2_rest.c32", 600.0),
        _row("mlserver.v2_rest.c32", 1200.0),
    ]
    ratios = {r.name: r for r in report.ratios()}
    v1 = ratios["TF Serving REST :predict / KServe V1 (32 conn, --peers)"]
    assert v1.value == 3.0 and v1.met
    v2 = ratios["OIP V2 REST infer / the best V2 REST peer (32 conn, --peers)"]
    assert v2.value == 2.0 and v2.met is False
    grpc = ratios["OIP gRPC ModelInfer / KServe gRPC (32 conn, --peers)"]
    assert grpc.value is None and grpc.met is None
