"""Regenerate the Python code and .pyi stubs of protos/pocketlora/v1 (or check they are fresh).

    python scripts/gen_protos.py          # rewrite the generated files
    python scripts/gen_protos.py --check  # exit 1 when the committed files are stale

protoc names generated modules after the proto import path (`pocketlora.v1`), but the code lives
in the `protos` package of this repository, so imports are rewritten to `protos.pocketlora.v1`.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PKG_DIR = PROTO_ROOT / "pocketlora" / "v1"
_GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
_IMPORT_RE = re.compile(r"^(from |import )pocketlora\.v1", re.MULTILINE)


def generate(out_root: Path) -> list[Path]:
    """Run protoc (with the mypy-protobuf plugins) into out_root; return the generated files."""
    from grpc_tools import protoc  # dev dependency; imported here so --help works without it

    bin_dir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PKG_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    files = sorted(p for p in (out_root / "pocketlora" / "v1").iterdir() if p.name.endswith(_GENERATED))
    for path in files:
        path.write_text(_IMPORT_RE.sub(r"\1protos.pocketlora.v1", path.read_text()))
    return files


def main() -> int:
    """Regenerate, or with --check compare against the committed files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the generated code is stale")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_text() for p in generate(Path(tmp))}
    current = {p.name: p.read_text() for p in PKG_DIR.iterdir() if p.name.endswith(_GENERATED)}
    if opts.check:
        stale = sorted(n for n in fresh.keys() | current.keys() if fresh.get(n) != current.get(n))
        for name in stale:
            diff = difflib.unified_diff(
                current.get(name, "").splitlines(), fresh.get(name, "").splitlines(), name, name, lineterm=""
            )
            print("\n".join(list(diff)[:20]))
        if stale:
            print(f"stale generated code: {', '.join(stale)}; run: python scripts/gen_protos.py")
            return 1
        print("generated code is fresh")
        return 0
    for name in current.keys() - fresh.keys():
        (PKG_DIR / name).unlink()
    for name, text in fresh.items():
        (PKG_DIR / name).write_text(text)
    print(f"wrote {len(fresh)} files to {PKG_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
