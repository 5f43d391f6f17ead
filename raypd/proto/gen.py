"""Regenerate the gRPC stubs from raypd.proto: `python -m raypd.proto.gen`.

`generate(out_dir)` writes raypd_pb2.py and raypd_pb2_grpc.py; tests compare a fresh
generation with the committed files, so stale stubs fail CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).parent
STUBS = ("raypd_pb2.py", "raypd_pb2_grpc.py")


def generate(out_dir: Path = PROTO_DIR) -> None:
    from grpc_tools import protoc

    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}",
                        f"--grpc_python_out={out_dir}", str(PROTO_DIR / "raypd.proto")])
    if code:
        raise RuntimeError(f"protoc failed with exit code {code}")
    grpc_file = Path(out_dir) / "raypd_pb2_grpc.py"  # make the generated import package-relative
    grpc_file.write_text(grpc_file.read_text().replace("import raypd_pb2 as", "from raypd.proto import raypd_pb2 as"))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR)
