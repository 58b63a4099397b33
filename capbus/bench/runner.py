"""Runs every contender through the workloads, interleaved round by round, and prints one
table: medians, p99s, and each contender's ratio to capbus. A contender whose packages or
programs cannot be installed is reported as missing, never left out silently."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import trio

from .workloads import GOALS, WORKLOADS, Workload

CONTENDERS = ("raw", "capbus_rpc", "pycapnp_rpc", "dbus", "grpc_unix", "zeromq")
REFERENCE = "capbus_rpc"
TIMEOUT = 300


@dataclass
class Contender:
    name: str
    module: ModuleType
    missing: str | None = None
    results: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return str(self.module.LABEL)

    def supports(self, workload: str) -> bool:
        return workload not in self.module.UNSUPPORTED


def progress(text: str) -> None:
    print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)


def _install(contender: Contender, allowed: bool) -> None:
    """Installs what the contender needs (pip for packages, apt for programs, as root) or
    records why it is missing."""
    packages: dict[str, str] = contender.module.PACKAGES
    programs: dict[str, str] = contender.module.PROGRAMS
    lacking = [pip for module, pip in packages.items() if importlib.util.find_spec(module) is None]
    if lacking and allowed:
        progress(f"installing {' '.join(lacking)} for {contender.label}")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", *lacking], capture_output=True, check=False
        )
        importlib.invalidate_caches()
        lacking = [pip for module, pip in packages.items() if importlib.util.find_spec(module) is None]
    absent = [package for program, package in programs.items() if shutil.which(program) is None]
    if absent and allowed and os.geteuid() == 0 and shutil.which("apt-get"):
        progress(f"installing {' '.join(absent)} (Debian) for {contender.label}")
        subprocess.run(["apt-get", "install", "-y", "-qq", *absent], capture_output=True, check=False)
        absent = [package for program, package in programs.items() if shutil.which(program) is None]
    reasons = [f"pip package {p} not installed" for p in lacking] + [
        f"program from {p} not found" for p in absent
    ]
    if reasons:
        contender.missing = "; ".join(reasons) + ("" if allowed else " (--no-install)")


def _command(name: str, role: str, config: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "capbus.bench.child", name, role, json.dumps(config)]


async def _sitting(contender: Contender, plan: dict[str, int]) -> dict[str, Any]:
    """One server and one client process of ``contender``; the client's results."""
    servers: list[trio.Process] = []

    errors = tempfile.TemporaryFile()

    async def spawn_server(config: dict[str, Any], fds: list[int], role: str = "serve") -> trio.Process:
        """Starts ``role`` ("serve", or "subscribe": the subscribers process of the
        multicast workloads) with ``config`` and the plan, and waits for its "ready"."""
        # What a server says on stderr is shown only if it fails to start (a server
        # terminated at the end of its sitting may well complain).
        process = await trio.lowlevel.open_process(
            _command(contender.name, role, {**config, "plan": plan}),
            pass_fds=fds,
            stdout=subprocess.PIPE,
            stderr=errors,
        )
        servers.append(process)
        assert process.stdout is not None
        with trio.fail_after(60):
            line = b""
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(64)
                if not chunk:
                    await process.wait()
                    errors.seek(0)
                    said = errors.read()[-2000:].decode(errors="replace")
                    raise RuntimeError(f"the server exited before it was ready: {said}")
                line += chunk
        return process

    try:
        async with contender.module.sitting(spawn_server, plan) as (config, fds):
            with trio.fail_after(TIMEOUT):
                done = await trio.run_process(
                    _command(contender.name, "measure", {**config, "plan": plan}),
                    pass_fds=fds,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
            if done.returncode != 0:
                raise RuntimeError(f"{contender.label} client failed: {done.stderr.decode()[-2000:]}")
            result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
            return result
    finally:
        errors.close()
        for server in servers:
            if server.returncode is None:
                server.terminate()
            with trio.move_on_after(10):
                await server.wait()
            if server.returncode is None:
                server.kill()
                await server.wait()


def figure(workload: Workload, runs: list[dict[str, float]]) -> float:
    """The median over runs of the contender's figure for ``workload``."""
    return _value(workload, runs)[0]


def _value(workload: Workload, runs: list[dict[str, float]]) -> tuple[float, float | None]:
    """The median over runs of the contender's figure for ``workload``, and its p99 (for
    latencies) or None."""
    if workload.unit == "us":
        return (
            statistics.median(r["median_us"] for r in runs),
            statistics.median(r["p99_us"] for r in runs),
        )
    return statistics.median(r["rate"] for r in runs), None


def _format(value: float, unit: str) -> str:
    if unit == "us":
        return f"{value:,.1f} us"
    if unit == "MB/s":
        return f"{value:,.0f} MB/s"
    return f"{value:,.0f}/s"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _versions() -> list[tuple[str, str]]:
    """What was measured, as installed: the Python packages, and dbus-broker."""
    found = []
    for package in ("capbus", "trio", "pycapnp", "dbus-fast", "grpcio", "pyzmq"):
        try:
            found.append((package, importlib.metadata.version(package)))
        except importlib.metadata.PackageNotFoundError:
            found.append((package, "not installed"))
    broker = shutil.which("dbus-broker")
    if broker:
        said = subprocess.run([broker, "--version"], capture_output=True, text=True, check=False).stdout
        found.append(("dbus-broker", said.split()[1] if len(said.split()) > 1 else "unknown"))
    return found


def report(contenders: list[Contender], workloads: list[str], rounds: int, elapsed: float) -> str:
    reference = next(c for c in contenders if c.name == REFERENCE)
    present = [c for c in contenders if c.missing is None]
    lines = [
        f"# capbus bench: {rounds} interleaved rounds, {elapsed:.0f} s",
        "",
        f"{platform.node()}: {os.cpu_count()} CPUs ({_cpu_model()}), {platform.platform()}, "
        f"Python {platform.python_version()}",
        "",
        "Versions: " + ", ".join(f"{name} {version}" for name, version in _versions()),
        "",
        "Each cell: the median over rounds (p99 in brackets for latencies); then capbus's figure "
        "over this one (below 1.0x: capbus is faster for latencies; above 1.0x: capbus moves more).",
        "",
        "| workload | " + " | ".join(c.label for c in present) + " |",
        "|---|" + "---:|" * len(present),
    ]
    for name in workloads:
        workload = WORKLOADS[name]
        row = [f"{workload.label} ({workload.unit})"]
        ours = reference.results.get(name)
        for contender in present:
            runs = contender.results.get(name)
            if not contender.supports(name):
                row.append("n/a")
                continue
            if not runs:
                row.append("failed")
                continue
            value, p99 = _value(workload, runs)
            cell = _format(value, workload.unit) + (
                f" [{p99:,.{1 if p99 < 10 else 0}f}]" if p99 is not None else ""
            )
            if ours and contender is not reference:
                cell += f" · {_value(workload, ours)[0] / value:.2f}x"
            row.append(cell)
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for contender in contenders:
        if contender.missing:
            lines.append(f"- missing: {contender.label}: {contender.missing}")
        for name, error in contender.errors.items():
            lines.append(f"- failed: {contender.label}, {WORKLOADS[name].label}: {error}")
        for name, reason in contender.module.UNSUPPORTED.items():
            if name in workloads:
                lines.append(f"- n/a: {contender.label}, {WORKLOADS[name].label}: {reason}")
    goals = _goals(contenders)
    if goals:
        lines += ["", "Goals:", "", *goals]
    return "\n".join(lines)


def _goals(contenders: list[Contender]) -> list[str]:
    """The issue's goals whose workloads ran: met or not, with the figures that decide."""
    by_name = {c.name: c for c in contenders}
    reference = by_name[REFERENCE]
    lines = []
    for goal in GOALS:
        workload = WORKLOADS[goal.workload]
        runs = reference.results.get(goal.workload)
        if goal.bound is not None:
            if not runs:
                continue
            value = figure(workload, runs)
            met = value >= goal.bound if workload.higher_is_better else value <= goal.bound
            lines.append(
                f"- goal {'met' if met else 'NOT met'}: {goal.text}: {_format(value, workload.unit)}"
            )
            continue
        assert goal.baseline is not None
        against = by_name.get(goal.against)
        baseline_runs = against.results.get(goal.baseline) if against else None
        if not runs and not baseline_runs:
            continue
        if not runs or not baseline_runs or against is None:
            lines.append(f"- goal not measured: {goal.text}")
            continue
        baseline = WORKLOADS[goal.baseline]
        cost, base = _cost(workload, runs), _cost(baseline, baseline_runs)
        ours = _format(figure(workload, runs), workload.unit)
        theirs = _format(figure(baseline, baseline_runs), baseline.unit)
        verdict = "met" if cost <= goal.factor * base + goal.offset else "NOT met"
        lines.append(
            f"- goal {verdict}: {goal.text}: capbus costs {cost / base:.2f}x {against.label}'s "
            f"{baseline.label} ({ours} against {theirs})"
        )
    return lines


def _cost(workload: Workload, runs: list[dict[str, float]]) -> float:
    """One operation's cost, lower is better: the figure for a latency, and for a rate the
    microseconds one operation takes (so that the two compare)."""
    value = figure(workload, runs)
    return value if workload.unit == "us" else 1e6 / value


async def run(args: argparse.Namespace) -> list[Contender]:
    names = args.only or list(CONTENDERS)
    if REFERENCE not in names:
        names = [REFERENCE, *names]
    contenders = [Contender(name, importlib.import_module(f"capbus.bench.{name}")) for name in names]
    for contender in contenders:
        _install(contender, not args.no_install)
    workloads = args.workloads or list(WORKLOADS)
    rounds = args.rounds or (2 if args.quick else 3)
    present = [c for c in contenders if c.missing is None]
    for round_ in range(rounds):
        # Interleaved: each round every contender once, in an order that rotates.
        order = present[round_ % len(present) :] + present[: round_ % len(present)]
        for i, contender in enumerate(order):
            progress(f"round {round_ + 1}/{rounds}: {contender.label} ({i + 1}/{len(order)})")
            plan = {
                name: WORKLOADS[name].quick if args.quick else WORKLOADS[name].full
                for name in workloads
                if contender.supports(name)
            }
            try:
                result = await _sitting(contender, plan)
            except Exception as error:  # a contender that breaks is reported, not fatal
                print(f"\n{contender.label}: {error}", file=sys.stderr)
                continue
            for name, figures in result.items():
                if "error" in figures:
                    contender.errors[name] = figures["error"]
                else:
                    contender.results.setdefault(name, []).append(figures)
    progress("")
    return contenders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="capbus bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations and rounds (under a minute)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, --quick 2)")
    parser.add_argument("--only", action="append", choices=CONTENDERS, help="run only these contenders")
    parser.add_argument("--workload", dest="workloads", action="append", choices=list(WORKLOADS))
    parser.add_argument("--no-install", action="store_true", help="never install a missing contender")
    parser.add_argument("--json", metavar="PATH", help="also write every run's figures here")
    parser.add_argument("--chart", metavar="PATH", help="also draw a PNG chart here (matplotlib)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    contenders = trio.run(run, args)
    workloads = args.workloads or list(WORKLOADS)
    rounds = args.rounds or (2 if args.quick else 3)
    print(report(contenders, workloads, rounds, time.perf_counter() - start))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {c.name: {"missing": c.missing, "results": c.results} for c in contenders}, out, indent=1
            )
    if args.chart:
        from .chart import draw

        draw(contenders, workloads, args.chart)
    return 0
