"""``python -m fastopt.codegen [--check] [--root DIR]``: regenerate (or check) csrc/'s rule code."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .c_library import generate
from .translate import TranslationError


def default_root() -> Path:
    # src/fastopt/codegen/__main__.py -> the checkout root
    return Path(__file__).resolve().parents[3]


def stale(root: Path, files: dict[str, str]) -> list[str]:
    out = []
    for rel, text in files.items():
        path = root / rel
        try:
            current = path.read_text(encoding="utf-8")
        except OSError:
            current = None
        if current != text:
            out.append(rel)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastopt.codegen", description=__doc__)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 listing the stale files")
    ap.add_argument("--root", type=Path, default=default_root(), help="the checkout root (holding csrc/)")
    args = ap.parse_args(argv)
    if not (args.root / "csrc").is_dir():
        print(f"fastopt.codegen: {args.root} has no csrc/ directory (use --root)", file=sys.stderr)
        return 2
    try:
        files = generate()
    except TranslationError as exc:
        print(f"fastopt.codegen: {exc}", file=sys.stderr)
        return 2
    old = stale(args.root, files)
    if args.check:
        if old:
            print("stale generated files (run `python -m fastopt.codegen`):\n  " + "\n  ".join(old))
            return 1
        return 0
    for rel in old:
        path = args.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[rel], encoding="utf-8", newline="\n")
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
