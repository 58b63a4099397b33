"""The RPC engine: one vat's bookkeeping, without IO (sans-IO, as h11 is for HTTP).

The engine owns the tables of docs/design.md section 3 and makes every decision about them; it
never touches a socket, a task or a clock. It is fed what arrives (:meth:`Engine.receive`
takes a peer's :class:`~capbus.peer.Message`) and returns :class:`Event` records: returns
for questions, calls to serve, finishes, objects gone, exports that may be retired, and
:class:`Send` records for the messages to write. The vat (vat.py) runs it over a bus1 peer
with trio; another transport can run the same engine.

Tables:
- exports: node -> server, and (id(server), holder) -> node: one node per object and per
  caller a return hands it to (reused while held), so that the kernel's release
  notification says which caller let go (charges are per caller); one more for the rest;
- imports: handle -> client (one per handle, so identity holds) and the kernel references
  its clients own, released (batched, :meth:`take_releases`) when they are collected;
- questions: question id -> (target, method) while a caller waits;
- answers: (reply handle, question id) of calls being served, for Finish to cancel.

Callers are told apart by who the kernel says sent their calls (:data:`Caller`), never by
anything a caller chooses, such as its reply node (it can make any number of them): what
one caller may take of this vat (handlers, objects, kept answers, pipelined calls) is
bounded per caller.
"""

from __future__ import annotations

import collections
import mmap
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from .. import errors as bus
from ..memfd import MAPPING_HOLDS_FD
from ..messages import Message, MessageKind
from .client import Client, ClientClasses, client_class
from .errors import Disconnected, Failed, Overloaded, RpcError, from_kernel
from .fds import FileDescriptor
from .interface import Interface, Method
from .layout import FieldLayout
from .protocol import (
    REPLY,
    Encoded,
    ReceivedCall,
    ReceivedFinish,
    ReceivedReturn,
    call_identity,
    decode,
    encode_exception,
    encode_redirect,
    results_capability,
    return_identity,
)
from .segments import NotMapped, held_fds, take_attached
from .server import Server
from .structs import StructReader

_REFERENCES_KEPT = 256
_REPLY_NODES_KEPT = 256
_QUESTION_ID_MASK = (1 << 61) - 1
_RECENT_REPLIES = 64

Caller: TypeAlias = Hashable
"""Who made a call, as the kernel attests it (:func:`caller_of`)."""


def caller_of(message: Message) -> Caller:
    """The sending peer of ``message`` (its uid and the kernel's serial of the connection the
    frame was read from: unforgeable, and the same for every reply node of that peer and
    for every process writing on its socket). Not the sending process: any peer can fork
    processes that write on its one connection, and each would be a caller with bounds of
    its own. (A uid can also connect more peers, as many as the kernel's peers_per_user.)
    The vat asks its peer for senders' credentials; without them (another transport)
    every caller is one."""
    sender = message.sender
    return None if sender is None else (sender.uid, sender.peer)


@dataclass(slots=True)
class Send:
    """A message to write. ``destination`` is a client (kept alive until written: a
    collected client releases its handle) or a handle id."""

    destination: Client | int
    encoded: Encoded
    oneway: bool = True


@dataclass(slots=True)
class Returned:
    """The answer to question ``question_id``: results or an error, or (for a pipelined
    call only) ``redirect``: the callee did not make the call, make it on the capability
    itself (rpc.capnp's Return.redirect)."""

    question_id: int
    results: StructReader | None = None
    error: RpcError | None = None
    redirect: bool = False


@dataclass(slots=True)
class CallArrived:
    """A call to serve. ``method`` is None when the server lacks it; ``reply`` is None for a
    one-way call."""

    server: Server
    call: ReceivedCall
    method: Method | None
    reply: Client | None
    question_id: int
    caller: Caller = None
    handles: tuple[int, ...] = ()
    """Handles of other peers' nodes the call's message brought, besides its reply
    capability: this peer holds them while the call waits to start (Vat bounds them per
    caller)."""
    size: int = 0
    """Bytes of the call's message, which its params are read from: held (in memory, or
    mapped for a memfd payload) while it waits to start (Vat bounds them per caller)."""
    fds: int = 0
    """File descriptors the call's message brought (held likewise, when its method may
    take them; Vat bounds them too)."""
    answer: object = None
    """The engine's record of the call (pass it back to :meth:`Engine.completed`): a
    caller may reuse a question id, and the answer to an earlier call must not settle
    the later one's."""


@dataclass(slots=True)
class FinishArrived:
    """The caller of (reply handle, question id) gave up: cancel that call's handler."""

    key: tuple[int, int]


@dataclass(slots=True)
class MayRetire:
    """No one else holds ``node`` (as of the notification): check its holder count, then
    call :meth:`Engine.retire` if it is still unused."""

    node: int


Event = Send | Returned | CallArrived | FinishArrived | MayRetire


_KEPT_REASON = 1024
"""Characters of a failed answer's reason kept for the calls pipelined on it."""


@dataclass(slots=True, eq=False)
class _Waiting:
    """A pipelined call waiting for the answer it names, and the bytes and file descriptors
    of its message, which it holds meanwhile."""

    call: ReceivedCall
    reply: Client
    question_id: int
    transform: list[int]
    caller: Caller
    size: int = 0
    fds: int = 0
    handles: tuple[int, ...] = ()
    """Handles of other peers' nodes the call brought (held by this peer meanwhile)."""

    @property
    def key(self) -> tuple[int, int]:
        return (self.reply.handle, self.question_id)


@dataclass(slots=True, eq=False)
class _Answer:
    """A call being served, or (if its caller may pipeline on it) its kept outcome: the
    failure, the return if it holds capabilities (only those can be pipelined on), or that
    it was redirected (calls pipelined on it are redirected in turn)."""

    keep: bool
    caller: Caller = None
    reply: Client | None = None
    """Its caller's reply node, held while the answer is: so that this vat holds the
    handle, and hears when the caller goes (NODE_DESTROYED), however many callers came
    since (a reply client is otherwise kept only among the recent ones)."""
    done: bool = False
    redirected: bool = False
    returned: Encoded | None = None
    failure: RpcError | None = None
    kept_bytes: int = 0
    kept_fds: int = 0
    waiting: dict[tuple[int, int], _Waiting] = field(default_factory=dict)
    """The pipelined calls waiting for it, by their own key (in arrival order)."""


@dataclass(slots=True)
class _Question:
    target: int
    method: Method
    reply: int
    """The reply node the call named: its return must arrive there."""
    pipelined: bool = False
    """Only a pipelined call may be answered with a redirect."""


def _held_fds(payload: object) -> int:
    """The fds of this process a kept payload holds: a message built in a memfd keeps it
    (SealedMapping), and CPython's mapping keeps another before 3.13."""
    if isinstance(payload, memoryview) and isinstance(payload.obj, mmap.mmap):
        return 1 + MAPPING_HOLDS_FD
    return 0


def uid_of(caller: Caller) -> Hashable:
    """The user a caller is (every caller is one when the transport says nothing)."""
    return caller[0] if isinstance(caller, tuple) else caller


MAX_WAITING_FDS = 64
"""File descriptors one caller's waiting pipelined calls may hold (one message's worth)."""

UID_SHARE = 4
"""What all callers of one uid may take of a vat together, in callers' worth (see Tally)."""


def _lower(counts: dict[Any, int], key: Hashable, count: int) -> None:
    """Lowers a count (forgetting it at zero)."""
    left = counts.get(key, 0) - count
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class Tally:
    """How much of something callers hold, per caller and per uid. A uid can connect many
    peers (up to the kernel's peers_per_user), each a caller with bounds of its own: the
    callers of one uid together may hold at most ``uid_share`` times one caller's bound."""

    __slots__ = ("_callers", "_uids", "uid_share")

    def __init__(self, uid_share: int = UID_SHARE) -> None:
        self._callers: dict[Caller, int] = {}
        self._uids: dict[Hashable, int] = {}
        self.uid_share = uid_share

    def __getitem__(self, caller: Caller) -> int:
        return self._callers.get(caller, 0)

    def of_uid(self, caller: Caller) -> int:
        """What all callers of ``caller``'s uid hold."""
        return self._uids.get(uid_of(caller), 0)

    def fits(self, caller: Caller, count: int, bound: int) -> bool:
        """Whether ``caller`` may hold ``count`` more, ``bound`` being one caller's bound."""
        return self[caller] + count <= bound and self.of_uid(caller) + count <= bound * self.uid_share

    def over(self, caller: Caller, bound: int, count: int = 1, *, own: bool = True) -> str | None:
        """Why ``caller`` may not hold ``count`` more (one caller's ``bound``): what it, or
        its uid, holds; None if it may. ``own=False``: its uid's bound only."""
        if own and self[caller] + count > bound:
            return f"{self[caller]} (from this caller)"
        if self.of_uid(caller) + count > bound * self.uid_share:
            return f"{self.of_uid(caller)} (from this caller's uid, of all its connections)"
        return None

    def add(self, caller: Caller, count: int) -> None:
        if count:
            self._callers[caller] = self[caller] + count
            uid = uid_of(caller)
            self._uids[uid] = self._uids.get(uid, 0) + count

    def take(self, caller: Caller, count: int) -> None:
        if count:
            _lower(self._callers, caller, count)
            _lower(self._uids, uid_of(caller), count)


class Engine:
    """See the module docstring."""

    def __init__(
        self,
        reply_node: int,
        *,
        max_message_bytes: int,
        on_release: Callable[[], None],
        max_waiting: int = 4096,
        max_waiting_bytes: int | None = None,
        max_waiting_capabilities: int = 256,
        max_kept_per_caller: int = 1024,
        max_kept_bytes_per_caller: int | None = None,
        uid_share: int = UID_SHARE,
    ) -> None:
        self.reply_node = reply_node
        """The vat's first reply node (for a Finish whose callee's node was let go)."""
        # One reply node per callee (target handle): a callee holds only its own, so it can
        # neither answer for another callee nor pass itself off as this vat to one.
        self._replies: OrderedDict[int, int] = OrderedDict()  # target handle -> reply node
        self.reply_nodes: set[int] = {reply_node}
        self._spare_replies: list[int] = []
        self.max_message_bytes = max_message_bytes
        self.max_mapped_bytes: Callable[[], int | None] = lambda: None
        """What the transport maps of a message at most (the vat gives its peer's
        max_mapped_bytes): attached segments over it are refused, Overloaded."""
        self.max_waiting = max_waiting
        """Pipelined calls of one caller that may wait for answers not yet given: past it,
        its such calls are answered Overloaded."""
        self.max_kept_per_caller = max_kept_per_caller
        """Answers one caller may have kept for pipelining until its Finish: past it,
        answers are not kept (pipelining on them then fails)."""
        self.max_kept_bytes_per_caller = (
            2 * max_message_bytes if max_kept_bytes_per_caller is None else max_kept_bytes_per_caller
        )
        """Bytes of returns kept for one caller, likewise (a kept return is a whole message)."""
        self.max_waiting_bytes = 2 * max_message_bytes if max_waiting_bytes is None else max_waiting_bytes
        """Bytes of those calls' messages, likewise."""
        self.max_waiting_fds = MAX_WAITING_FDS
        """File descriptors those calls brought (this process holds them meanwhile), likewise."""
        self.max_waiting_capabilities = max_waiting_capabilities
        """Capabilities those calls brought (handles this peer holds meanwhile), likewise."""
        self.waiting_calls = 0
        """Pipelined calls waiting for their answers, of all callers."""
        self.uid_share = uid_share
        """All callers of one uid together may take this many callers' worth of each bound."""
        self._waiting = Tally(uid_share)  # the same, per caller
        self._waiting_bytes = Tally(uid_share)
        self._waiting_fds = Tally(uid_share)
        self._waiting_capabilities = Tally(uid_share)
        self._waiting_in: dict[tuple[int, int], _Answer] = {}  # a waiting call's key -> its base
        self._kept = Tally(uid_share)  # answers kept for a caller
        self._kept_bytes = Tally(uid_share)
        self._kept_fds = Tally(uid_share)  # of kept returns built in a memfd (held mapped)
        self._on_release = on_release
        self._next_question = 1
        self._entropy = memoryview(b"")
        self.questions: dict[int, _Question] = {}
        # The same by target handle, and how many are open per reply node: a destroyed
        # node, a client let go, a reply node to retire cost their own questions only.
        self._asked: dict[int, set[int]] = {}
        self._open_replies: dict[int, int] = {}
        self.answers: dict[tuple[int, int], _Answer] = {}
        # The same keys by reply handle: a destroyed node costs only its own answers, not a
        # walk of every caller's (run in the receive loop, once per destroyed handle).
        self._answers_of: dict[int, set[tuple[int, int]]] = {}
        self.exports: dict[int, Server] = {}
        self.kept: set[int] = set()
        """Exports never retired, whoever lets go (Vat.export(keep=True))."""
        self._export_nodes: dict[tuple[int, Caller], int] = {}  # (id(server), holder) -> node
        self._export_keys: dict[int, tuple[int, Caller]] = {}  # node -> its key above
        self._export_busy: dict[int, int] = {}  # node -> sends in progress that carry it
        self._export_sends: dict[int, int] = {}  # node -> sends that carried it, ever
        # Whom each export was first made for by a return, and how many each caller got: a
        # caller that keeps everything it is given is bounded (Vat._bounded), not the server.
        self._export_for: dict[int, Caller] = {}  # node -> caller
        self.exports_held = Tally(uid_share)
        """Exports first made for returns to a caller that are still held, and those
        reserved for returns on their way to it."""
        self.imports: weakref.WeakValueDictionary[int, Client] = weakref.WeakValueDictionary()
        self._import_refs: dict[int, int] = {}
        self.broken: set[int] = set()
        self._releases: dict[int, int] = {}
        self._clients = ClientClasses()
        """By id(interface): a generic interface has one Interface per brand."""
        self._locals: weakref.WeakValueDictionary[int, Client] = weakref.WeakValueDictionary()
        self.generic = client_class(Interface(0, "Capability", None))
        """The class of clients whose interface is not known."""
        self.vat: Any = None  # the object clients call through (set by the vat)
        # Recent callers' reply clients, kept alive: a reply handle comes with every call,
        # and letting its client die after each would cost a release command (and a release
        # notification to the caller) per call. References pile up instead and are released
        # in one command per _REFERENCES_KEPT calls; a caller's destroyed node drops it.
        self._recent_replies: OrderedDict[int, Client] = OrderedDict()

    # -- exports ------------------------------------------------------------------------------

    def export_node(self, server: Server, holder: Caller = None) -> int | None:
        """The node of an exported server for ``holder`` (the caller a return hands it to;
        None: anyone else), or None if it needs one (:meth:`exported`)."""
        return self._export_nodes.get((id(server), holder))

    def exported(self, server: Server, node: int, holder: Caller = None) -> None:
        self.exports[node] = server
        key = (id(server), holder)
        self._export_nodes[key] = node
        self._export_keys[node] = key

    def _forget_export(self, node: int) -> Server:
        server = self.exports.pop(node)
        self._export_busy.pop(node, None)
        self._export_sends.pop(node, None)
        key = self._export_keys.pop(node, None)
        if key is not None and self._export_nodes.get(key) == node:
            del self._export_nodes[key]
        return server

    def charge(self, node: int, caller: Caller, *, reserved: bool = False) -> None:
        """Counts the new export ``node`` against ``caller``, to whom a return hands it (until
        it is retired); ``reserved``: it was counted already (:meth:`reserve`)."""
        self._export_for[node] = caller
        if not reserved:
            self.reserve(caller, 1)

    def reserve(self, caller: Caller, count: int) -> None:
        """Counts ``count`` exports a return to ``caller`` is about to make against it."""
        self.exports_held.add(caller, count)

    def unreserve(self, caller: Caller, count: int) -> None:
        """Takes back ``count`` of :meth:`reserve` (their nodes were never made for it)."""
        self.exports_held.take(caller, count)

    def sending(self, handles: list[int], started: bool) -> None:
        """Marks the exports a send carries as busy (``started``) or not: a busy export is not
        retired, since the send may give it out again."""
        for node in handles:
            if node in self.exports:
                self._export_busy[node] = self._export_busy.get(node, 0) + (1 if started else -1)
                if started:
                    self._export_sends[node] = self._export_sends.get(node, 0) + 1

    def sends_of(self, node: int) -> int | None:
        """A mark of the sends that carried export ``node`` so far, to take before asking the
        kernel for its holders (:meth:`retire`); None while a send carries it (its holder
        count may not include that send's receiver)."""
        if self._export_busy.get(node):
            return None
        return self._export_sends.get(node, 0)

    def retire(self, node: int, holders: int, sends: int) -> Server | None:
        """After :class:`MayRetire` and a holder count asked for after :meth:`sends_of` gave
        ``sends``: forgets the export (the caller then destroys or reuses the node) if no one
        holds it and no send of ours carried it since, and returns its server (None if it
        stays). A send since may have handed it out after the kernel counted its holders;
        that holder's release (or that send's failure) asks again."""
        server = self.exports.get(node)
        if holders or self._export_busy.get(node) or server is None or node in self.kept:
            return None
        if self._export_sends.get(node, 0) != sends:
            return None
        self._forget_export(node)
        if node in self._export_for:
            self.unreserve(self._export_for.pop(node), 1)
        return server

    # -- imports and local clients ------------------------------------------------------------

    def client_class(self, interface: Interface) -> type[Client]:
        """The class of clients for ``interface`` (client.ClientClasses)."""
        return self._clients.client_class(interface)

    def import_(self, handle: int, references: int, interface: Interface | None) -> Client:
        client = self.imports.get(handle)
        if client is None:
            cls = self.generic if interface is None else self.client_class(interface)
            client = cls(self.vat, handle)
            self.imports[handle] = client
            weakref.finalize(client, self._client_gone, handle)
        elif interface is not None and client.interface.schema is None:
            client.__class__ = self.client_class(interface)  # learnt from the field's type
        held = self._import_refs.get(handle, 0) + references
        if held > _REFERENCES_KEPT:
            # A client that lives on while calls keep passing its handle (a caller's reply
            # node, say) would pile up references: one is enough while it lives.
            self.release_later(handle, held - 1)
            held = 1
        self._import_refs[handle] = held
        return client

    def local(self, server: Server) -> Client:
        return self._clients.local_client(self.vat, server, self._locals)

    def drop(self, client: Client) -> None:
        if self.imports.get(client.handle) is client:
            del self.imports[client.handle]
            self._client_gone(client.handle)

    def _client_gone(self, handle: int) -> None:
        references = self._import_refs.pop(handle, 0)
        if references:
            self.release_later(handle, references)
        self._let_reply_go(handle)

    def _let_reply_go(self, target: int) -> None:
        """The reply node for calls to ``target`` goes with it (unless a question to it is
        still open: then it stays, among the least recently used that make way later)."""
        node = self._replies.get(target)
        if node is None or node in self._open_replies:
            return
        del self._replies[target]
        self.reply_nodes.discard(node)
        self._spare_replies.append(node)
        self._on_release()

    def take_spare_replies(self) -> list[int]:
        """Reply nodes no longer needed: to destroy."""
        spare, self._spare_replies = self._spare_replies, []
        return spare

    def release_later(self, handle: int, count: int) -> None:
        self._releases[handle] = self._releases.get(handle, 0) + count
        self._on_release()

    def take_releases(self) -> dict[int, int]:
        """Handle -> references to release now (batched: one command per handle)."""
        pending, self._releases = self._releases, {}
        return pending

    def typed(self, value: object, field: FieldLayout) -> object:
        """Gives a client read from a field that field's interface (ClientClasses.typed)."""
        return self._clients.typed(value, field)

    def loopback(self, caps: list[object]) -> list[object]:
        """A local message's capability values as a receiver would see them."""
        return [None if v is REPLY else self.local(v) if isinstance(v, Server) else v for v in caps]

    # -- questions ----------------------------------------------------------------------------

    def reply_for(self, target: int) -> int | None:
        """The reply node calls to ``target`` name; None if it needs one (:meth:`add_reply`)."""
        node = self._replies.get(target)
        if node is not None:
            self._replies.move_to_end(target)
        return node

    def add_reply(self, target: int, node: int) -> list[int]:
        """Records the reply node made for ``target``; returns reply nodes to destroy (the
        least recently used beyond ``_REPLY_NODES_KEPT``, with no question open)."""
        self._replies[target] = node
        self.reply_nodes.add(node)
        spare: list[int] = []
        if len(self._replies) > _REPLY_NODES_KEPT:
            open_replies = self._open_replies
            for old_target, old_node in list(self._replies.items())[: len(self._replies) - _REPLY_NODES_KEPT]:
                if old_node not in open_replies:
                    del self._replies[old_target]
                    self.reply_nodes.discard(old_node)
                    spare.append(old_node)
        return spare

    def ask(self, target: int, method: Method, pipelined: bool = False) -> int:
        # Unguessable: every callee holds this vat's reply handle, and with it could forge a
        # Return, a Finish or a pipelined call for a question this vat put to someone else,
        # if it could name that question. 61 bits: a question id is also the kernel tag of
        # the call's send.
        question_id = self._unguessable()
        while question_id in self.questions or question_id == 0:
            question_id = self._unguessable()
        reply = self._replies.get(target, self.reply_node)
        self.questions[question_id] = _Question(target, method, reply, pipelined)
        self._asked.setdefault(target, set()).add(question_id)
        self._open_replies[reply] = self._open_replies.get(reply, 0) + 1
        return question_id

    def _unguessable(self) -> int:
        """61 bits from the operating system's CSPRNG, drawn 4 KiB at a time: one getrandom
        call per 512 questions, not one per question (it showed in every call's profile)."""
        if len(self._entropy) < 8:
            self._entropy = memoryview(os.urandom(4096))
        value = int.from_bytes(self._entropy[:8], "little") & _QUESTION_ID_MASK
        self._entropy = self._entropy[8:]
        return value

    def oneway_id(self) -> int:
        question_id = self._next_question
        self._next_question += 1
        return question_id

    def forget(self, question_id: int) -> bool:
        """The caller stopped waiting; True if the question was still open (send Finish)."""
        return self._close(question_id) is not None

    def _close(self, question_id: int) -> _Question | None:
        """Forgets an open question (None if it is not one)."""
        question = self.questions.pop(question_id, None)
        if question is not None:
            asked = self._asked[question.target]
            asked.discard(question_id)
            if not asked:
                del self._asked[question.target]
            _lower(self._open_replies, question.reply, 1)
        return question

    # -- what arrives -------------------------------------------------------------------------

    def receive(self, message: Message) -> list[Event]:
        """Everything a message from the peer means."""
        if message.kind is MessageKind.DATA:
            return self._data(message)
        if message.kind is MessageKind.NODE_DESTROYED:
            if message.draining:
                # Its owner shut down gracefully: new calls to it fail, but the calls and
                # answers already queued on either side are still read and answered. The
                # owner's going says the rest (a second NODE_DESTROYED, not draining).
                self.broken.add(message.destination.id)
                return []
            return self._node_destroyed(message.destination.id)
        if message.kind is MessageKind.NODE_RELEASED and message.destination.id in self.exports:
            return [MayRetire(message.destination.id)]
        if message.kind is MessageKind.SEND_FAILED and message.tag is not None:
            return self._call_refused(message)
        return []

    def _call_refused(self, message: Message) -> list[Event]:
        """The kernel refused the call of question ``message.tag`` (calls are one-way sends
        tagged with their question)."""
        question = self._close(message.tag or 0)
        if question is None or message.error is None:
            return []
        if isinstance(message.error, bus.NodeDestroyed):
            self.broken.add(question.target)
        return [Returned(message.tag or 0, error=from_kernel(message.error))]

    def _incoming_caps(self, message: Message) -> list[object]:
        values: list[object] = []
        for handle in message.handles:
            if not handle.is_valid:
                values.append(None)
            elif handle.id in self.exports:
                values.append(self.local(self.exports[handle.id]))
                self.release_later(handle.id, 1)  # receiving our own node added a reference
            elif handle.id in self.reply_nodes:
                values.append(None)
                self.release_later(handle.id, 1)
            else:
                values.append(self.import_(handle.id, 1, None))
        return values

    def _data(self, message: Message) -> list[Event]:
        destination = message.destination.id
        caps = self._incoming_caps(message)
        # The message's fds become objects that own them: unclaimed, they close when the
        # message's views are gone.
        payload = message.payload_view
        partial = message.whole_size is not None  # only its start is here (Peer.max_mapped_bytes)
        attached: list[memoryview] = []
        refusal = None
        if message.fds and not partial:
            try:
                attached = take_attached(
                    payload, message.fds, self.max_message_bytes, self.max_mapped_bytes()
                )
            except Exception as error:  # noqa: BLE001 - hostile or broken input, never fatal
                refusal = error
        fds = [FileDescriptor(fd) for fd in message.fds]
        message.fds.clear()
        if refusal is not None:
            if destination in self.reply_nodes:
                return self._malformed_return(destination, payload, refusal)
            if isinstance(refusal, NotMapped):
                return self._refuse(payload, caps, str(refusal), Overloaded)
            return self._refuse(payload, caps, f"malformed message: {refusal}", Failed)
        reply = destination in self.reply_nodes
        if MAPPING_HOLDS_FD and reply and (isinstance(payload.obj, mmap.mmap) or attached):
            # A return in a mapped memfd: results a caller keeps would hold its mapping and
            # an fd of this process, as many as a callee chooses to answer large. Copied.
            payload = memoryview(bytes(payload))
            attached = [memoryview(bytes(view)) for view in attached]
        size = len(payload) if message.whole_size is None else message.whole_size
        if attached:
            size += sum(view.nbytes for view in attached)
        limit = self.max_message_bytes
        if size > limit or partial:
            kind: type[RpcError] = Failed
            detail = f"a message of {size} bytes, over this vat's limit of {limit}"
            reason = (
                f"a message of {size} bytes is over the receiving vat's limit of {limit} (max_message_bytes)"
            )
            if size <= limit:  # yet not read whole (Peer: why)
                detail = reason = f"a message of {size} bytes was not read here: {message.unread}"
                kind = Overloaded
            if destination in self.reply_nodes:
                return self._malformed_return(destination, payload, ValueError(detail))
            return self._refuse(payload, caps, reason, kind)
        try:
            received = decode(payload, caps, self.typed, fds, attached)
        except Exception as error:  # noqa: BLE001 - hostile or broken input, never fatal
            if destination in self.reply_nodes:
                return self._malformed_return(destination, payload, error)
            return self._refuse(payload, caps, f"malformed message: {error}", Failed)
        try:
            return self._dispatch(destination, received, payload, caps, fds, caller_of(message), attached)
        except Exception as error:  # noqa: BLE001 - a pointer the decode did not look at yet
            return self._refuse(payload, caps, f"malformed message: {error}", Failed)

    def _malformed_return(self, destination: int, payload: memoryview, error: Exception) -> list[Event]:
        """A return we cannot read: its question (if that much can be read, and it is one
        of ours, asked with this reply node) fails with why, rather than waiting for an
        answer that came."""
        question_id = return_identity(payload)
        question = None if question_id is None else self.questions.get(question_id)
        if question_id is None or question is None or question.reply != destination:
            return []
        self._close(question_id)
        return [Returned(question_id, error=Failed(f"malformed return: {error}"))]

    def _dispatch(
        self,
        destination: int,
        received: ReceivedCall | ReceivedReturn | ReceivedFinish | None,
        payload: memoryview,
        caps: list[object],
        fds: list[FileDescriptor],
        caller: Caller,
        attached: list[memoryview],
    ) -> list[Event]:
        if isinstance(received, ReceivedReturn):
            return self._returned(received, destination) if destination in self.reply_nodes else []
        if isinstance(received, ReceivedCall):
            server = self.exports.get(destination)
            if server is None:
                return self._refuse(payload, caps, "no object behind this node", Disconnected)
            reply = received.reply
            brought = self._brought(caps, reply if isinstance(reply, Client) else None)
            # A mapped payload holds an fd of this process too (before Python 3.13), as does
            # each mapped attached segment.
            mapped = int(MAPPING_HOLDS_FD and isinstance(payload.obj, mmap.mmap))
            size = len(payload)
            if attached:
                mapped += held_fds(attached)
                size += sum(view.nbytes for view in attached)
            events = self._call(server, received, caller, size, len(fds) + mapped, brought)
            for event in events:
                if isinstance(event, CallArrived) and event.call is received:
                    if event.method is None or not event.method.params_layout.may_hold_fds:
                        # No field of its params can hold one: closed now, not held (against
                        # this process's RLIMIT_NOFILE) for as long as the call waits.
                        for fd in fds:
                            fd.close()
                        event.fds = mapped
            return events
        if isinstance(received, ReceivedFinish) and destination in self.exports:
            reply = received.reply
            key = (reply.handle, received.question_id) if isinstance(reply, Client) else None
            answer = None if key is None else self.answers.get(key)
            if key is None or answer is None:
                return []
            if answer.done:
                self._forget_answer(key)  # kept results no one will pipeline on any more
                return []
            if key in self._waiting_in:  # a pipelined call still waiting for its base: gone
                return self._drop(key, Failed("the call they were pipelined on was canceled"))
            if answer.keep:  # its return will not be kept: the caller's count goes back now
                self._kept.take(answer.caller, 1)
                answer.keep = False
            return [FinishArrived(key)]
        return []

    @staticmethod
    def _brought(caps: list[object], reply: Client | None) -> tuple[int, ...]:
        """The handles of other peers' nodes in a call's capabilities, but its reply's."""
        return tuple(c.handle for c in caps if isinstance(c, Client) and c.server is None and c is not reply)

    def _call(
        self,
        server: Server,
        call: ReceivedCall,
        caller: Caller,
        size: int,
        fds: int,
        handles: tuple[int, ...],
    ) -> list[Event]:
        reply = call.reply
        reply_client = reply if isinstance(reply, Client) and reply.server is None else None
        question_id = call.question_id
        events: list[Event] = []
        if reply_client is not None:
            key = (reply_client.handle, question_id)
            if key in self.answers:  # a reused id replaces the call (FinishArrived: the vat's)
                events = self._drop(key, Failed("the call they were pipelined on was replaced"))
                events.append(FinishArrived(key))
            keep = call.keep_results and self._kept.fits(caller, 1, self.max_kept_per_caller)
            if keep:
                self._kept.add(caller, 1)
            self.answers[key] = _Answer(keep, caller, reply_client)
            self._answers_of.setdefault(reply_client.handle, set()).add((reply_client.handle, question_id))
            self._recent_replies[reply_client.handle] = reply_client
            self._recent_replies.move_to_end(reply_client.handle)
            if len(self._recent_replies) > _RECENT_REPLIES:
                self._recent_replies.popitem(last=False)
        if call.promised is None:
            method = server.interface.by_key.get((call.interface_id, call.method_id))
            arrived = CallArrived(server, call, method, reply_client, question_id, caller, handles, size, fds)
            if reply_client is not None:
                arrived.answer = self.answers[(reply_client.handle, question_id)]
            events.append(arrived)
            return events
        # Pipelined: on a capability in the results of an earlier call of this caller.
        if reply_client is None:
            return events  # a one-way pipelined call names no answer of ours
        promised_question, transform = call.promised
        waiting = _Waiting(call, reply_client, question_id, transform, caller, size, fds, handles)
        answer = self.answers.get((reply_client.handle, promised_question))
        if answer is None or answer is self.answers.get(waiting.key):  # (on itself: never done)
            self._forget_answer(waiting.key)
            error = Failed(f"no answer {promised_question} to pipeline on (finished, or never asked)")
            events.append(Send(reply_client, encode_exception(question_id, error)))
            return events
        if not answer.done:
            busy = self._start_waiting(waiting)
            if busy is not None:
                self._forget_answer(waiting.key)
                events.append(Send(reply_client, encode_exception(question_id, busy)))
                return events
            answer.waiting[waiting.key] = waiting
            self._waiting_in[waiting.key] = answer
            return events
        events.extend(self._settle(answer, [waiting]))
        return events

    def _settle(self, answer: _Answer, waiting: list[_Waiting]) -> list[Event]:
        """Runs the pipelined calls that waited for ``answer`` (now known), and, as far as
        those are answered at once (failed or redirected), the calls that waited for them in
        turn: a worklist, not recursion (a caller's chain may be thousands of calls long)."""
        events: list[Event] = []
        work = collections.deque([(answer, waiting)])
        while work:
            answer, waiting = work.popleft()
            for w in waiting:
                events.extend(self._pipelined(answer, w, work))
        return events

    def _pipelined(
        self, answer: _Answer, w: _Waiting, work: collections.deque[tuple[_Answer, list[_Waiting]]]
    ) -> list[Event]:
        """A pipelined call, now that the answer it names is known. A pipelined call on a
        capability that is not this vat's own object is redirected: the caller holds that
        capability (from our return of the call it was pipelined on, which may reach it
        after the redirect: it waits for it) and calls it itself, as itself."""
        if answer.redirected:
            return self._answered_at_once(w, encode_redirect(w.question_id), work)
        failure = answer.failure  # the call it builds on failed: so does this
        target: object = None
        transform = w.transform
        if failure is None and answer.returned is not None:  # (None: it holds no capability)
            try:
                target = results_capability(answer.returned, transform)
            except Exception as error:  # noqa: BLE001 - what the caller named: fails its call only
                failure = Failed(f"no capability at pointer fields {transform} of the results: {error}")
        if failure is None and target is None:
            failure = Failed(f"the pipelined capability (pointer fields {transform}) is null")
        if failure is not None:
            return self._answered_at_once(w, encode_exception(w.question_id, failure), work)
        if isinstance(target, Server):
            target = self.local(target)
        assert isinstance(target, Client)
        if target.server is not None:
            call = w.call
            method = target.server.interface.by_key.get((call.interface_id, call.method_id))
            arrived = CallArrived(
                target.server, call, method, w.reply, w.question_id, w.caller, w.handles, w.size, w.fds
            )
            arrived.answer = self.answers.get(w.key)
            return [arrived]
        return self._answered_at_once(w, encode_redirect(w.question_id), work)

    def _answered_at_once(
        self, w: _Waiting, encoded: Encoded, work: collections.deque[tuple[_Answer, list[_Waiting]]]
    ) -> list[Event]:
        """Sends a pipelined call's answer (a failure or a redirect) and settles its own
        answer with it: the calls pipelined on it go on the worklist."""
        own = self.answers.get(w.key)
        if own is not None:
            waiting = self._stop_waiting(own)
            own.done = True
            own.redirected = encoded.failure is None
            if encoded.failure is not None:
                own.failure = type(encoded.failure)(encoded.failure.reason[:_KEPT_REASON])
            if not own.keep:
                self._forget_answer(w.key)
            if waiting:
                work.append((own, waiting))
        return [Send(w.reply, encoded)]

    def _drop(self, key: tuple[int, int], failure: RpcError) -> list[Event]:
        """Forgets an answer before its call is done (its caller gave up on it, or reused
        its key); the calls pipelined on it fail with ``failure`` (and so on down)."""
        answer = self.answers.get(key)
        if answer is None:
            return []
        waiting = self._stop_waiting(answer)
        self._forget_answer(key)
        answer.done, answer.failure = True, failure
        return self._settle(answer, waiting)

    def completed(self, key: tuple[int, int], returned: Encoded, answer: object) -> list[Event]:
        """A served call (``answer``: CallArrived.answer) finished with ``returned`` (its
        Return envelope): keep what calls pipelined on it need if the caller may make them
        (within its bounds), and run the calls that were waiting for it."""
        if answer is None or self.answers.get(key) is not answer:
            return []  # (forgotten, or its key reused by a later call)
        assert isinstance(answer, _Answer)
        waiting = self._stop_waiting(answer)
        answer.done = True
        if returned.caps:  # results (an exception carries no capability)
            answer.returned = returned
        elif returned.failure is not None and (answer.keep or waiting):
            # As encoded, never read back from the Return: results deeper than a caller's
            # params could be would fail decode's checks, and that in the serving task.
            failure = returned.failure
            answer.failure = type(failure)(failure.reason[:_KEPT_REASON])
        if answer.keep:
            size = len(returned.payload) if answer.returned is not None else 0
            fds = _held_fds(returned.payload) if answer.returned is not None else 0
            if self._kept_bytes.fits(answer.caller, size, self.max_kept_bytes_per_caller) and (
                not fds or self._kept_fds.fits(answer.caller, fds, self.max_waiting_fds)
            ):
                answer.kept_bytes, answer.kept_fds = size, fds
                self._kept_bytes.add(answer.caller, size)
                self._kept_fds.add(answer.caller, fds)
            else:
                self._forget_answer(key)  # past the caller's bytes: not kept
        else:
            self._forget_answer(key)
        return self._settle(answer, waiting)

    def _start_waiting(self, w: _Waiting) -> Overloaded | None:
        """Takes a unit of its caller's pipelining budget, and its bytes and file
        descriptors, for a call that waits for an answer (until :meth:`_stop_waiting`); the
        error to answer it with if none is left. Per caller, and per uid: one that never
        lets its calls end holds its own budget only. (A caller's first waiting call always
        fits its own bytes and fds, not its uid's.)"""
        caller = w.caller
        over = self._waiting.over(caller, self.max_waiting)
        if over is not None:
            return Overloaded(f"pipelined calls are already waiting here: {over}")
        own = bool(self._waiting[caller])
        over = self._waiting_bytes.over(caller, self.max_waiting_bytes, w.size, own=own)
        if over is not None:
            return Overloaded(f"pipelined calls waiting here already hold bytes: {over}")
        over = self._waiting_fds.over(caller, self.max_waiting_fds, w.fds, own=own)
        if over is not None:
            return Overloaded(f"pipelined calls waiting here already hold file descriptors: {over}")
        capabilities = len(w.handles)
        over = self._waiting_capabilities.over(caller, self.max_waiting_capabilities, capabilities, own=own)
        if over is not None:
            return Overloaded(f"pipelined calls waiting here already hold capabilities: {over}")
        self._waiting.add(caller, 1)
        self._waiting_bytes.add(caller, w.size)
        self._waiting_fds.add(caller, w.fds)
        self._waiting_capabilities.add(caller, capabilities)
        self.waiting_calls += 1
        return None

    def _unwait(self, w: _Waiting) -> None:
        self._waiting.take(w.caller, 1)
        self._waiting_bytes.take(w.caller, w.size)
        self._waiting_fds.take(w.caller, w.fds)
        self._waiting_capabilities.take(w.caller, len(w.handles))
        self.waiting_calls -= 1

    def _stop_waiting(self, answer: _Answer) -> list[_Waiting]:
        """The calls that waited for ``answer``, no longer waiting (their budget given back)."""
        waiting, answer.waiting = list(answer.waiting.values()), {}
        for w in waiting:
            self._unwait(w)
            del self._waiting_in[w.key]
        return waiting

    def cancelled(self, key: tuple[int, int], answer: object) -> None:
        if answer is not None and self.answers.get(key) is answer:
            self._forget_answer(key)

    def _forget_answer(self, key: tuple[int, int]) -> None:
        """Drops an answer, with the calls that waited on it and its count of kept answers."""
        answer = self.answers.pop(key, None)
        if answer is None:
            return
        keys = self._answers_of.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._answers_of[key[0]]
        self._stop_waiting(answer)
        base = self._waiting_in.pop(key, None)  # (a pipelined call still waiting for its base)
        if base is not None:
            self._unwait(base.waiting.pop(key))
        if answer.keep:
            self._kept.take(answer.caller, 1)
            self._kept_bytes.take(answer.caller, answer.kept_bytes)
            self._kept_fds.take(answer.caller, answer.kept_fds)

    def _refuse(
        self,
        payload: memoryview,
        caps: list[object],
        reason: str,
        kind: type[RpcError],
    ) -> list[Event]:
        """Answers a call that cannot be served, if the caller can be made out at all."""
        identity = call_identity(payload)
        if identity is None:
            return []  # not even the call's header is readable: no one to tell
        question_id, reply_index = identity
        if reply_index is None or reply_index >= len(caps):
            return []
        reply = caps[reply_index]
        if not isinstance(reply, Client) or reply.server is not None:
            return []
        return [Send(reply, encode_exception(question_id, kind(reason)))]

    def _returned(self, returned: ReceivedReturn, destination: int) -> list[Event]:
        question_id = returned.question_id
        question = self.questions.get(question_id)
        if question is None:
            return []  # a caller that stopped waiting (it sent Finish)
        if question.reply != destination:
            return []  # not from the callee asked: it came to another callee's reply node
        self._close(question_id)
        if returned.redirect:
            if question.pipelined:
                return [Returned(question_id, redirect=True)]
            not_pipelined = Failed("the callee redirected a call that was not pipelined")
            return [Returned(question_id, error=not_pipelined)]
        if returned.body is None:
            return [Returned(question_id, error=returned.error)]
        try:
            results = returned.body.struct(question.method.results)
        except Exception as error:  # noqa: BLE001 - the callee sent something malformed
            return [Returned(question_id, error=Failed(f"malformed results: {error}"))]
        return [Returned(question_id, results=results)]

    def _node_destroyed(self, handle: int) -> list[Event]:
        self.broken.add(handle)
        if handle in self.reply_nodes:  # one of ours: destroyed by us, nothing to do
            return []
        self._recent_replies.pop(handle, None)
        events: list[Event] = []
        for key in list(self._answers_of.get(handle, ())):
            # Its caller is gone: no one to answer or pipeline on. Its calls that are still
            # running or waiting to start are canceled, as a Finish would: else they would
            # hold their handler slots for as long as they take, for no one.
            self._forget_answer(key)
            events.append(FinishArrived(key))
        for question_id in list(self._asked.get(handle, ())):
            self._close(question_id)
            gone = Disconnected("the object's node was destroyed (or its peer went away)")
            events.append(Returned(question_id, error=gone))
        if handle in self.exports:
            self._forget_export(handle)
        self._let_reply_go(handle)  # (after the questions to it were failed above)
        return events
