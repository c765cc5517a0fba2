"""The per-request budget's pieces: py-spy's stacks read, sorted into stages and printed (no profiler run)."""

from __future__ import annotations

from bench.profile import EDGE, ORDER, Budget, budget_from_stacks, classify, parse_raw, render_budgets
from bench.report import Report, render_markdown
from bench.suite import parse_args

LOOP = "serve (modelloop/server.py:609);Runner.run (asyncio/runners.py:118)"
REST = (
    LOOP + ";RestApp.__call__ (modelloop/serving/rest/app.py:137);PredictFastPath._answer (x/fastpath.py:121)"
)
HANDLE = (
    REST + ";answer_predict (x/routes_tfserving.py:155);DataPlane.handle (modelloop/serving/dataplane.py:456)"
)
DECODE = "PredictDecoder.decode (modelloop/serving/rest/routes_tfserving.py:120)"
JSON = "decode_predict_request (modelloop/serving/codecs/tfserving_json.py:108);loads (orjson:1)"
RUN = "OnnxRuntime.predict (modelloop/serving/runtimes/onnx.py:237);Session.run (site-packages/ort/x.py:395)"
METRICS = "ServingMetrics.observe_request (modelloop/serving/metrics.py:161);inc (prometheus_client/v.py:27)"
UVICORN = "HttpToolsProtocol.data_received (site-packages/uvicorn/protocols/http/httptools_impl.py:174)"
THREAD = "Thread._bootstrap (threading.py:1002)"
RAW = "\n".join(
    [
        f"{HANDLE};{DECODE};{JSON} 30",
        f"{HANDLE};DynamicBatcher.predict (modelloop/serving/batching.py:199) 10",
        f"{HANDLE};DynamicBatcher._flush_inline (b.py:1);{RUN} 20",
        f"{HANDLE};{METRICS} 5",
        f"{LOOP};{UVICORN} 15",
        f"{LOOP} 10",
        f"{THREAD};LogIngest._run (modelloop/monitoring/ingest.py:177);_unique1d (numpy/x.py:3) 8",
        f"{THREAD};Thread.run (threading.py:982);Condition.wait (threading.py:331) 50",
        "not a stack line",
    ]
)


def test_raw_stacks_are_read_root_first_with_their_counts() -> None:
    stacks = parse_raw(RAW)
    assert sum(stacks.values()) == 148
    assert all(stack[0].startswith(("serve", "Thread._bootstrap")) for stack in stacks)


def test_the_innermost_known_frame_decides_and_background_threads_are_monitoring() -> None:
    stages = {stack[-1].split(" ")[0]: classify(stack) for stack in parse_raw(RAW)}
    assert stages["loads"] == "parse"
    assert stages["DynamicBatcher.predict"] == "batch hand-off"
    assert stages["Session.run"] == "run"
    assert stages["inc"] == "metrics"
    assert stages["HttpToolsProtocol.data_received"] == "read"
    assert stages["Runner.run"] == EDGE
    assert stages["_unique1d"] == "monitoring (threads)"


def test_waiting_threads_are_left_out_and_the_budget_adds_up_to_the_cpu_per_request() -> None:
    budget = budget_from_stacks("ours tfserving_rest", parse_raw(RAW), cpu_us=196.0)
    assert budget.total_samples == 98  # the 50 samples of a waiting thread are not CPU time
    assert budget.stage_us("parse") == 60.0
    assert budget.stage_us("run") == 40.0
    assert abs(sum(budget.stage_us(stage) for stage in ORDER) - 196.0) < 1e-9
    table = render_budgets([budget])
    assert "| parse | 60 |" in table and "| **CPU per request** | **196** |" in table


def test_the_report_prints_the_budgets_it_holds() -> None:
    budget = Budget("ours v2_grpc", 500.0, {stage: 1 for stage in ORDER})
    report = Report(timestamp="t", command="c", machine={}, settings={}, budgets=[budget.to_dict()])
    text = render_markdown(report)
    assert "Per-request budget" in text and "| ours v2_grpc |" in text
    assert Report.from_dict(report.to_dict()).budgets == report.budgets


def test_profile_is_an_option_of_the_suite() -> None:
    assert parse_args(["--profile", "--flame"]).profile
    assert not parse_args([]).profile
