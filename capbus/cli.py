"""The ``capbus`` command: ``capbus kernel --listen PATH`` runs a kernel daemon, ``capbus
serve ADDRESS module:factory`` serves an object at an address, ``capbus compile`` generates
typed modules, ``capbus monitor``, ``status`` and ``graph`` watch a kernel, ``capbus bench``
measures."""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import threading
from typing import TYPE_CHECKING

from .kernel import Kernel, Limits

if TYPE_CHECKING:
    from .rpc.server import Server


def _raise_fd_limit() -> None:
    """A daemon's peers, and the fds they queue, are file descriptors of this process: take
    all the hard limit allows (the kernel splits it between uids, docs/wire-format.md)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _run_kernel(args: argparse.Namespace) -> int:
    limits = Limits()
    _raise_fd_limit()
    try:
        kernel = Kernel(limits)
        kernel.log_to(sys.stderr.fileno())
        kernel.listen(args.listen, args.mode)
    except OSError as error:  # (a CapbusError, or the path in use: socketfile.PathInUse)
        print(f"capbus kernel: {error.strerror}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    kernel.start()
    print(f"capbus kernel listening on {args.listen}", flush=True)
    # The loop runs on its own thread so this one can take signals.
    while not stop.wait(0.5):
        pass
    import trio

    trio.run(kernel.aclose)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="capbus", description="capability IPC for Python")
    commands = parser.add_subparsers(dest="command", required=True)
    kernel = commands.add_parser("kernel", help="run a kernel daemon")
    kernel.add_argument("--listen", required=True, metavar="PATH", help="unix socket path to accept peers on")
    kernel.add_argument(
        "--mode", default="600", help="file mode of the socket, in octal: who may connect (default 600)"
    )
    serve = commands.add_parser(
        "serve", help="serve an object at an address (unix:PATH, tcp:HOST:PORT, tls:HOST:PORT)"
    )
    serve.add_argument("address", help="where: unix:PATH, tcp:HOST:PORT or tls:HOST:PORT")
    serve.add_argument(
        "factory", metavar="module:factory", help="what: a server object, or a callable that makes one"
    )
    serve.add_argument(
        "--kernel", metavar="PATH", help="a kernel daemon's socket (default: a kernel of its own)"
    )
    serve.add_argument(
        "--mode", default="600", help="file mode of a unix: socket, in octal: who may connect (default 600)"
    )
    serve.add_argument("--cert", metavar="FILE", help="tls: the service's certificate chain (PEM)")
    serve.add_argument("--key", metavar="FILE", help="tls: its private key (PEM; default: in --cert)")
    compile_ = commands.add_parser("compile", help="generate typed Python modules from .capnp schemas")
    compile_.add_argument("schemas", nargs="+", metavar="schema", help="a .capnp file")
    compile_.add_argument(
        "-o",
        "--output",
        help="the module to write, or a directory to write each into (default: <schema>_capnp.py beside it)",
    )
    compile_.add_argument(
        "-I", "--import-path", action="append", default=[], help="a directory to import from"
    )
    monitor = commands.add_parser("monitor", help="watch a kernel daemon's traffic, one line per event")
    monitor.add_argument("--kernel", required=True, metavar="PATH", help="the daemon's socket")
    monitor.add_argument("--json", action="store_true", help="one JSON object per line, for scripts")
    status_command = commands.add_parser(
        "status", help="a kernel's peers, nodes, handles, queues and quotas, now"
    )
    status_command.add_argument("--kernel", required=True, metavar="PATH", help="the kernel's socket")
    status_command.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    status_command.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up on a kernel that does not answer",
    )
    graph_command = commands.add_parser(
        "graph", help="draw a kernel's capability graph: who holds handles to whose nodes"
    )
    graph_command.add_argument("--kernel", required=True, metavar="PATH", help="the kernel's socket")
    graph_command.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="where: a .svg, .png or .dot file"
    )
    graph_command.add_argument(
        "--format", choices=("svg", "png", "dot"), help="the format (default: by the extension)"
    )
    graph_command.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up on a kernel that does not answer",
    )
    graph_command.add_argument(
        "--max-nodes",
        type=int,
        default=400,
        metavar="N",
        help="past N nodes, draw each peer's nodes as one box (default 400)",
    )
    commands.add_parser(
        "bench", help="capbus against a raw socketpair, pycapnp, D-Bus, gRPC and ZeroMQ", add_help=False
    )
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["bench"]:
        from .bench.runner import main as bench

        return bench(argv[1:])
    args = parser.parse_args(argv)
    if args.command in ("kernel", "serve"):
        try:
            args.mode = _file_mode(args.mode)
        except ValueError as error:
            print(f"capbus {args.command}: {error}", file=sys.stderr)
            return 1
    if args.command == "kernel":
        return _run_kernel(args)
    if args.command == "compile":
        return _compile(args.schemas, args.output, args.import_path)
    if args.command == "monitor":
        from .monitoring import run

        return run(args.kernel, args.json)
    if args.command == "status":
        from .introspection import run as status

        return status(args.kernel, args.json, timeout=args.timeout)
    if args.command == "graph":
        from .graph import run as draw

        return draw(args.kernel, args.output, args.format, timeout=args.timeout, max_nodes=args.max_nodes)
    if args.command == "serve":
        return _serve(args.address, args.factory, args.kernel, args.mode, args.cert, args.key)
    return 2


def _file_mode(text: str) -> int:
    """``--mode``: a socket file's permission bits, in octal (600, 0660)."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"--mode {text}: not an octal file mode (such as 600 or 660)") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"--mode {text}: a socket's file mode is at most 777 (read and write bits)")
    return mode


SHUTDOWN_GRACE = 10.0
"""Seconds a stopping ``capbus serve`` gives the calls it was asked before it exits."""


def _serve(
    address: str, factory: str, kernel: str | None, mode: int, cert: str | None, key: str | None
) -> int:
    """``capbus serve``: one line on stdout once serving (what, where), until SIGINT or
    SIGTERM; what is wrong on stderr, and exit status 1."""
    import trio

    from .serving import ServeError, serve

    try:
        made = _made(factory)
    except Exception as error:  # noqa: BLE001 - the user's module: whatever it raises, said
        print(f"capbus serve: {factory}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1

    tls = None
    if cert is not None:
        import ssl

        try:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as error:
            print(
                f"capbus serve: --cert {cert}: {getattr(error, 'strerror', None) or error}", file=sys.stderr
            )
            return 1

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with serve(made, address, kernel=kernel, mode=mode, tls=tls) as service:
                print(f"capbus serve: {factory} at {service.address}", flush=True)
                async for _ in signals:
                    if service.vat is not None:  # (unix:) graceful: what was asked is answered
                        print("capbus serve: stopping: answering the calls already made", flush=True)
                        await service.vat.shutdown(grace=SHUTDOWN_GRACE)
                    return

    try:
        trio.run(run)
    except (ServeError, ValueError, OSError) as error:
        print(f"capbus serve: {error}", file=sys.stderr)
        return 1
    return 0


def _made(factory: str) -> Server:
    """The server object ``module:factory`` names: the attribute itself if it is a server,
    else what calling it returns (the current directory importable, as ``python -m`` has it)."""
    import importlib

    module_name, colon, attribute = factory.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError("name it as module:factory (e.g. calculator_server:CalculatorServer)")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    found: object = importlib.import_module(module_name)
    for part in attribute.split("."):
        found = getattr(found, part)
    from .rpc.server import Server

    made = found if isinstance(found, Server) else found() if callable(found) else found
    if not isinstance(made, Server):
        raise TypeError(f"{factory} made {type(made).__name__}, not a server object (a Foo.Server subclass)")
    return made


def _compile(schemas: list[str], output: str | None, imports: list[str]) -> int:
    """``capbus compile``: each module's path on stdout; a schema error (the compiler's
    message: path, line, column) or a missing file on stderr, and exit status 1."""
    from .compiler import generate_file
    from .rpc.schemacheck import SchemaError

    if len(schemas) > 1 and output is not None and not os.path.isdir(output):
        print(f"capbus compile: -o {output}: with several schemas, -o must be a directory", file=sys.stderr)
        return 1
    for schema in schemas:
        try:
            print(generate_file(schema, output, imports))
        except SchemaError as error:
            print(error, file=sys.stderr)
            return 1
        except OSError as error:
            print(f"capbus compile: {error.filename or schema}: {error.strerror}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
