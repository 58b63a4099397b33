"""user_handles across uids and sends: a send is checked as a whole, a sending uid brings
another uid at most a fair share of its user_handles while those handles live, and a held
handle's NODE_DESTROY is paid with it (docs/wire-format.md, Quotas)."""

from __future__ import annotations

import socket

import trio
from capbus._kernel import lib

import capbus
from capbus.testing import recv_kind

from .other_uid import needs_root

DATA = capbus.MessageKind.DATA
DESTROYED = capbus.MessageKind.NODE_DESTROYED
OTHER = 1001
TIMEOUT = 30


def adopt(kernel: capbus.Kernel, uid: int) -> capbus.Peer:
    """A new peer of the embedded kernel, charged to ``uid`` for good."""
    theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert lib.capbus_kernel_adopt(kernel._kernel, ours.detach(), uid, uid, 0) == 0
    return capbus.Peer.from_socket(theirs)


async def test_two_destinations_on_one_receiver_count_its_new_handles_once() -> None:
    """The second destination installs the handles the first did: the send fits the uid's
    user_handles if one copy does."""
    fresh = 8
    # Both receiver nodes and their handles in the sender, the sender's nodes, one copy.
    limit = 2 + 2 + fresh + fresh
    async with capbus.open_kernel(limits=capbus.Limits(user_handles=limit)) as kernel:
        async with await kernel.connect() as receiver, await kernel.connect() as sender:
            inboxes = [await receiver.create_node() for _ in range(2)]
            targets = [await receiver.transfer(inbox, sender) for inbox in inboxes]
            nodes = [await sender.create_node() for _ in range(fresh)]
            await sender.send(targets, b"", handles=nodes)
            first = await recv_kind(receiver, DATA)
            second = await recv_kind(receiver, DATA)
            assert first.handles == second.handles
            assert kernel.statistics().handles == limit
            # The uid is full now: one more handle for it is refused.
            try:
                await sender.create_node()
            except capbus.errors.QuotaExceeded:
                pass
            else:
                raise AssertionError("a uid went past its user_handles")


async def test_a_uid_brings_another_a_fair_share_of_handles_until_they_are_released() -> None:
    needs_root("it charges peers to another uid")
    limit = 100
    async with capbus.open_kernel(limits=capbus.Limits(user_handles=limit)) as kernel:
        async with await kernel.connect() as receiver, adopt(kernel, OTHER) as sender:
            target = await receiver.transfer(await receiver.create_node(), sender)
            with trio.fail_after(TIMEOUT):
                brought = 0
                while True:
                    node = await sender.create_node()
                    try:
                        await sender.send(target, b"", handles=[node])
                    except capbus.errors.QuotaExceeded:
                        break
                    brought += 1
                # Half of what the receiving uid had free (its one node), less one: the rule
                # `limit - used - c >= share + c`.
                assert brought == (limit - 1) // 2
                # Its own nodes still fit, and so do handles from others.
                await receiver.create_node()
                received = [await recv_kind(receiver, DATA) for _ in range(brought)]
                for message in received:
                    await receiver.release(message.handles[0])
                # Released: the sender may bring as many again.
                await sender.send(target, b"", handles=[node])
                assert (await recv_kind(receiver, DATA)).handles[0].is_valid


async def test_destroy_notifications_of_held_handles_wait_in_no_backlog() -> None:
    """A peer holds more handles of another uid's nodes than its uid's user_backlog has room
    for notifications: when the nodes go, every notification is queued for it, and while it
    does not read them the other peers of its uid are still served."""
    needs_root("it charges peers to another uid")
    count = 2 * lib.CAPBUS_HANDLES_MAX
    async with capbus.open_kernel(limits=capbus.Limits(user_backlog=16384)) as kernel:
        async with (
            await kernel.connect() as holder,
            await kernel.connect() as active,
            adopt(kernel, OTHER) as owner,
        ):
            inbox = await holder.transfer(await holder.create_node(), owner)
            nodes = [await owner.create_node() for _ in range(count)]
            held = []
            for i in range(0, count, lib.CAPBUS_HANDLES_MAX):
                await owner.send(inbox, b"", handles=nodes[i : i + lib.CAPBUS_HANDLES_MAX])
                held += (await recv_kind(holder, DATA)).handles
            await owner.destroy(*nodes)
            with trio.move_on_after(5) as waited:
                assert (await active.info()).uid == 0
            assert not waited.cancelled_caught, "the holder's notifications gated its uid"
            with trio.fail_after(TIMEOUT):
                for handle in held:
                    assert (await recv_kind(holder, DESTROYED)).destination == handle
