"""Command line: ``python -m ipcv_kernels {demo,bench,fidelity} [options]`` (``demo`` when none is given)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "demo"
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(argv)
    if command == "bench":
        from .bench.vit import main as bench_main

        return bench_main(argv)
    if command == "fidelity":
        from .fidelity import main as fidelity_main

        return fidelity_main(argv)
    print(f"unknown command {command!r}; use 'demo', 'bench' or 'fidelity'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
