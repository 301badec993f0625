"""``python -m fastopt <command>``: ``bench`` (see ``python -m fastopt bench --help``) or ``backends``."""
from __future__ import annotations

import sys

USAGE = """usage: python -m fastopt <command> [options]

commands:
  bench      time every rule against a roofline kernel, the NumPy reference and torch.optim
  backends   list fastopt's backends and whether they load here (and why not)
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else ""
    if command == "bench":
        from .bench.cli import main as bench
        return bench(argv)
    if command == "backends":
        from .dispatch import backends
        for info in backends().values():
            print(info)
        return 0
    print(USAGE, file=sys.stderr if command not in ("-h", "--help") else sys.stdout, end="")
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
