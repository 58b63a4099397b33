"""Finding 6 of the RPC attack review, still open (see pending/README.md): this test belongs in
tests/rpc/test_attacks_review.py (same imports and helpers) and fails on main.

Why it is not fixed yet: the callee T knows only the sender of a call, and a pipelined call
that S forwards to T is sent by S, so T charges what it hands out to S. The fix that removes
the problem is the one Cap'n Proto's Resolve/embargo achieves: S does not forward at all but
answers the pipelined call with a redirect ("the target is the capability at this transform
of your question's results, which you hold"), and the caller's vat re-sends the call to T
itself (the kernel's global order puts S's Return before the redirect, so the caller already
holds the handle). That also ends forwarded calls using S's pipelining budget. It changes
the wire protocol (a Return variant) and test_a_caller_cannot_take_the_whole_pipelining_budget,
whose attacker waits for 64 forwarded calls.
"""

# -- 6. forwarded calls are charged to the vat that forwards them -----------------------------


async def test_calls_forwarded_for_a_caller_do_not_use_up_the_forwarders_quota(
    kernel: capbus.Kernel, tmp_path: Path
) -> None:
    """MEDIUM. S (honest) returned a capability of T in results its caller A may pipeline
    on (here S.same(cap=T's factory)). A's pipelined newCounter() calls on it are forwarded
    by S to T as S's own calls: T counts the counters A is handed, and keeps, against S.
    With T's max_exports_per_caller=5, A (in its own process) takes 5 that way, and S's own
    newCounter() on T fails with Overloaded ("this caller holds 5 objects"), while A keeps
    its own full quota at T. Any vat that returns a capability of another vat can be locked
    out of that vat by one of its callers."""
    t_peer, s_peer = await kernel.connect(), await kernel.connect()
    async with open_vat(t_peer, max_exports_per_caller=5) as t_vat, open_vat(s_peer) as s_vat:
        t_node = await t_vat.export(FactoryServer())
        s_node = await s_vat.export(FactoryServer())
        t_at_s = s_vat.client(await t_peer.transfer(t_node, s_peer), schema.Factory)
        t_at_holder = await t_peer.transfer(t_node, s_peer)  # (the same handle: for the child)
        attack = f"""
        async def attack(peer, report, s_handle, t_handle):
            async with open_vat(peer) as vat:
                s = vat.client(s_handle, schema.Factory)
                t = vat.client(t_handle, schema.Factory)
                promise = await s.same.send(cap=t)
                kept = []
                for _ in range(5):
                    results = await vat.call_pipelined(promise, ({SAME_CAP},), METHODS["newCounter"], {{}})
                    kept.append(results.counter)
                await report(len(kept))
                await trio.sleep_forever()  # the vat and the counters stay
        """
        with trio.fail_after(TIMEOUT):
            async with attacker_process(kernel, tmp_path, attack, s_peer, [s_node, t_at_holder]) as report:
                assert report == "5"
                counter = (await t_at_s.newCounter()).counter
                assert (await counter.increment(by=1)).value == 1
    for peer in (t_peer, s_peer):
        await peer.aclose()


