"""docs/design.md 2.1 rule 8: one global order.

Sender processes multicast concurrently to random overlapping sets of receivers; receivers
react to some messages by multicasting in turn. Afterwards every pair of receivers must have
seen the messages they share in the same relative order, and every reaction must come after
the message that caused it (and every sender's messages in the order it sent them) wherever
both arrive.
"""

from __future__ import annotations

import itertools
import json
import random
import sys

import trio

import capbus
from capbus.testing import PeerFactory, recv_kind

SENDER = r"""
import json, random, sys, trio, capbus

async def main(fd, name, count, seed):
    rng = random.Random(seed)
    async with capbus.Peer.from_socket(fd) as peer:
        targets = list((await peer.take_seed()).handles)
        for i in range(count):
            chosen = rng.sample(targets, rng.randint(1, len(targets)))
            await peer.send(chosen, json.dumps(["m", name, i]).encode())
        await peer.send(targets, json.dumps(["done", name]).encode())

trio.run(main, int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
"""

N_SENDERS = 3
N_RECEIVERS = 5
PER_SENDER = 1000


async def test_rule8_global_order_randomized(new_peer: PeerFactory) -> None:
    rng = random.Random(8)
    hub = await new_peer()
    receivers = [await new_peer() for _ in range(N_RECEIVERS)]
    nodes = [await r.create_node() for r in receivers]
    in_hub = [await r.transfer(n, hub) for r, n in zip(receivers, nodes, strict=True)]
    # Every receiver can reach every other receiver.
    peers_of = [
        [await receivers[j].transfer(nodes[j], r) for j in range(N_RECEIVERS) if j != i]
        for i, r in enumerate(receivers)
    ]
    logs: list[list[tuple[str, ...]]] = [[] for _ in receivers]
    seqs: list[list[int]] = [[] for _ in receivers]
    causes: dict[tuple[str, ...], tuple[str, ...]] = {}

    async def receive(index: int) -> None:
        peer = receivers[index]
        senders_done = 0
        receivers_done = 0
        while senders_done < N_SENDERS or receivers_done < N_RECEIVERS - 1:
            message = await recv_kind(peer, capbus.MessageKind.DATA)
            kind, *rest = json.loads(message.payload)
            seqs[index].append(message.seq)
            if kind == "done":
                senders_done += 1
                if senders_done == N_SENDERS:
                    await peer.send(peers_of[index], json.dumps(["rdone", index]).encode())
                continue
            if kind == "rdone":
                receivers_done += 1
                continue
            key = (kind, *map(str, rest))
            logs[index].append(key)
            if kind == "m" and rng.random() < 0.2 and senders_done < N_SENDERS:
                reaction = ("r", str(index), f"{rest[0]}:{rest[1]}")
                causes[reaction] = key
                chosen = rng.sample(peers_of[index], rng.randint(1, N_RECEIVERS - 1))
                await peer.send(chosen, json.dumps(list(reaction)).encode())

    socks = [await hub.create_peer(b"", handles=in_hub) for _ in range(N_SENDERS)]
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for i in range(N_RECEIVERS):
                nursery.start_soon(receive, i)
            for k, sock in enumerate(socks):
                nursery.start_soon(
                    lambda k=k, sock=sock: trio.run_process(
                        [sys.executable, "-c", SENDER, str(sock.fileno()), f"s{k}", str(PER_SENDER), str(k)],
                        pass_fds=[sock.fileno()],
                    )
                )
    for sock in socks:
        sock.close()

    total = sum(len(log) for log in logs)
    print(f"{total} deliveries, {len(causes)} reactions")
    assert total > N_SENDERS * PER_SENDER  # multicasts reached several receivers
    # Each receiver's queue follows the global sequence.
    for seq_list in seqs:
        assert seq_list == sorted(seq_list)
    # Same relative order for every pair of receivers.
    for a, b in itertools.combinations(range(N_RECEIVERS), 2):
        position_in_b = {key: i for i, key in enumerate(logs[b])}
        shared = [position_in_b[key] for key in logs[a] if key in position_in_b]
        assert shared == sorted(shared), f"receivers {a} and {b} disagree on the order"
    # Causality: a reaction comes after its cause; a sender's messages in the order sent.
    for log in logs:
        position = {key: i for i, key in enumerate(log)}
        for reaction, cause in causes.items():
            if reaction in position and cause in position:
                assert position[cause] < position[reaction]
        for k in range(N_SENDERS):
            mine = [int(key[2]) for key in log if key[0] == "m" and key[1] == f"s{k}"]
            assert mine == sorted(mine)
    assert causes, "no reactions happened: the causality check checked nothing"


async def test_rule8_destroy_is_ordered_against_messages(new_peer: PeerFactory) -> None:
    owner = await new_peer()
    holder = await new_peer()
    node = await owner.create_node()
    held = await owner.transfer(node, holder)
    holder_inbox = await holder.create_node()
    to_holder = await holder.transfer(holder_inbox, owner)

    await holder.send(held, b"before")
    await owner.send(to_holder, b"owner before")
    await owner.destroy(node)
    # The owner's message to the holder precedes the holder's notification ...
    assert (await recv_kind(holder, capbus.MessageKind.DATA)).payload == b"owner before"
    note = await recv_kind(holder, capbus.MessageKind.NODE_DESTROYED)
    assert note.destination == held
    # ... and what the holder sent before the destroy reaches the owner before its own.
    assert (await recv_kind(owner, capbus.MessageKind.DATA)).payload == b"before"
    assert (await recv_kind(owner, capbus.MessageKind.NODE_DESTROYED)).destination == node
    # Nothing after.
    try:
        await holder.send(held, b"after")
    except capbus.NodeDestroyed:
        pass
    else:
        raise AssertionError("a send after the destroy was accepted")
