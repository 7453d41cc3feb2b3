"""Regenerate the committed Python code for ``proto/veil/v1/*.proto``.

Run ``make proto``. protoc writes imports as ``from veil.v1 import x_pb2``
(the proto package path); the code is installed as ``veil.proto.v1``, so the
script rewrites those imports. The output is deterministic for a pinned
grpcio-tools, which ``tests/proto/test_generated.py`` relies on.
"""

from __future__ import annotations

import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "veil" / "v1"
DEFAULT_OUT = HERE / "v1"
_IMPORT = re.compile(r"^from veil\.v1 import ", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Compile every .proto under proto/veil/v1 into ``out_dir``; return the files written."""
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
        for src in sorted((Path(tmp) / "veil" / "v1").iterdir()):
            text = _IMPORT.sub("from veil.proto.v1 import ", src.read_text())
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
    init = out_dir / "__init__.py"
    init.write_text('"""Generated gRPC/protobuf code for veil.v1 (see proto/generate.py)."""\n')
    written.append(init)
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(out):
        print(path.relative_to(out.parent) if path.is_relative_to(out.parent) else path)
