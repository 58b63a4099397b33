"""``unix:`` addresses (capbus/serving.py): a service and its clients started as separate
programs meet through a socket path, on the service's own kernel and on a kernel daemon;
the socket's file mode decides who may connect; a socket left by a killed service or kernel
is replaced on restart, a path a live one serves is refused; every way of failing to
connect says what went wrong."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio

import capbus
from capbus.addresses import TcpAddress, UnixAddress, parse

from .echo_service import Echo, Ping, schema
from .processes import started

HERE = Path(__file__).parent
TIMEOUT = 30
SERVE = [sys.executable, "-m", "capbus", "serve"]


async def _calls_work(address: str) -> int:
    """Connects to ``address``, makes a call and a call back; the service's pid."""
    async with capbus.connect(address, schema.Echo) as echo:
        assert (await echo.echo(text="hello")).text == "hello"
        assert (await echo.call(ping=Ping(5))).n == 5  # (the service calls back into us)
        return int((await echo.pid()).pid)


async def test_a_service_and_a_client_meet_as_two_programs(tmp_path: Path) -> None:
    address = f"unix:{tmp_path}/echo"
    async with started([*SERVE, address, "echo_service:Echo"]) as (service, said):
        assert said == f"capbus serve: echo_service:Echo at {address}"
        with trio.fail_after(TIMEOUT):
            assert await _calls_work(address) == service.pid
            assert await _calls_work(address) == service.pid  # (again: a new peer each time)
        # The socket's file mode is the access control: 600 unless told otherwise.
        assert stat.S_IMODE(os.stat(tmp_path / "echo").st_mode) == 0o600
        service.send_signal(signal.SIGTERM)
        with trio.fail_after(TIMEOUT):
            assert await service.wait() == 0
    assert not (tmp_path / "echo").exists() and not (tmp_path / "echo.lock").exists()


async def test_a_service_on_a_kernel_daemon(tmp_path: Path) -> None:
    kernel_path, address = tmp_path / "kernel", f"unix:{tmp_path}/echo"
    async with started([sys.executable, "-m", "capbus", "kernel", "--listen", str(kernel_path)]):
        async with started([*SERVE, address, "echo_service:Echo", "--kernel", str(kernel_path)]) as (
            service,
            _,
        ):
            with trio.fail_after(TIMEOUT):
                assert await _calls_work(address) == service.pid


async def test_serving_in_this_process_hands_each_program_one_capability(tmp_path: Path) -> None:
    address = f"unix:{tmp_path}/echo"
    async with capbus.serve(Echo(), address, mode=0o640) as service:
        assert service.address == UnixAddress(f"{tmp_path}/echo")
        assert stat.S_IMODE(os.stat(tmp_path / "echo").st_mode) == 0o640
        assert service.kernel is not None
        with trio.fail_after(TIMEOUT):
            async with capbus.connect(address, schema.Echo) as first, capbus.connect(address) as second:
                assert (await first.echo(text="a")).text == "a"
                # (no interface named: the one the service says it serves, known here)
                assert (await second.echo(text="b")).text == "b"
            with pytest.raises(capbus.ServeError, match="serves a Echo, not a Ping"):
                async with capbus.connect(address, schema.Ping):
                    pass
            assert service.connections == 3
            # A program that connects and leaves at once costs the service nothing.
            before = service.kernel.statistics().peers
            for _ in range(20):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as quick:
                    quick.connect(f"{tmp_path}/echo")
            assert (await _calls_work(address)) == os.getpid()
            while service.kernel.statistics().peers > before:
                await trio.sleep(0.01)  # (bounded by fail_after: the peers made for them end)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to try connecting as another user")
async def test_the_socket_file_mode_decides_who_may_connect() -> None:
    # (a directory anyone may reach the socket through: its own mode decides)
    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o755)
        await _only_the_mode_decides(Path(directory))


async def _only_the_mode_decides(tmp_path: Path) -> None:
    address = f"unix:{tmp_path}/echo"

    def as_nobody() -> int:
        """Exit status of a child, as user nobody, connecting to the socket: 0 if let in."""
        child = os.fork()
        if child == 0:
            try:
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.connect(f"{tmp_path}/echo")
                os._exit(0)
            except PermissionError:
                os._exit(13)
            except BaseException:
                os._exit(1)
        return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])

    async with capbus.serve(Echo(), address):
        assert await trio.to_thread.run_sync(as_nobody) == 13
    async with capbus.serve(Echo(), address, mode=0o666):
        assert await trio.to_thread.run_sync(as_nobody) == 0


async def test_a_socket_left_by_a_killed_service_is_replaced(tmp_path: Path) -> None:
    address = f"unix:{tmp_path}/echo"
    async with started([*SERVE, address, "echo_service:Echo"]) as (service, _):
        service.kill()
        with trio.fail_after(TIMEOUT):
            await service.wait()
    assert stat.S_ISSOCK(os.stat(tmp_path / "echo").st_mode)  # left behind
    with pytest.raises(capbus.ServeError, match="nothing accepts there"):
        await _calls_work(address)
    async with started([*SERVE, address, "echo_service:Echo"]) as (again, _):
        with trio.fail_after(TIMEOUT):
            assert await _calls_work(address) == again.pid


async def test_a_path_a_live_service_serves_is_refused(tmp_path: Path) -> None:
    address = f"unix:{tmp_path}/echo"
    async with capbus.serve(Echo(), address):
        refused = await trio.run_process(
            [*SERVE, address, "echo_service:Echo"], cwd=HERE, capture_stderr=True, check=False
        )
        assert refused.returncode == 1
        assert b"is in use: another service serves there" in refused.stderr
        with pytest.raises(capbus.ServeError, match="in use"):
            async with capbus.serve(Echo(), address):
                pass
        with trio.fail_after(TIMEOUT):
            assert await _calls_work(address) == os.getpid()  # (the first one still serves)
    # Something other than a socket at the path is never replaced.
    (tmp_path / "file").write_text("mine")
    with pytest.raises(capbus.ServeError, match="exists and is not a socket"):
        async with capbus.serve(Echo(), f"unix:{tmp_path}/file"):
            pass
    assert (tmp_path / "file").read_text() == "mine"


async def test_a_kernel_daemon_killed_is_replaced_and_a_second_refused(tmp_path: Path) -> None:
    path = tmp_path / "kernel"
    daemon = [sys.executable, "-m", "capbus", "kernel", "--listen", str(path)]
    async with started(daemon) as (first, _):
        second = await trio.run_process(daemon, capture_stderr=True, check=False)
        assert second.returncode == 1 and b"is in use" in second.stderr
        first.kill()
        with trio.fail_after(TIMEOUT):
            await first.wait()
    async with started(daemon) as (_, said):
        assert said == f"capbus kernel listening on {path}"
        async with await capbus.connect_peer(path) as peer:
            assert (await peer.info()).uid == os.getuid()  # (a peer of the new daemon)


async def test_connecting_where_no_service_is_says_so(tmp_path: Path) -> None:
    with pytest.raises(
        capbus.ServeError, match=rf"cannot connect to unix:{tmp_path}/none: nothing is served there"
    ):
        async with capbus.connect(f"unix:{tmp_path}/none"):
            pass
    # Something that is not a capbus service: it says something else, or nothing.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(f"{tmp_path}/other")
        other.listen()
        talker = trio.socket.from_stdlib_socket(other)

        async def answer(data: bytes | None) -> None:
            connection, _ = await talker.accept()
            with connection:
                if data is not None:
                    await connection.send(data)
                await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, b"HTTP/1.1 400 Bad Request\r\n")
            with pytest.raises(capbus.ServeError, match="not a capbus service"):
                async with capbus.connect(f"unix:{tmp_path}/other"):
                    pass
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, None)
            with pytest.raises(capbus.ServeError, match="did not answer in 0.2 s"):
                async with capbus.connect(f"unix:{tmp_path}/other", timeout=0.2):
                    pass
            nursery.cancel_scope.cancel()
    with pytest.raises(TypeError, match="connect_peer"):
        await capbus.connect(f"unix:{tmp_path}/none")  # type: ignore[misc]


def test_addresses_are_parsed_and_bad_ones_explained() -> None:
    assert parse("unix:/run/x") == UnixAddress("/run/x")
    assert parse("tcp:localhost:8000") == TcpAddress("localhost", 8000)
    assert parse("tls:[::1]:443") == TcpAddress("::1", 443, tls=True)
    assert str(parse("tls:[::1]:443")) == "tls:[::1]:443"
    for bad, why in [
        ("/run/x", "write unix:PATH, tcp:HOST:PORT or tls:HOST:PORT"),
        ("unix:", "takes a socket path"),
        ("tcp:localhost", "takes HOST:PORT"),
        ("tcp::80", "no host"),
        ("tcp:host:http", "the port must be a number"),
        ("tcp:host:70000", "the port must be a number"),
        ("tcp:[::1:80", "an IPv6 host goes in brackets"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse(bad)


def test_capbus_serve_says_what_is_wrong(tmp_path: Path) -> None:
    for argv, said in [
        ([f"unix:{tmp_path}/x", "echo_service"], "name it as module:factory"),
        ([f"unix:{tmp_path}/x", "no_such_module:Echo"], "ModuleNotFoundError"),
        ([f"unix:{tmp_path}/x", "echo_service:schema"], "not a server object"),
        (["/x", "echo_service:Echo"], "is not an address"),
    ]:
        result = subprocess.run([*SERVE, *argv], cwd=HERE, capture_output=True, text=True, timeout=TIMEOUT)
        assert result.returncode == 1, result
        assert said in result.stderr, result.stderr


class GatedPing(Ping):
    """Our object the service calls back: its answer waits for the test."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.called = trio.Event()
        self.gate = trio.Event()

    async def ping(self) -> int:  # type: ignore[override]
        self.called.set()
        await self.gate.wait()
        return self.n


async def test_a_stopped_service_answers_the_calls_it_was_asked_first(tmp_path: Path) -> None:
    """SIGTERM stops a ``unix:`` service gracefully: its object goes (no new calls), a call
    in flight (here waiting on a call back into the client) is still answered, then it exits."""
    kernel_path, address = tmp_path / "kernel", f"unix:{tmp_path}/echo"
    # (on a kernel daemon: the client's connection outlives the service; a service's own
    # kernel would take it along when the service exits)
    kernel = started([sys.executable, "-m", "capbus", "kernel", "--listen", str(kernel_path)])
    async with (
        kernel,
        started([*SERVE, address, "echo_service:Echo", "--kernel", str(kernel_path)]) as (
            service,
            _,
        ),
    ):
        async with capbus.connect(address, schema.Echo) as echo:
            ping = GatedPing(7)
            answered: list[int] = []
            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as nursery:

                    async def asking() -> None:
                        answered.append((await echo.call(ping=ping)).n)

                    nursery.start_soon(asking)
                    await ping.called.wait()  # (the service's handler waits on us)
                    service.send_signal(signal.SIGTERM)
                    assert service.stdout is not None
                    said = await service.stdout.receive_some()
                    assert b"stopping: answering the calls already made" in said
                    ping.gate.set()
                assert answered == [7]
                assert await service.wait() == 0
