"""Review 14: attacks on ``capbus.serve`` / ``capbus.connect`` at ``unix:PATH`` (capbus/serving.py),
the socket path claim (capbus/socketfile.py), ``capbus serve`` and ``Kernel.listen``, made from
outside with real processes and sockets. Each test here is an attack that works on the code as
reviewed: it fails now, and passes once the hole is closed (its docstring says what happens
and what should)."""

from __future__ import annotations

import array
import gc
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus import serving
from capbus.serving import GREETING

from .echo_service import Echo, schema
from .processes import started

HERE = Path(__file__).parent
TIMEOUT = 30
SERVE = [sys.executable, "-m", "capbus", "serve"]
WATCHDOG = 5.0
"""Seconds after which a test's fake service lets a stuck client go, so that a client that
cannot be cancelled still ends (the test then fails on how long it took)."""


@asynccontextmanager
async def fake_service(path: str, handover: Callable[[list[Any]], int]) -> AsyncIterator[None]:
    """A hostile 'service' at ``path``: to each connection it writes the real greeting with
    the fd ``handover`` gives attached (``handover`` keeps whatever must stay open in the
    list it is given), then keeps the connection open and says nothing more."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen()
    kept: list[Any] = [listener]

    async def run() -> None:
        while True:
            connection, _ = await listener.accept()
            kept.append(connection)
            fd = handover(kept)
            await connection.sendmsg(
                [GREETING], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            )

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            yield
            nursery.cancel_scope.cancel()
    finally:
        for thing in kept:
            thing.close()


def _pair(kind: int) -> Callable[[list[Any]], int]:
    def handover(kept: list[Any]) -> int:
        ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
        kept += [ours, theirs]
        return theirs.fileno()

    return handover


# -- the connecting side ---------------------------------------------------------------------------


async def test_connect_gives_up_within_its_timeout_when_the_backlog_is_full(tmp_path: Path) -> None:
    """Attack: the service at the address is stopped or wedged (SIGSTOP, a loop blocked by a
    synchronous call) so nothing accepts and its listen backlog is full; a program connects
    with ``capbus.connect(address, timeout=0.5)``.

    Now: the connect runs as a blocking ``connect()`` on a thread, outside the ``timeout``
    (which covers only the wait for the greeting), and the thread is not abandoned on
    cancellation: the program hangs until the service accepts, however long that is; not
    even an enclosing cancel scope gets it out. (Here the fake service accepts after 5 s,
    and the program then says "not a capbus service (it said b'')", which is wrong too.)

    Should: ``ServeError: ... did not answer in 0.5 s`` after about 0.5 s (e.g. SO_SNDTIMEO
    on the blocking connect, or the thread abandoned on cancel)."""
    path = str(tmp_path / "stuck")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck:
        stuck.bind(path)
        stuck.listen(0)
        waiting: list[socket.socket] = []
        try:
            for _ in range(64):  # (a backlog of 0 is full after one or two)
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                try:
                    probe.connect(path)
                except BlockingIOError:
                    probe.close()
                    break
                waiting.append(probe)
            else:
                pytest.fail("the backlog never filled")

            async def let_go_after_the_watchdog() -> None:
                await trio.sleep(WATCHDOG)
                stuck.setblocking(False)
                while True:
                    try:
                        connection, _ = stuck.accept()
                        connection.close()
                    except BlockingIOError:
                        await trio.sleep(0.05)

            started_at = time.monotonic()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(let_go_after_the_watchdog)
                with pytest.raises(capbus.ServeError) as caught:
                    async with capbus.connect(f"unix:{path}", timeout=0.5):
                        pass
                took = time.monotonic() - started_at
                nursery.cancel_scope.cancel()
        finally:
            for probe in waiting:
                probe.close()
    assert took < 3, f"connect(timeout=0.5) took {took:.1f} s ({caught.value})"
    assert "not a capbus service" not in str(caught.value), caught.value


async def test_a_handed_over_connection_that_never_answers_times_out(tmp_path: Path) -> None:
    """Attack: a fake service writes the real greeting with a SOCK_SEQPACKET socket attached
    (one end of a socketpair whose other end it keeps and never writes to: a 'kernel' that
    never answers, as a wedged kernel daemon would be).

    Now: ``capbus.connect(address, timeout=1)`` passes the greeting and then waits in
    ``take_seed`` for ever: the timeout covers only the greeting.

    Should: the whole handshake, the seed included, is bounded by ``timeout``:
    ``ServeError: ... did not answer in 1 s``."""
    path = str(tmp_path / "fake")
    async with fake_service(path, _pair(socket.SOCK_SEQPACKET)):
        with trio.move_on_after(WATCHDOG) as watchdog:
            with pytest.raises(capbus.ServeError):
                async with capbus.connect(f"unix:{path}", timeout=1):
                    pass
    assert not watchdog.cancelled_caught, f"connect(timeout=1) still waited after {WATCHDOG} s"


async def test_a_handed_over_stream_socket_is_not_closed_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: a fake service writes the real greeting with a SOCK_STREAM socket attached.

    Now: ``_peer_at`` wraps the fd in ``socket.socket(fileno=fd)``, ``Peer()`` refuses it
    (ValueError), and the error path ``os.close``-es the fd, while the socket object, still
    alive in the traceback, owns the same number: when it is collected it closes that
    number again, by then some other file of the client's (here a file the client opened
    after the failure gets closed behind its back: a descriptor clobbered by a hostile
    service).

    Should: the fd is closed exactly once (close the socket object, not the number), and
    the client's later files stay open."""
    received: list[int] = []
    real_parse = serving._parse_fds

    def spy(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
        fds = real_parse(ancillary)
        received.extend(fds)
        return fds

    monkeypatch.setattr(serving, "_parse_fds", spy)
    path = str(tmp_path / "fake")
    victim = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        async with fake_service(path, _pair(socket.SOCK_STREAM)):
            failure: BaseException | None = None
            try:
                with trio.fail_after(TIMEOUT):
                    async with capbus.connect(f"unix:{path}", timeout=1):
                        pass
            except Exception as error:  # (a ServeError once fixed; ValueError now)
                failure = error
            assert failure is not None and len(received) == 1
            # The client goes on: its next file gets the number the handed-over fd had.
            os.dup2(victim, received[0])
            del failure
            gc.collect()
            try:
                os.fstat(received[0])
            except OSError as error:
                pytest.fail(
                    f"fd {received[0]}, opened after the failed connect, was closed under us: {error}"
                )
    finally:
        os.close(victim)
        if received:
            try:
                os.close(received[0])
            except OSError:
                pass


@pytest.mark.parametrize("kind", ["regular file", "stream socket", "kernel peer without a seed", "huge id"])
async def test_a_handover_that_is_not_a_capbus_peer_is_a_serve_error(tmp_path: Path, kind: str) -> None:
    """Attack: a fake service writes the real greeting with the wrong thing attached: an fd
    that is no socket, a SOCK_STREAM socket, a real kernel peer (of the fake's own kernel)
    that has no seed, or one whose seed says ``capbus.serve `` and then 5000 digits.

    Now: the client gets OSError(ENOTSOCK), ValueError("a capbus peer needs ..."),
    NoSeed("take_seed: No such file or directory"), or ValueError("Exceeds the limit (4300
    digits) for integer string conversion"): none a ServeError, none naming the address,
    all things ``connect``'s documentation says do not happen ("every way of failing to
    connect ... a ServeError that names the address").

    Should: ``ServeError: unix:PATH: not a capbus service ...`` (or similar), with any fd
    received closed."""
    path = str(tmp_path / "fake")
    async with capbus.open_kernel() as kernel, await kernel.connect() as fakes_peer:
        made: list[socket.socket] = []
        if kind in ("kernel peer without a seed", "huge id"):
            if kind == "huge id":
                node = await fakes_peer.create_node()
                made.append(await fakes_peer.create_peer(b"capbus.serve " + b"9" * 5000, handles=[node]))
            else:
                made.append((await kernel.connect()).detach())

        def handover(kept: list[Any]) -> int:
            if kind == "regular file":
                file = open(os.devnull, "rb")  # noqa: SIM115 - closed by fake_service
                kept.append(file)
                return file.fileno()
            if kind == "stream socket":
                return _pair(socket.SOCK_STREAM)(kept)
            kept.append(made[0])
            return made[0].fileno()

        async with fake_service(path, handover):
            with trio.fail_after(TIMEOUT):
                try:
                    async with capbus.connect(f"unix:{path}", timeout=2):
                        pass
                except capbus.ServeError as error:
                    assert f"unix:{path}" in str(error)
                except Exception as error:
                    pytest.fail(f"{kind}: {type(error).__name__}: {error} (not a ServeError)")
                else:
                    pytest.fail(f"{kind}: connected")


async def test_connecting_to_a_too_long_path_says_why(tmp_path: Path) -> None:
    """Attack (a careless operator): ``capbus.connect("unix:" + a path of 120 bytes)``.

    Now: ``ServeError: cannot connect to unix:/…aaaa: `` with nothing after the colon (the
    OSError Python raises, "AF_UNIX path too long", has no errno, and the hint falls back
    to an strerror that is None).

    Should: the reason, e.g. "the path is too long for a unix socket (107 bytes at most)",
    as serving at that path says "File name too long"."""
    address = f"unix:{tmp_path}/{'a' * 120}"
    with pytest.raises(capbus.ServeError) as caught:
        async with capbus.connect(address):
            pass
    assert not str(caught.value).rstrip().endswith(":"), f"no reason given: {str(caught.value)!r}"


# -- the serving side ------------------------------------------------------------------------------


async def test_a_lock_file_the_service_did_not_make_survives_its_close(tmp_path: Path) -> None:
    """Attack (a careless operator, or a project directory): serve at ``unix:DIR/flake`` (or
    ``capbus kernel --listen DIR/yarn``, ``unix:./poetry``, ...) where ``DIR/flake.lock`` is an
    existing file of the user's, with contents.

    Now: the claim opens that file as its lock (no check that it is a capbus lock file, nor
    that it made it), and at the clean close removes it: the user's ``flake.lock`` is
    deleted. (The same for a FIFO or anything else openable at PATH.lock.)

    Should: a file at PATH.lock that the service did not create (or that is not an empty
    capbus lock file) is never removed; either it is refused at the start or left alone at
    the end."""
    lock = tmp_path / "flake.lock"
    lock.write_text('{"nodes": {"root": {}}, "version": 7}\n')
    with trio.fail_after(TIMEOUT):
        async with capbus.serve(Echo(), f"unix:{tmp_path}/flake"):
            pass
    assert lock.exists(), "the service deleted a flake.lock it did not make"
    assert lock.read_text() == '{"nodes": {"root": {}}, "version": 7}\n'


async def test_a_refused_claim_leaves_no_lock_file_behind(tmp_path: Path) -> None:
    """Attack (a careless operator): serve at a path that holds something that is not a
    socket (here a regular file), or a live socket of another program.

    Now: the service is refused, as it should be, but leaves a ``PATH.lock`` it created
    behind in the directory (it unlocks without removing what it made).

    Should: a claim that fails removes the lock file it created, as a clean close does."""
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(capbus.ServeError, match="exists and is not a socket"):
        async with capbus.serve(Echo(), f"unix:{tmp_path}/notes"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


async def test_an_error_in_the_served_block_comes_out_as_itself(tmp_path: Path) -> None:
    """Attack (a careless program): code inside ``async with capbus.serve(...)`` raises, e.g. a
    ServeError from a connect it makes, and the program catches that around the block.

    Now: the error comes out wrapped in ExceptionGroup(ExceptionGroup(error)) (serve yields
    inside a trio nursery, and inside open_vat's), so ``except capbus.ServeError`` around
    the block misses it. For the same reason ``capbus serve`` dies with an ExceptionGroup
    traceback when anything goes wrong while serving (see the kernel-daemon test).

    Should: the exception raised in the block comes out of it as itself."""
    with pytest.raises(capbus.ServeError, match="mine"):
        async with capbus.serve(Echo(), f"unix:{tmp_path}/echo"):
            raise capbus.ServeError("mine")


async def test_capbus_serve_says_what_is_wrong_when_its_kernel_daemon_dies(tmp_path: Path) -> None:
    """Attack: ``capbus serve ADDRESS module:factory --kernel PATH`` runs; its kernel daemon is
    killed (OOM killer, an operator restarting it).

    Now: the service exits (status 1) and removes its socket, but what it says on stderr is
    a 60-line ExceptionGroup traceback ending in ``Disconnected: [Errno 108] [Errno 108]
    the kernel closed the connection``.

    Should: one line saying what happened (``capbus serve: the kernel at PATH went away``,
    say), as every other error of ``capbus serve`` is said, and exit status 1."""
    kernel_path, address = tmp_path / "kernel", f"unix:{tmp_path}/echo"
    daemon_argv = [sys.executable, "-m", "capbus", "kernel", "--listen", str(kernel_path)]
    async with started(daemon_argv, stderr=True) as (daemon, _):
        serve_argv = [*SERVE, address, "echo_service:Echo", "--kernel", str(kernel_path)]
        async with started(serve_argv, stderr=True) as (service, _):
            daemon.kill()
            with trio.fail_after(TIMEOUT):
                status = await service.wait()
                assert service.stderr is not None
                said = b""
                while chunk := await service.stderr.receive_some():
                    said += chunk
    assert status == 1
    assert b"Traceback" not in said, said.decode()[-3000:]
    assert said.decode().startswith("capbus serve: "), said.decode()[-3000:]


@pytest.mark.parametrize("mode", ["999", "4777", "rw-r--r--"])
def test_capbus_serve_says_what_is_wrong_with_its_mode(tmp_path: Path, mode: str) -> None:
    """Attack (a careless operator): ``capbus serve unix:PATH echo_service:Echo --mode 999``
    (not octal), ``--mode 4777`` (setuid bit), ``--mode rw-r--r--``.

    Now: a ValueError traceback from ``int(args.mode, 8)`` (exit status 1 by accident), or
    ``cannot serve at unix:PATH: Invalid argument``, which does not say the mode is what is
    wrong.

    Should: one line naming the mode and what is accepted (octal, 000 to 777), status 1."""
    result = subprocess.run(
        [*SERVE, f"unix:{tmp_path}/echo", "echo_service:Echo", "--mode", mode],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    assert "mode" in result.stderr, result.stderr


async def test_a_second_listen_on_a_kernel_leaves_nothing_behind(tmp_path: Path) -> None:
    """Attack (a careless program): ``kernel.listen(A)`` then ``kernel.listen(B)`` on one
    Kernel (the C kernel has one listening socket: the second is EBUSY).

    Now: the second call claims B, binds a socket file at B (the C side binds before it
    finds it is listening already) and fails; the file at B is left behind, and
    ``kernel.path`` says B although the kernel listens on A.

    Should: the refused second listen leaves B as it was (no socket file), and
    ``kernel.path`` still says A."""
    first, second = tmp_path / "a", tmp_path / "b"
    async with capbus.open_kernel() as kernel:
        kernel.listen(first)
        with pytest.raises(OSError):
            kernel.listen(second)
        assert kernel.path == str(first)
        assert not second.exists(), "a socket file was left at the refused path"


async def test_programs_that_never_read_their_greeting_do_not_lock_out_other_users() -> None:
    """Attack (a hostile local user, where the service lets others connect: mode 0666): as
    user nobody, open connections to the service and never read them, until it refuses.

    Now: each such connection pins a kernel peer (its fd sits unread in the connection's
    receive queue, and the service has closed its end), and every peer is charged to the
    service's own user: after a number of idle connections bounded only by the service's
    kernel quotas (70 for a service with RLIMIT_NOFILE 256; here a kernel with
    ``kernel_fds=64``) every other program, of any user, is refused ("Disk quota exceeded")
    for as long as the attacker keeps its sockets open. The attacker never even took a peer.

    Should: one connecting user cannot take what all the others need: e.g. peers charged
    to the connecting user (SO_PEERCRED) so that the kernel's per-user limits bound each
    user separately, or greetings not read within HANDSHAKE_SECONDS reclaimed."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to connect as another user")
    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o755)
        path = f"{directory}/echo"
        limits = capbus.Limits(kernel_fds=64)
        async with capbus.open_kernel(limits=limits) as kernel:
            async with capbus.serve(Echo(), f"unix:{path}", kernel=kernel, mode=0o666):
                # (a forked child as nobody, not a program: the interpreter may sit where
                # nobody can reach it, as under a 0700 checkout)
                said, hold = os.pipe()
                attacker = os.fork()
                if attacker == 0:  # pragma: no cover - the child
                    try:
                        os.setgid(65534)
                        os.setuid(65534)
                        held = []
                        for _ in range(2000):
                            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                            s.connect(path)
                            held.append(s)
                            if s.recv(64, socket.MSG_PEEK).startswith(b"capbus error"):
                                break
                        os.write(hold, f"{len(held)}\n".encode())
                        signal.pause()
                    finally:
                        os._exit(0)
                os.close(hold)
                try:
                    with trio.fail_after(TIMEOUT):
                        count = await trio.to_thread.run_sync(os.read, said, 64)
                        assert count.strip().isdigit(), f"the attacker died ({count!r})"
                    # The attacker holds its idle connections; a program of the service's
                    # own user now connects.
                    with trio.fail_after(serving.HANDSHAKE_SECONDS + 10):
                        while True:
                            try:
                                async with capbus.connect(f"unix:{path}", schema.Echo) as echo:
                                    assert (await echo.echo(text="in")).text == "in"
                                break
                            except capbus.ServeError as error:
                                if "refused" not in str(error):
                                    raise
                                # (a fix that reclaims unread greetings needs
                                # HANDSHAKE_SECONDS; polled within the fail_after)
                                await trio.sleep(0.5)
                finally:
                    os.close(said)
                    os.kill(attacker, signal.SIGKILL)
                    os.waitpid(attacker, 0)


async def test_connecting_to_a_kernel_daemons_path_says_so(tmp_path: Path) -> None:
    """Attack (a careless operator): ``capbus.connect("unix:PATH")`` where PATH is a kernel
    daemon's socket (``capbus kernel --listen PATH``, SOCK_SEQPACKET), not a service's.

    Now: ``ServeError: cannot connect to unix:PATH: Protocol wrong type for socket``.

    Should: say what is there: a kernel daemon (or a socket of another kind), not a service,
    and that a peer of a kernel daemon is ``capbus.connect_peer(PATH)``."""
    async with capbus.open_kernel(listen=tmp_path / "kernel"):
        with pytest.raises(capbus.ServeError) as caught:
            async with capbus.connect(f"unix:{tmp_path}/kernel"):
                pass
    assert "Protocol wrong type" not in str(caught.value), caught.value
    assert "kernel" in str(caught.value).split(": ", 1)[1], caught.value


async def test_a_symlink_at_the_lock_path_is_named_in_the_refusal(tmp_path: Path) -> None:
    """Attack: someone plants a symlink at ``PATH.lock`` (pointing anywhere, or nowhere).

    Now: the service is refused, as it should be (O_NOFOLLOW: nothing is followed), but the
    error is ``cannot serve at unix:PATH: Too many levels of symbolic links``: it names
    neither the lock file nor a symlink, and PATH itself may well hold no symlink at all.
    (The same for a directory at PATH.lock: ``Is a directory``, or a lock file of another
    user: ``Permission denied``.)

    Should: the error names ``PATH.lock`` and what is wrong with it."""
    (tmp_path / "echo.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(capbus.ServeError) as caught:
        async with capbus.serve(Echo(), f"unix:{tmp_path}/echo"):
            pass
    assert "echo.lock" in str(caught.value), caught.value
    assert not (tmp_path / "elsewhere").exists()


async def test_a_service_that_dies_before_answering_is_a_serve_error(tmp_path: Path) -> None:
    """Attack (or just a restart): a program connects while the service is stopped or busy
    (its connection waits in the listen backlog), and the service is then killed, or stops
    (``serve`` closes its listening socket only after its kernel and vat, so a program that
    connects while it stops waits there too).

    Now: closing a listening socket resets the connections in its backlog, and the
    program's ``recvmsg`` raises ``ConnectionResetError: [Errno 104] Connection reset by
    peer`` straight out of ``capbus.connect``: not a ServeError, and naming no address.

    Should: ``ServeError: unix:PATH: the service closed the connection before it answered``
    (or similar)."""
    path = str(tmp_path / "dying")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(8)

        async def die_once_someone_waits() -> None:
            await trio.lowlevel.wait_readable(listener)  # (a connection is in the backlog)
            listener.close()

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(die_once_someone_waits)
                try:
                    async with capbus.connect(f"unix:{path}", timeout=TIMEOUT / 2):
                        pass
                except capbus.ServeError as error:
                    assert f"unix:{path}" in str(error)
                except OSError as error:
                    pytest.fail(f"{type(error).__name__}: {error} (not a ServeError)")


async def test_the_handed_over_connection_does_not_leak_into_exec_children(tmp_path: Path) -> None:
    """Attack: a program connected with ``capbus.connect`` later runs another program
    (``os.system``, ``os.execv``, ``subprocess`` with ``close_fds=False`` or a ``pass_fds`` of
    its own choosing, a library that forks and execs).

    Now: the peer connection received with SCM_RIGHTS is inheritable (``recvmsg`` without
    MSG_CMSG_CLOEXEC, wrapped with ``socket.socket(fileno=...)``, which sets nothing): every
    program it execs gets the kernel connection, hence the served capability and whatever
    the program received through it, without being handed anything: ambient authority in a
    capability system. Every other fd capbus makes is close-on-exec.

    Should: the received fd is close-on-exec (MSG_CMSG_CLOEXEC, or set_inheritable(False))."""
    address = f"unix:{tmp_path}/echo"
    with trio.fail_after(TIMEOUT):
        async with capbus.serve(Echo(), address):
            before = set(os.listdir("/proc/self/fd"))
            async with capbus.connect(address, schema.Echo) as echo:
                assert (await echo.echo(text="x")).text == "x"
                inheritable = []
                for name in set(os.listdir("/proc/self/fd")) - before:
                    try:
                        if os.get_inheritable(int(name)):
                            inheritable.append(f"{name} -> {os.readlink(f'/proc/self/fd/{name}')}")
                    except OSError:
                        pass  # (the listing's own fd, closed since)
                assert not inheritable, f"inheritable across exec: {inheritable}"
