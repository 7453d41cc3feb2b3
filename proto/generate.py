"""Regenerate the committed Python code for ``proto/veil/proto/v1/*.proto``, beside the sources.

Run ``make proto``. The sources sit at their import path (``veil/proto/v1/``) under this
folder, so protoc's own imports (``from veil.proto.v1 import x_pb2``) are already the
installed module names. The output is deterministic for a pinned grpcio-tools, which
``tests/proto/test_generated.py`` relies on. The protobuf package stays ``veil.v1``: that is
what names the gRPC services on the wire (``/veil.v1.InferenceService/Generate``).
"""

from __future__ import annotations

import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PACKAGE = Path("veil") / "proto" / "v1"
SOURCES = HERE / PACKAGE
DEFAULT_OUT = SOURCES
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile every .proto under ``proto/veil/proto/v1`` into ``out_dir``; return the files written."""
    protos = sorted(SOURCES.glob("*.proto"))
    include = str(resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{HERE}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p.relative_to(HERE)) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / PACKAGE).iterdir()):
            dst = out_dir / src.name
            dst.write_bytes(src.read_bytes())
            written.append(dst)
    init = out_dir / "__init__.py"
    init.write_text('"""Generated gRPC/protobuf code for veil.v1 (see proto/generate.py)."""\n')
    written.append(init)
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(out):
        print(path.relative_to(out.parent) if path.is_relative_to(out.parent) else path)
