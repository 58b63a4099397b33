"""Coverage-guided fuzzing of the command dispatcher: dispatch_fuzzer.c built with clang,
libFuzzer, AddressSanitizer and UBSan, seeded with corpus.py's scenarios.

    python3 tests/fuzz/libfuzzer.py --seconds 60        # what .ci/run does
    python3 tests/fuzz/libfuzzer.py --seconds 3600      # a longer run (docs/development.md)

The corpus it grows lives in build/fuzz/corpus (kept between runs, never in git); a crashing
input is written to build/fuzz/crash-* and the run exits non-zero, printing how to replay it.
Needs clang (Debian: apt-get install clang).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType


def _sibling(name: str) -> ModuleType:
    """A module beside this script (run as a script, not as part of the tests package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _sibling("build")
corpus = _sibling("corpus")
WORK = build.ROOT / "build" / "fuzz"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=60, help="how long to fuzz (default 60)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel fuzzing processes")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    binary = build.build(WORK / "dispatch_libfuzzer", libfuzzer=True)
    grown = WORK / "corpus"
    seeds = WORK / "seeds"
    corpus.write(seeds)
    grown.mkdir(exist_ok=True)
    command = [
        str(binary),
        str(grown),
        str(seeds),
        f"-max_total_time={args.seconds}",
        f"-artifact_prefix={WORK}/",
        "-print_final_stats=1",
        "-max_len=65536",
        "-timeout=20",
        "-rss_limit_mb=4096",
    ]
    if args.jobs > 1:
        command += [f"-jobs={args.jobs}", f"-workers={args.jobs}"]
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, env=build.sanitizer_env(dict(os.environ)), cwd=WORK)
    if done.returncode != 0:
        crashes = sorted(WORK.glob("crash-*")) + sorted(WORK.glob("timeout-*")) + sorted(WORK.glob("leak-*"))
        print(
            f"libFuzzer found a problem; replay with: {binary} {' '.join(map(str, crashes))}", file=sys.stderr
        )
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
