"""The benchmark suite's pieces, without a load test: speed is measured by ``make bench``, never here."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from bench import loadgen, payloads
from bench.report import (
    SCHEMA,
    TARGETS,
    Report,
    Row,
    render_markdown,
    write_chart,
    write_json,
    write_markdown,
)
from bench.suite import parse_args


def test_bodies_decode_with_the_serving_codecs(tmp_path):
    from tensorflow_serving.apis import predict_pb2

    from modelloop.serving.protos import grpc_service_pb2 as pb

    row = payloads.sample_row(64)
    paths = payloads.write_bodies(tmp_path, "digits", "pixels", row)
    assert set(paths) == {"tfserving_rest", "v2_rest", "tfserving_grpc", "v2_grpc"}

    assert json.loads(paths["tfserving_rest"].read_bytes()) == {"instances": row.tolist()}
    v2 = json.loads(paths["v2_rest"].read_bytes())
    assert v2["inputs"][0] | {"data": None} == {
        "name": "pixels",
        "shape": [1, 64],
        "datatype": "FP32",
        "data": None,
    }
    assert v2["inputs"][0]["data"] == row.ravel().tolist()

    for protocol, message in (
        ("tfserving_grpc", predict_pb2.PredictRequest),
        ("v2_grpc", pb.ModelInferRequest),
    ):
        framed = paths[protocol].read_bytes()
        flag, length = struct.unpack(">BI", framed[:5])
        assert flag == 0 and length == len(framed) - 5
        parsed = message.FromString(framed[5:])
        if protocol == "tfserving_grpc":
            assert parsed.model_spec.name == "digits"
            got = np.frombuffer(parsed.inputs["pixels"].tensor_content, "<f4").reshape(1, 64)
        else:
            assert parsed.model_name == "digits" and parsed.inputs[0].datatype == "FP32"
            got = np.frombuffer(parsed.raw_input_contents[0], "<f4").reshape(list(parsed.inputs[0].shape))
        np.testing.assert_array_equal(got, row)


def test_lua_script_posts_the_body_and_prints_a_summary(tmp_path):
    body = tmp_path / "body.json"
    script = loadgen.render_lua("/v1/models/digits:predict", body)
    assert 'wrk.method = "POST"' in script
    assert 'wrk.path = "/v1/models/digits:predict"' in script
    assert f'io.open("{body}", "rb")' in script
    assert "done = function(summary, latency, requests)" in script
    assert "latency:percentile(99)" in script
    with pytest.raises(ValueError):
        loadgen.render_lua('/x"; os.exit() --', body)


def test_wrk_summary_is_parsed():
    line = (
        'BENCH_JSON {"requests":20000,"duration_us":2000000,"p50_us":1500,"p99_us":4200,"mean_us":1600.0,'
        '"connect":0,"read":1,"write":0,"status":2,"timeout":0}'
    )
    result = loadgen.parse_wrk("Running 2s test\n" + line + "\n")
    assert result.requests_per_s == pytest.approx(10000)
    assert (result.p50_ms, result.p99_ms, result.errors) == (1.5, 4.2, 3)
    with pytest.raises(ValueError):
        loadgen.parse_wrk("unable to connect")


def test_h2load_summary_and_log_are_parsed():
    output = (
        "finished in 2.00s, 500.00 req/s, 100KB/s\n"
        "requests: 1000 total, 1000 started, 1000 done, 999 succeeded, 1 failed, 0 errored, 0 timeout\n"
    )
    log = [f"{i}\t200\t{1000 + i}" for i in range(99)] + ["99\t503\t9000"]
    result = loadgen.parse_h2load(output, log)
    assert result.requests == 100 and result.duration_s == 2.0
    assert result.requests_per_s == pytest.approx(50)
    assert result.p50_ms == pytest.approx(1.049)
    assert result.p99_ms == pytest.approx(1.098)
    assert result.errors == 1


def _report() -> Report:
    report = Report(
        timestamp="20260101T000000Z",
        command="python -m bench --quick",
        machine={"cpu": "test cpu", "cores": 2, "server_cpu": 0, "load_cpu": 1},
        settings={"duration_s": 3.0, "warmup_s": 1.0},
    )
    report.rows += [
        Row("asgi.tfserving_rest.c1", "bare ASGI", "reference", 1, 9000.0, p50_ms=0.1, p99_ms=0.2),
        Row("ours.tfserving_rest.c1", "TF REST :predict", "ours", 1, 3000.0, p50_ms=0.25, p99_ms=0.5),
        Row("asgi.tfserving_rest.c32", "bare ASGI", "reference", 32, 20000.0, p50_ms=1.0, p99_ms=2.0,
            cpu_us=50.0),
        Row("ceiling.tfserving_rest.c32", "FastAPI no-op", "reference", 32, 10000.0, p50_ms=3.0, p99_ms=5.0),
        Row("ours.tfserving_rest.c32", "TF REST :predict", "ours", 32, 7000.0, p50_ms=4.0, p99_ms=9.0,
            cpu_us=140.0),
        Row("ours.v2_rest.c32", "OIP V2 REST infer", "ours", 32, 5000.0, p50_ms=6.0, p99_ms=12.0),
        Row("ort.heavy.b32", "in-process ORT heavy, batch 32", "reference", None, 12000.0, "rows/s",
            rows_per_request=32),
        Row("ceiling.heavy_grpc.c64", "grpc.aio no-op, heavy", "reference", 64, 5000.0),
        Row("heavy.batched.c64", "heavy, batching", "heavy", 64, 4000.0, p50_ms=9.0, p99_ms=20.0),
        Row("heavy.unbatched.c64", "heavy, batching off", "heavy", 64, 1000.0, p50_ms=60.0, p99_ms=90.0),
        Row("heavy.rows32.c8", "heavy, 32-row requests", "heavy", 8, 300.0, rows_per_request=32),
    ]  # fmt: skip
    report.startup = {"ready_s": 2.5, "rss_mib": 180.0, "tensorflow": False}
    report.rss = {
        "launch_bytes": 200 * 2**20,
        "start_bytes": 210 * 2**20,
        "end_bytes": 215 * 2**20,
        "growth": 5 / 210,
        "duration_s": 60.0,
        "connections": 32,
        "endpoint": "TF Serving REST :predict",
        "requests": 1,
    }
    return report


def test_result_json_schema_round_trips(tmp_path):
    report = _report()
    path = tmp_path / "r.json"
    write_json(report, path)
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA
    assert {"timestamp", "command", "machine", "settings", "rows", "targets", "comparisons", "rss"} <= set(
        data
    )
    for row in data["rows"]:
        assert {"key", "label", "group", "connections", "throughput", "unit", "p50_ms", "p99_ms", "errors",
                "rows_per_s"} <= set(row)  # fmt: skip
    targets = {t["name"]: t for t in data["targets"]}
    assert len(targets) == len(TARGETS)
    rest = targets["TF Serving REST :predict / bare ASGI no-op (32 conn)"]
    assert rest["value"] == pytest.approx(0.35) and rest["met"] is True
    p50 = targets["TF Serving REST p50 / bare ASGI p50 (1 conn)"]
    assert p50["value"] == pytest.approx(2.5) and p50["met"] is True
    cpu = targets["TF Serving REST CPU per request / bare ASGI's (32 conn)"]
    assert cpu["value"] == pytest.approx(2.8) and cpu["met"] is True
    assert targets["OIP V2 REST infer / bare ASGI no-op (32 conn)"]["met"] is None  # its ceiling was not run
    assert targets["ONNX server RSS after load (MiB)"]["value"] == 180.0
    assert targets["ONNX server ready after launch (s)"]["met"] is True
    many = targets["heavy, 32-row requests / in-process ORT batch 32 (rows/s)"]
    assert many["value"] == pytest.approx(0.8) and many["met"] is True
    comparisons = {t["name"]: t for t in data["comparisons"]}
    # The limit is the lower of in-process rows/s (12,000) and the one-row ceiling (5,000).
    assert comparisons["heavy, batching, 1 worker / its limit (rows/s)"]["value"] == pytest.approx(0.8)
    assert comparisons["heavy, batching, 2 workers / its limit (rows/s)"]["value"] is None
    assert comparisons["heavy, batching / batching off (64 conn)"]["value"] == pytest.approx(4.0)
    assert Report.from_dict(data).to_dict() == data
    with pytest.raises(ValueError):
        Report.from_dict(data | {"schema": "other"})


def test_markdown_table_shows_rows_ratios_and_rss(tmp_path):
    text = render_markdown(_report())
    assert "| point | group | conns | throughput | p50 ms | p99 ms | CPU µs/req | errors | vs ref |" in text
    assert "| TF REST :predict | ours | 32 | 7,000 req/s | 4.00 | 9.00 | 140 | 0 | 0.35 × bare ASGI |" in text
    assert "| TF Serving REST CPU per request / bare ASGI's (32 conn) | 2.80 | ≤ 3 | met |" in text
    assert "| OIP V2 REST infer / bare ASGI no-op (32 conn) | - | ≥ 0.3 | - |" in text
    assert "| ONNX server RSS after load (MiB) | 180.00 | ≤ 300 | met |" in text
    assert "ready 2.50 s after launch, 180 MiB resident once loaded; TensorFlow loaded: no" in text
    assert "growth +2.4 %" in text
    write_chart(_report(), tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"


def test_markdown_page_says_it_is_generated(tmp_path):
    # The page the docs link to instead of quoting a run: its header names what writes it.
    page = tmp_path / "generated" / "bench.md"
    write_markdown(_report(), page)
    text = page.read_text()
    assert text.startswith("# The last benchmark run\n")
    assert "Generated by `make bench`" in text and "](../performance.md)" in text
    assert text.endswith(render_markdown(_report()))


def test_the_suite_writes_the_generated_page_by_default():
    assert parse_args([]).markdown == Path(__file__).resolve().parents[2] / "docs" / "generated" / "bench.md"


def test_cpu_time_counts_the_process_tree(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from bench import processes

    # A parent that starts a child which burns CPU: the child is found and its time counted.
    burn = (
        "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\ntime.sleep(60)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])"]
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and processes.tree_cpu_seconds(parent.pid) < 0.5:
            time.sleep(0.05)
        children = processes.descendants(parent.pid)
        assert len(children) == 1
        assert processes.tree_cpu_seconds(parent.pid) >= 0.5
        assert processes.tree_rss_bytes(parent.pid) > processes.tree_rss_bytes(children[0]) > 0
    finally:
        for pid in processes.descendants(parent.pid):
            os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait(timeout=10)


def test_arguments_quick_and_explicit_duration():
    args = parse_args(["--quick"])
    assert (args.duration, args.warmup) == (3.0, 1.0)
    assert parse_args(["--quick", "--duration", "2"]).duration == 2.0
    assert parse_args([]).duration == 10.0
    assert parse_args([]).heavy_workers == [1, 2]
    assert parse_args(["--heavy-workers", "1"]).heavy_workers == [1]
    assert parse_args(["--compare-tree", "before=/tmp"]).compare_tree == [("before", Path("/tmp").resolve())]
    with pytest.raises(SystemExit):
        parse_args(["--only", "nothing"])
    with pytest.raises(SystemExit):
        parse_args(["--compare-tree", "ours=/tmp"])


def test_tracing_adds_a_traced_variant_and_its_sink_takes_spans():
    import httpx

    from bench.otlp_sink import otlp_sink

    args = parse_args(["--tracing", "--variant", "nomon=--no-monitoring"])
    assert args.variant == [("nomon", ["--no-monitoring"]), ("traced", [])]
    with pytest.raises(SystemExit):
        parse_args(["--variant", "traced=--no-monitoring"])  # the name is taken
    with otlp_sink() as sink, httpx.Client() as client:
        for _ in range(2):
            answer = client.post(f"{sink.url}/v1/traces", content=b"\x0a\x00")
            assert answer.status_code == 200 and answer.content == b""
    assert (sink.posts, sink.bytes) == (2, 4)
