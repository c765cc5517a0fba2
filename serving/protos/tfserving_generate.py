"""Regenerates the TF Serving protocol modules, so that serving never imports TensorFlow.

``tensorflow-serving-api`` ships its messages as Python modules that import TensorFlow's
own (``tensorflow.core.framework.tensor_pb2`` and the rest), and importing any of those
imports the whole of TensorFlow: hundreds of MiB and seconds of start-up for a server that
only speaks the protocol. This module writes just the ``.proto`` files the server needs
(the ``tensorflow_serving/apis`` messages and services it serves, and the
``tensorflow/core`` messages they use, :data:`ROOTS` and their imports) and compiles them
with ``grpcio-tools`` into flat modules of ``modelloop.serving.protos.tfserving``.

The ``.proto`` files are the published definitions of the installed
``tensorflow-serving-api`` and ``tensorflow``, written out from their compiled
descriptors with the same file names, packages, message names, field numbers and
options. So protoc builds byte-identical descriptors: the wire format is the same, and a
process that later loads TensorFlow (a SavedModel runtime) finds the files already in
the descriptor pool, identical, and shares one set of message classes with it.

Run it after upgrading ``tensorflow-serving-api`` (it needs the package installed)::

    .venv/bin/python -m modelloop.serving.protos.tfserving_generate

Use ``--compile-only`` to rebuild the Python modules from the committed ``.proto`` files.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent / "tfserving"
PROTO_ROOT = PACKAGE_DIR / "proto"
PACKAGE = "modelloop.serving.protos.tfserving"

ROOTS = (
    "tensorflow_serving.apis.prediction_service_pb2",
    "tensorflow_serving.apis.model_service_pb2",
    "tensorflow_serving.apis.prediction_log_pb2",
)
"""The service modules the server implements, and ``PredictionLog`` (the records of a
version's ``assets.extra/tf_serving_warmup_requests``); everything they import comes along."""

GRPC_FILES = (
    "tensorflow_serving/apis/prediction_service.proto",
    "tensorflow_serving/apis/model_service.proto",
)
"""The files whose services get ``*_pb2_grpc`` stubs."""

_SCALARS = {
    1: "double",
    2: "float",
    3: "int64",
    4: "uint64",
    5: "int32",
    6: "fixed64",
    7: "fixed32",
    8: "bool",
    9: "string",
    12: "bytes",
    13: "uint32",
    15: "sfixed32",
    16: "sfixed64",
    17: "sint32",
    18: "sint64",
}
_MESSAGE, _ENUM, _GROUP = 11, 14, 10
_OPTIONAL, _REQUIRED, _REPEATED = 1, 2, 3
_JSTYPE = {0: "JS_NORMAL", 1: "JS_STRING", 2: "JS_NUMBER"}
_MAX_FIELD = 536870911  # 2**29 - 1: "max" in a reserved range


def module_name(proto_path: str, suffix: str = "_pb2") -> str:
    """The flat module name of a ``.proto`` path: its path with ``/`` as ``_``.

    Example:

    >>> module_name("tensorflow_serving/apis/predict.proto")
    'tensorflow_serving_apis_predict_pb2'
    """
    return proto_path.removesuffix(".proto").replace("/", "_").replace(".", "_") + suffix


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Raw(str):
    """An option value written without quotes (an enum constant)."""


def _options(pairs: Iterable[tuple[str, Any]]) -> list[str]:
    out = []
    for name, value in pairs:
        if isinstance(value, _Raw):
            out.append(f"{name} = {value}")
        elif isinstance(value, bool):
            out.append(f"{name} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            out.append(f"{name} = {_quote(value)}")
        else:
            out.append(f"{name} = {value}")
    return out


def _set_fields(message: Any) -> list[tuple[str, Any]]:
    return [(field.name, value) for field, value in message.ListFields()]


class _Printer:
    """Writes one ``FileDescriptorProto`` as ``.proto`` source that protoc compiles back to it."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.proto3 = file.syntax == "proto3"
        self.lines: list[str] = []

    def emit(self, depth: int, text: str) -> None:
        self.lines.append("  " * depth + text if text else "")

    def render(self) -> str:
        f = self.file
        self.emit(0, "// Written by modelloop.serving.protos.tfserving_generate from the published")
        self.emit(0, "// definitions of the installed tensorflow-serving-api and tensorflow. Do not edit.")
        self.emit(0, f'syntax = "{"proto3" if self.proto3 else "proto2"}";')
        self.emit(0, "")
        if f.package:
            self.emit(0, f"package {f.package};")
            self.emit(0, "")
        public = set(f.public_dependency)
        for index, dep in enumerate(f.dependency):
            self.emit(0, f"import {'public ' if index in public else ''}{_quote(dep)};")
        if f.dependency:
            self.emit(0, "")
        for option in _options(_set_fields(f.options)):
            self.emit(0, f"option {option};")
        if f.options.ListFields():
            self.emit(0, "")
        for enum in f.enum_type:
            self.enum(0, enum)
        for message in f.message_type:
            self.message(0, message)
        for service in f.service:
            self.service(service)
        return "\n".join(self.lines).rstrip() + "\n"

    def type_of(self, field: Any, message: Any) -> str:
        if field.type in (_MESSAGE, _ENUM):
            return str(field.type_name)
        if field.type == _GROUP:
            raise ValueError(f"groups are not supported ({message.name}.{field.name})")
        return _SCALARS[field.type]

    def field_options(self, field: Any) -> str:
        pairs = []
        if field.HasField("json_name"):
            pairs.append(("json_name", field.json_name))
        if field.HasField("default_value"):
            raise ValueError(f"default values are not supported ({field.name})")
        for name, value in _set_fields(field.options):
            if name == "jstype":
                pairs.append((name, _Raw(_JSTYPE[value])))
            else:
                pairs.append((name, value))
        return f" [{', '.join(_options(pairs))}]" if pairs else ""

    def field(self, depth: int, field: Any, message: Any, entries: dict[str, Any]) -> None:
        entry = entries.get(field.type_name.rsplit(".", 1)[-1]) if field.type == _MESSAGE else None
        if entry is not None and field.label == _REPEATED:
            key, value = entry.field[0], entry.field[1]
            kind = f"map<{self.type_of(key, entry)}, {self.type_of(value, entry)}>"
            self.emit(depth, f"{kind} {field.name} = {field.number}{self.field_options(field)};")
            return
        label = ""
        if field.label == _REPEATED:
            label = "repeated "
        elif field.label == _REQUIRED:
            label = "required "
        elif field.proto3_optional or (not self.proto3 and not field.HasField("oneof_index")):
            label = "optional "
        kind = self.type_of(field, message)
        self.emit(depth, f"{label}{kind} {field.name} = {field.number}{self.field_options(field)};")

    def message(self, depth: int, message: Any) -> None:
        self.emit(depth, f"message {message.name} {{")
        inner = depth + 1
        for option in _options((n, v) for n, v in _set_fields(message.options) if n != "map_entry"):
            self.emit(inner, f"option {option};")
        entries = {n.name: n for n in message.nested_type if n.options.map_entry}
        for enum in message.enum_type:
            self.enum(inner, enum)
        # protoc appends a map's entry type to nested_type when it parses the map field, so
        # the order of nested types and map fields is interleaved as it was written.
        fields = list(message.field)
        done = 0
        real_oneofs = {
            i for i, f in enumerate(message.field) if f.HasField("oneof_index") and not f.proto3_optional
        }
        for nested in message.nested_type:
            if not nested.options.map_entry:
                self.message(inner, nested)
                continue
            owner = next(i for i, f in enumerate(fields) if f.type_name.endswith("." + nested.name))
            done = self.fields(inner, message, fields, done, owner + 1, entries, real_oneofs)
        self.fields(inner, message, fields, done, len(fields), entries, real_oneofs)
        for start, end in ((r.start, r.end) for r in message.reserved_range):
            self.emit(inner, f"reserved {_range(start, end - 1)};")
        if message.reserved_name:
            self.emit(inner, f"reserved {', '.join(_quote(n) for n in message.reserved_name)};")
        if message.extension_range or message.extension:
            raise ValueError(f"extensions are not supported ({message.name})")
        self.emit(depth, "}")

    def fields(
        self,
        depth: int,
        message: Any,
        fields: list[Any],
        start: int,
        stop: int,
        entries: dict[str, Any],
        real_oneofs: set[int],
    ) -> int:
        index = start
        while index < stop:
            field = fields[index]
            if index in real_oneofs:
                oneof = field.oneof_index
                self.emit(depth, f"oneof {message.oneof_decl[oneof].name} {{")
                while index < len(fields) and index in real_oneofs and fields[index].oneof_index == oneof:
                    self.field(depth + 1, fields[index], message, entries)
                    index += 1
                self.emit(depth, "}")
                continue
            self.field(depth, field, message, entries)
            index += 1
        return max(index, start)

    def enum(self, depth: int, enum: Any) -> None:
        self.emit(depth, f"enum {enum.name} {{")
        for option in _options(_set_fields(enum.options)):
            self.emit(depth + 1, f"option {option};")
        for value in enum.value:
            opts = _options(_set_fields(value.options))
            suffix = f" [{', '.join(opts)}]" if opts else ""
            self.emit(depth + 1, f"{value.name} = {value.number}{suffix};")
        for r in enum.reserved_range:  # inclusive ends, unlike a message's
            self.emit(depth + 1, f"reserved {_range(r.start, r.end)};")
        if enum.reserved_name:
            self.emit(depth + 1, f"reserved {', '.join(_quote(n) for n in enum.reserved_name)};")
        self.emit(depth, "}")

    def service(self, service: Any) -> None:
        self.emit(0, f"service {service.name} {{")
        for method in service.method:
            if method.options.ListFields():
                raise ValueError(f"method options are not supported ({service.name}.{method.name})")
            arg = ("stream " if method.client_streaming else "") + method.input_type
            out = ("stream " if method.server_streaming else "") + method.output_type
            self.emit(1, f"rpc {method.name}({arg}) returns ({out});")
        self.emit(0, "}")


def _range(first: int, last: int) -> str:
    if first == last:
        return str(first)
    return f"{first} to {'max' if last >= _MAX_FIELD else last}"


def render_proto(file: Any) -> str:
    """The ``.proto`` source of one ``FileDescriptorProto``.

    Args:
        file: A ``google.protobuf.descriptor_pb2.FileDescriptorProto``.

    Returns:
        Source text that protoc compiles back into the same descriptor.

    Raises:
        ValueError: The file uses a feature this printer does not write (groups,
            extensions, proto2 defaults, method options): none of the TF Serving files do.
    """
    return _Printer(file).render()


def installed_files() -> Iterator[Any]:
    """The ``FileDescriptorProto`` of every file :data:`ROOTS` need, from the installed packages.

    ``google/protobuf`` files are left out: protobuf itself provides them.
    """
    from google.protobuf import descriptor_pb2

    seen: dict[str, Any] = {}

    def walk(descriptor: Any) -> None:
        if descriptor.name in seen:
            return
        seen[descriptor.name] = descriptor
        for dep in descriptor.dependencies:
            walk(dep)

    for name in ROOTS:
        walk(importlib.import_module(name).DESCRIPTOR)
    for name in sorted(seen):
        if name.startswith("google/protobuf/"):
            continue
        proto = descriptor_pb2.FileDescriptorProto()
        seen[name].CopyToProto(proto)
        yield proto


def write_protos(proto_root: Path) -> list[Path]:
    """Writes the ``.proto`` files of the installed packages under ``proto_root``.

    Returns:
        The files written, by their path under ``proto_root``.
    """
    written = []
    for file in installed_files():
        path = proto_root / file.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_proto(file))
        written.append(path)
    return written


def proto_files(proto_root: Path) -> list[str]:
    """The ``.proto`` paths under ``proto_root``, relative and sorted."""
    return sorted(p.relative_to(proto_root).as_posix() for p in proto_root.rglob("*.proto"))


_IMPORT = re.compile(r"^from ([\w.]+) import (\w+_pb2(?:_grpc)?) as (\w+)$", re.MULTILINE)
_STAR_IMPORT = re.compile(r"^from ([\w.]+)\.(\w+_pb2) import \*$", re.MULTILINE)  # import public
_PLAIN_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


def compile_protos(proto_root: Path, out_dir: Path) -> list[Path]:
    """Compiles every ``.proto`` under ``proto_root`` into flat modules in ``out_dir``.

    protoc names modules after their path (``tensorflow/core/framework/tensor_pb2.py``,
    imported as ``tensorflow.core.framework.tensor_pb2``), which would shadow the real
    TensorFlow package; the modules are moved to flat names (:func:`module_name`) and
    their imports of each other rewritten to this package.

    Args:
        proto_root: Where the ``.proto`` files are, by their import path.
        out_dir: The package folder that receives the modules.

    Returns:
        The modules written (``*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py``).

    Raises:
        RuntimeError: protoc failed, or an import could not be rewritten.
    """
    files = proto_files(proto_root)
    ours = {module_name(f).removesuffix("_pb2"): f for f in files}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp)
        # protoc runs in a child process: grpc_tools links its own copy of protobuf, which
        # crashes a process that has already loaded TensorFlow's (as the test suite has).
        args = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            *files,
        ]
        run = subprocess.run(args, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"protoc failed: {run.stderr.strip()}")
        grpc_args = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"--grpc_python_out={raw}",
            *GRPC_FILES,
        ]
        run = subprocess.run(grpc_args, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"protoc (grpc) failed: {run.stderr.strip()}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for source in sorted(raw.rglob("*.py*")):
            rel = source.relative_to(raw).as_posix()
            stem, _, ext = rel.rpartition(".")
            target = out_dir / (stem.replace("/", "_") + "." + ext)
            target.write_text(_rewrite_imports(source.read_text(), ours, rel))
            written.append(target)
        return written


def _rewrite_imports(text: str, ours: dict[str, str], where: str) -> str:
    def flat(match: re.Match[str]) -> str:
        package, module, alias = match.groups()
        dotted = f"{package}.{module}"
        suffix = "_pb2_grpc" if module.endswith("_pb2_grpc") else "_pb2"
        key = dotted.removesuffix(suffix).replace(".", "_")
        if key not in ours:
            if package.startswith("google.protobuf"):
                return match.group(0)
            raise RuntimeError(f"{where}: import of {dotted} is not one of the generated modules")
        return f"from {PACKAGE} import {key}{suffix} as {alias}"

    def star(match: re.Match[str]) -> str:
        key = f"{match.group(1)}.{match.group(2)}".removesuffix("_pb2").replace(".", "_")
        if key not in ours:
            raise RuntimeError(f"{where}: public import of {match.group(0)} is not a generated module")
        return f"from {PACKAGE}.{key}_pb2 import *"

    text = _IMPORT.sub(flat, text)
    text = _STAR_IMPORT.sub(star, text)
    if _PLAIN_IMPORT.search(text):
        raise RuntimeError(f"{where}: unexpected top-level import {_PLAIN_IMPORT.search(text)}")
    return text


def main(argv: list[str] | None = None) -> int:
    """Command line entry: writes the ``.proto`` files, then compiles them in place."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR, help="package folder (default: in place)")
    parser.add_argument(
        "--compile-only", action="store_true", help="compile the committed .proto files; import nothing"
    )
    args = parser.parse_args(argv)
    proto_root = args.out / "proto"
    if not args.compile_only:
        if proto_root.exists():
            for old in proto_root.rglob("*.proto"):
                old.unlink()
        write_protos(proto_root)
    for old in args.out.glob("*_pb2*.py*"):
        old.unlink()
    for path in compile_protos(proto_root, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
