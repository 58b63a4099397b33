"""File descriptors passed in calls and in results arrive as usable fds."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import trio

import capbus
from capbus.rpc.fds import FileDescriptor
from capbus.rpc.vat import open_vat

files: Any = capbus.load(Path(__file__).with_name("files.capnp"))


class FileServer(files.Files.Server):  # type: ignore[misc,name-defined]
    def __init__(self, directory: str) -> None:
        self.directory = directory

    async def open(self, name: str) -> dict[str, Any]:
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # The fd is duplicated into the caller on the way; ours closes after the call.
            return {"file": fd, "size": os.fstat(fd).st_size}
        finally:
            self._last = fd

    async def fill(self, sink: FileDescriptor, data: bytes) -> None:
        with sink:
            os.write(sink.fileno(), data)


async def test_fds_in_results_and_params(kernel: capbus.Kernel) -> None:
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "notes.txt").write_bytes(b"only through the capability")
        server_peer, client_peer = await kernel.connect(), await kernel.connect()
        server = FileServer(directory)
        with trio.fail_after(10):
            async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
                node = await server_vat.export(server)
                remote = client_vat.client(await server_peer.transfer(node, client_peer), files.Files)
                opened = await remote.open("notes.txt")
                assert opened.size == 27
                with opened.file as received:
                    assert isinstance(received, FileDescriptor)
                    assert os.pread(received.fileno(), 100, 0) == b"only through the capability"
                os.close(server._last)
                read_end, write_end = os.pipe()
                try:
                    await remote.fill(sink=write_end, data=b"written by the server")
                    os.close(write_end)
                    write_end = -1
                    assert os.read(read_end, 100) == b"written by the server"
                    assert os.read(read_end, 100) == b""  # the server closed its copy
                finally:
                    os.close(read_end)
                    if write_end >= 0:
                        os.close(write_end)
        await server_peer.aclose()
        await client_peer.aclose()


async def test_fds_in_local_calls_are_copies_too(kernel: capbus.Kernel) -> None:
    peer = await kernel.connect()
    with tempfile.TemporaryDirectory() as directory, trio.fail_after(10):
        Path(directory, "local.txt").write_bytes(b"local")
        async with open_vat(peer) as vat:
            server = FileServer(directory)
            local = vat.local(server)
            opened = await local.open("local.txt")
            os.close(server._last)  # the server's own fd: the result holds a copy
            with opened.file as received:
                assert os.pread(received.fileno(), 10, 0) == b"local"
    await peer.aclose()
