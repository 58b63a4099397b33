"""Draws the capability graph of a small bus (the picture in docs/tools.md):

    directory   owns a "lookup" node; it holds handles to two printers' nodes;
    printer-1   owns a "print" node; printer-2 owns one too, and retired an old one that
                a client still holds (destroyed: dashed);
    client      was given the directory, and by it printer-1; it gave the directory a
                "callback" node of its own.

Run it with ``python examples/capability_graph.py [-o graph.svg]`` (svg, png or dot); the
same picture of a running kernel comes from ``capbus graph --kernel PATH -o graph.svg``.
"""

from __future__ import annotations

import argparse

import trio

import capbus
from capbus.graph import draw


async def main(output: str) -> None:
    async with capbus.open_kernel() as kernel:
        directory, printer_1, printer_2, client = [await kernel.connect() for _ in range(4)]
        lookup = await directory.create_node()
        first = await printer_1.create_node()
        second = await printer_2.create_node()
        retired = await printer_2.create_node()
        await printer_1.transfer(first, directory)
        await printer_2.transfer(second, directory)
        await directory.transfer(lookup, client)
        await printer_1.transfer(first, client)  # (as the directory would, in a reply)
        await printer_2.transfer(retired, client)
        await printer_2.destroy(retired)
        callback = await client.create_node()
        await client.transfer(callback, directory)
        await client.hold_messages()
        to_client = await client.transfer(await client.create_node(), printer_1)
        await printer_1.send(to_client, b"job 1 done")  # (held: queued in the kernel)
        snapshot = await kernel.snapshot()
        draw(snapshot, output, title="capbus: who can reach whom")
        counts = f"{len(snapshot.peers)} peers, {len(snapshot.nodes)} nodes, {len(snapshot.handles)} handles"
        print(f"{counts}: {output}")
        for peer in (directory, printer_1, printer_2, client):
            await peer.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="capability-graph.svg", help="a .svg, .png or .dot file")
    trio.run(main, parser.parse_args().output)
