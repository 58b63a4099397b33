"""Runs every capbus benchmark in turn: rtt.py, throughput.py, scale.py.

    .venv/bin/python bench/run_all.py [--quick]

Each benchmark runs in its own process (they set process-wide things: CPU affinity, the
fd limit), with this interpreter. Results go to stdout, progress to stderr; the exit status
is the first failure's, if any. With --quick the whole set takes well under a minute.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BENCHMARKS = ("rtt.py", "throughput.py", "scale.py")
TIMEOUT = 1800.0  # seconds per benchmark, far above what each takes


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="pass --quick to each benchmark")
    parser.add_argument("only", nargs="*", metavar="NAME", help=f"run only these of {', '.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    if unknown := set(args.only) - set(BENCHMARKS):
        parser.error(f"no such benchmark: {', '.join(sorted(unknown))}")
    status = 0
    for name in args.only or BENCHMARKS:
        command = [sys.executable, str(BENCH_DIR / name), *(["--quick"] if args.quick else [])]
        print(f"== {name}{' --quick' if args.quick else ''}", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            result = subprocess.run(command, timeout=TIMEOUT, check=False)
            code = result.returncode
        except subprocess.TimeoutExpired:
            print(f"== {name} took longer than {TIMEOUT:.0f} s", file=sys.stderr)
            code = 124
        print(
            f"== {name}: exit {code} after {time.monotonic() - started:.1f} s\n", file=sys.stderr, flush=True
        )
        sys.stdout.flush()
        print(flush=True)
        status = status or code
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
