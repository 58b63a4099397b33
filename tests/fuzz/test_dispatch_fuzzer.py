"""The command dispatcher under the harness (dispatch_fuzzer.c), built with gcc, AddressSanitizer
and UBSan: the seed corpus (every command, valid and broken) and a bounded number of seeded
mutations of it, each on a fresh kernel whose counters and fds must all come back to zero.
The coverage-guided run (libFuzzer) is tests/fuzz/libfuzzer.py, run by .ci/run.

CAPBUS_FUZZ_SEED and CAPBUS_FUZZ_INPUTS pick another seed and another number of inputs."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from . import build, corpus

SEED = int(os.environ.get("CAPBUS_FUZZ_SEED", "20261205"))
INPUTS = int(os.environ.get("CAPBUS_FUZZ_INPUTS", "3000"))


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        choice = rng.random()
        if choice < 0.4 and out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        elif choice < 0.6 and out:
            out[rng.randrange(len(out))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif choice < 0.75 and len(out) > 8:
            start = rng.randrange(len(out))
            del out[start : start + rng.randint(1, 16)]
        elif choice < 0.9:
            other = rng.choice(pool)
            if other:
                start = rng.randrange(len(other))
                out[rng.randrange(len(out) + 1) :] = other[start : start + rng.randint(1, 64)]
        else:
            out += rng.randbytes(rng.randint(1, 32))
    return bytes(out)


def test_seeds_and_mutations_keep_the_dispatcher_sound(tmp_path: Path) -> None:
    binary = build.build(tmp_path / "dispatch", libfuzzer=False)
    seeds = corpus.write(tmp_path / "corpus")
    pool = [p.read_bytes() for p in seeds]
    rng = random.Random(SEED)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for index in range(INPUTS):
        (inputs / f"{index:05d}").write_bytes(mutate(rng, rng.choice(pool), pool))
    # Inputs that once crashed the kernel, kept as libFuzzer found them.
    regressions = sorted(str(p) for p in (Path(__file__).parent / "regressions").iterdir())
    assert regressions
    files = regressions + [str(p) for p in seeds] + sorted(str(p) for p in inputs.iterdir())
    print(f"dispatch fuzzer: seed {SEED}, {len(files)} inputs", file=sys.stderr)
    done = subprocess.run(
        [str(binary), "-v", *files],
        capture_output=True,
        text=True,
        env=build.sanitizer_env(dict(os.environ)),
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, f"seed {SEED}: {done.stderr[-4000:]}"
    # The corpus reaches every command's success path (the replayer prints each
    # (command, errno) reply it saw).
    reached = {
        tuple(map(int, line.split()[1:3])) for line in done.stdout.splitlines() if line.startswith("reply")
    }
    from capbus import _wire

    for command in (
        _wire.CMD_NODE_CREATE,
        _wire.CMD_HANDLE_RELEASE,
        _wire.CMD_NODES_DESTROY,
        _wire.CMD_HANDLE_TRANSFER,
        _wire.CMD_SEND,
        _wire.CMD_PEER_QUERY,
        _wire.CMD_PEER_CREATE,
        _wire.CMD_SEED_TAKE,
        _wire.CMD_SEED_SET,
        _wire.CMD_HANDLE_QUERY,
        _wire.CMD_PEER_SET_FLAGS,
        _wire.CMD_RECV,
        _wire.CMD_MONITOR_CREATE,
        _wire.CMD_MONITOR_ATTACH,
        _wire.CMD_SNAPSHOT,
        _wire.CMD_SHUTDOWN,
    ):
        assert (command, 0) in reached, f"no input reached a successful command {command}"
