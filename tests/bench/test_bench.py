"""``capbus bench`` runs its contenders in real processes and reports every one: measured,
not applicable, failed, or missing (never dropped)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from capbus.bench import runner


def test_a_quick_run_measures_capbus_against_the_raw_floor(tmp_path: Path) -> None:
    figures = tmp_path / "figures.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "capbus",
            "bench",
            "--quick",
            "--rounds",
            "1",
            "--only",
            "raw",
            "--workload",
            "echo32",
            "--workload",
            "cap",
            "--no-install",
            "--json",
            str(figures),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    table = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert "capbus" in table["workload"] and "raw trio socketpair" in table["workload"]
    echo = table["32 B call round trip (us)"]
    assert echo.count(" us [") == 2, echo  # both measured, with p99s
    assert "x |" in echo  # capbus over the floor
    assert table["a call passing a capability (us)"].rstrip(" |").endswith("n/a")
    assert "n/a: raw trio socketpair, a call passing a capability: no capabilities" in done.stdout
    results = json.loads(figures.read_text())
    assert results["capbus_rpc"]["missing"] is None
    (echo_run,) = results["capbus_rpc"]["results"]["echo32"]
    assert 0 < echo_run["median_us"] <= echo_run["p99_us"]
    (cap_run,) = results["capbus_rpc"]["results"]["cap"]
    assert cap_run["median_us"] > 0


def test_multicast_workloads_measure_capbus_and_the_raw_floor(tmp_path: Path) -> None:
    figures = tmp_path / "figures.json"
    workloads = ["oneway", "multicast1", "multicast16", "multicast256"]
    done = subprocess.run(
        [sys.executable, "-m", "capbus", "bench", "--quick", "--rounds", "1", "--only", "raw", "--no-install"]
        + [arg for name in workloads for arg in ("--workload", name)]
        + ["--json", str(figures)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    table = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    for n in (1, 16, 256):
        row = table[f"an event to {n} subscriber{'s' * (n > 1)}: time per delivery, lower is better (us)"]
        assert row.count(" us [") == 2, row  # both measured, with p99s
    results = json.loads(figures.read_text())
    for contender in ("capbus_rpc", "raw"):
        for name in workloads[1:]:
            (run,) = results[contender]["results"][name]
            assert 0 < run["median_us"] <= run["p99_us"], (contender, name, run)
    # The goal is judged from the figures: met exactly when they say so.
    (line,) = [line for line in done.stdout.splitlines() if "multicast delivery to each of 256" in line]
    (delivery,) = results["capbus_rpc"]["results"]["multicast256"]
    (oneway,) = results["capbus_rpc"]["results"]["oneway"]
    met = delivery["median_us"] <= 0.2 * 1e6 / oneway["rate"]
    assert line.startswith("- goal met: " if met else "- goal NOT met: "), line


def test_a_stream_of_1_mib_data_calls_is_measured_on_capbus(tmp_path: Path) -> None:
    """The streaming workload: 1 MiB Data chunks through a ``-> stream`` method (256 MiB
    in a quick run), the rate taken once a regular call after them has its answer."""
    figures = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "capbus", "bench", "--quick", "--rounds", "1", "--only", "raw"]
        + ["--workload", "stream1G", "--no-install", "--json", str(figures)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    results = json.loads(figures.read_text())
    (run,) = results["capbus_rpc"]["results"]["stream1G"]
    assert run["rate"] > 0, run
    assert "n/a: raw trio socketpair, a stream of 1 MiB Data calls" in done.stdout


def test_a_contender_that_cannot_be_installed_is_reported_missing() -> None:
    module = SimpleNamespace(
        LABEL="nothing",
        PACKAGES={"capbus_no_such_module": "capbus-no-such-package"},
        PROGRAMS={},
        UNSUPPORTED={},
    )
    contender = runner.Contender("nothing", module)  # type: ignore[arg-type]
    runner._install(contender, allowed=False)
    assert contender.missing == "pip package capbus-no-such-package not installed (--no-install)"
    reference = runner.Contender("capbus_rpc", __import__("capbus.bench.capbus_rpc").bench.capbus_rpc)
    report = runner.report([reference, contender], ["echo32"], 1, 1.0)
    assert "- missing: nothing: pip package capbus-no-such-package not installed" in report


def test_the_network_rows_measure_capbus_against_pycapnp(tmp_path: Path) -> None:
    """Cap'n Proto's RPC protocol over TCP loopback, capbus's against pycapnp's (the same
    protocol), and connecting to a unix: address: measured for both, n/a for the others."""
    figures = tmp_path / "figures.json"
    workloads = ("tcp_echo32", "tcp_inflight64", "connect")
    done = subprocess.run(
        [sys.executable, "-m", "capbus", "bench", "--quick", "--rounds", "1", "--only", "pycapnp_rpc"]
        + [arg for name in workloads for arg in ("--workload", name)]
        + ["--only", "raw", "--no-install", "--json", str(figures)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    results = json.loads(figures.read_text())
    for contender in ("capbus_rpc", "pycapnp_rpc"):
        runs = results[contender]["results"]
        assert set(runs) == set(workloads), (contender, done.stdout)
        assert 0 < runs["tcp_echo32"][0]["median_us"] <= runs["tcp_echo32"][0]["p99_us"]
        assert runs["tcp_inflight64"][0]["rate"] > 0 and runs["connect"][0]["median_us"] > 0
    assert "n/a: raw trio socketpair, 32 B call round trip over TCP loopback" in done.stdout
    assert "32 B echo over TCP <= 1.0x pycapnp's" in done.stdout  # (the goal, met or not)
