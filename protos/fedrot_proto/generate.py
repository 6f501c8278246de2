"""Regenerate the Python modules of the protocol: ``python -m fedrot_proto.generate``.

Runs ``grpc_tools.protoc`` with ``-I protos`` over every ``.proto`` under
``protos/fedrot_proto/`` and writes ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` next to
them, so ``from fedrot_proto.v1 import federation_pb2`` resolves without path patching.
``--out DIR`` writes into another root instead (the freshness test compares the two).
"""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parent


class ProtocError(RuntimeError):
    """protoc failed; its own message went to stderr."""


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """Every ``.proto`` of the package, relative to ``root``, sorted."""
    return sorted(p.relative_to(root) for p in (root / PACKAGE_DIR.name).rglob("*.proto"))


def generate(out: Path = PROTO_ROOT) -> list[Path]:
    """Compile every proto into ``out`` (same relative layout); returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    well_known = files("grpc_tools") / "_proto"
    written: list[Path] = []
    for proto in proto_files():
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(proto),
        ]
        if protoc.main(args) != 0:
            raise ProtocError(f"protoc failed on {proto}")
        stem = out / proto.with_suffix("")
        written += [Path(f"{stem}_pb2.py"), Path(f"{stem}_pb2.pyi"), Path(f"{stem}_pb2_grpc.py")]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedrot_proto.generate", description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: protos/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
