"""The committed OIP gRPC modules are exactly what ``generate`` makes from the ``.proto``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modelloop.serving.protos import generate, grpc_service_pb2, grpc_service_pb2_grpc


def test_committed_modules_match_a_fresh_generation(tmp_path: Path) -> None:
    for fresh in generate.generate(tmp_path):
        committed = generate.PROTO_DIR / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.name} is stale: run `python -m modelloop.serving.protos.generate`"
        )


def test_grpc_module_imports_messages_from_our_package() -> None:
    source = Path(grpc_service_pb2_grpc.__file__).read_text()
    assert "from modelloop.serving.protos import grpc_service_pb2" in source
    assert "\nimport grpc_service_pb2" not in source


def test_wire_names_and_field_numbers_follow_the_public_spec() -> None:
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    core = {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"}
    assert core <= set(service.methods_by_name)

    def numbers(message: type) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert numbers(grpc_service_pb2.ModelInferRequest) == {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "inputs": 5,
        "outputs": 6,
        "raw_input_contents": 7,
    }
    assert numbers(grpc_service_pb2.ModelInferResponse) == {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "outputs": 5,
        "raw_output_contents": 6,
    }
    assert numbers(grpc_service_pb2.ModelInferRequest.InferInputTensor) == {
        "name": 1,
        "datatype": 2,
        "shape": 3,
        "parameters": 4,
        "contents": 5,
    }
    assert numbers(grpc_service_pb2.InferTensorContents) == {
        "bool_contents": 1,
        "int_contents": 2,
        "int64_contents": 3,
        "uint_contents": 4,
        "uint64_contents": 5,
        "fp32_contents": 6,
        "fp64_contents": 7,
        "bytes_contents": 8,
    }
    assert numbers(grpc_service_pb2.InferParameter) == {
        "bool_param": 1,
        "int64_param": 2,
        "string_param": 3,
        "double_param": 4,
        "uint64_param": 5,
    }


def test_the_command_regenerates_into_a_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "modelloop.serving.protos.generate", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert sorted(Path(line).name for line in result.stdout.splitlines()) == sorted(generate.GENERATED)
    for name in generate.GENERATED:
        assert (out / name).read_text() == (generate.PROTO_DIR / name).read_text()


def test_a_proto_protoc_refuses_is_reported_with_protocs_message(tmp_path: Path) -> None:
    proto = tmp_path / "grpc_service.proto"
    proto.write_text('syntax = "proto3";\nmessage Broken { int32 x = ; }\n')
    with pytest.raises(RuntimeError, match=r"protoc failed on .*grpc_service\.proto: .*Expected"):
        generate.generate(tmp_path / "out", proto)


def test_a_proto_without_the_service_has_nothing_to_rewrite(tmp_path: Path) -> None:
    # Without a service, protoc's grpc module imports no messages: the rewrite has no line to fix.
    proto = tmp_path / "grpc_service.proto"
    proto.write_text('syntax = "proto3";\npackage inference;\nmessage Only { int32 x = 1; }\n')
    with pytest.raises(RuntimeError, match="no 'import grpc_service_pb2' line to rewrite"):
        generate.generate(tmp_path / "out", proto)
