"""`python -m bench SCENARIO ...`: the benchmark harness (see docs/performance.md)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    scenarios = {"codec": "bench.codec", "hsm": "bench.hsm"}
    if not argv or argv[0] not in scenarios:
        print(f"usage: python -m bench {{{','.join(scenarios)}}} [options]", file=sys.stderr)
        return 2
    module = __import__(scenarios[argv[0]], fromlist=["main"])
    return int(module.main(argv[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
