"""capbus demo: three peers on an embedded kernel pass a handle, a file descriptor, and see a
node destroyed. Run it with ``python3 dev.py demo``.

    printer   owns a "print" node and prints every message sent to it;
    broker    is given a handle to it, and forwards it to a client it meets;
    client    never met the printer, but can now reach it, and sends it an open file.
"""

from __future__ import annotations

import os
import tempfile

import trio

import capbus


async def main() -> None:
    async with capbus.open_kernel() as kernel:
        async with (
            await kernel.connect() as printer,
            await kernel.connect() as broker,
            await kernel.connect() as client,
        ):
            print_node = await printer.create_node()
            await printer.want_metadata()  # senders' uid/gid/pid on what the printer receives
            print(f"printer: created node {print_node}")

            # Bootstrap: this process holds both peers, so it can hand the broker a handle.
            printer_in_broker = await printer.transfer(print_node, broker)
            client_inbox = await client.create_node()
            inbox_in_broker = await client.transfer(client_inbox, broker)
            print(f"broker: holds {printer_in_broker} (printer) and {inbox_in_broker} (client)")

            # The broker introduces the client to the printer by sending it the handle.
            await broker.send(inbox_in_broker, b"here is the printer", handles=[printer_in_broker])
            intro = await client.recv()
            printer_in_client = intro.handles[0]
            print(f"client: got {intro.payload!r} with {printer_in_client}")

            # The client sends the printer a message with an open file attached.
            with tempfile.TemporaryFile() as document:
                document.write(b"a document only the printer may read\n")
                document.flush()
                await client.send(printer_in_client, b"please print", fds=[document])
            job = await printer.recv()
            print(
                f"printer: {job.payload!r} from uid {job.sender.uid if job.sender else '?'}, "
                f"{len(job.fds)} fd attached"
            )
            with os.fdopen(job.fds.pop(), "rb") as received:
                received.seek(0)
                print(f"printer: the file says {received.read()!r}")

            # The printer retires its node: every holder is told, in order, and later sends fail.
            await printer.destroy(print_node)
            for name, peer in (("broker", broker), ("client", client)):
                note = await peer.recv()
                print(f"{name}: {note.kind.name} for {note.destination}")
            try:
                await client.send(printer_in_client, b"one more?")
            except capbus.NodeDestroyed as error:
                print(f"client: send after destroy fails: {type(error).__name__} (errno {error.errno})")

            stats = kernel.statistics()
            print(
                f"kernel: {stats.peers} peers, {stats.nodes} nodes, {stats.handles} handles, "
                f"{stats.messages_sent} messages delivered"
            )


if __name__ == "__main__":
    trio.run(main)
