"""One ``rpc.capnp`` connection's bookkeeping, without IO (sans-IO, as engine.py is for the bus).

The engine keeps the four tables of rpc.capnp and makes every decision about them; it never
touches a socket, a task or a clock. It is fed each received message
(:meth:`StreamEngine.receive` takes its segments) and returns :data:`Event` records: calls
to serve, returns of questions, finishes, disembargoes to echo, the end of the connection,
and :class:`Send` for what to write in answer. What it must write at other times (a Finish,
a Release when a client is collected) goes to the ``post`` function it was given. The IO
driver (streamvat.py: trio over a byte stream) runs the calls and the waits; another
driver can run the same engine.

The tables, as this side keeps them:
- questions: our calls (and bootstraps) awaiting their Return; an id is free again once
  the Return came and our Finish went (or the callee said none is needed);
- answers: the peer's calls, while they run and (for pipelining) until its Finish;
- exports: our objects the peer holds, with how many times we sent each (its Releases
  count them down; at zero the object is dropped);
- imports: the peer's objects we hold, one client each, released (by the count we were
  sent them) when the client goes.

What this side never does: export promises (its results are final when sent, so it never
sends Resolve, and the peer never has to embargo anything of ours), three-party handoff
(level 1). Capabilities that belong to another vat (a bus client, another connection) are
exported as forwarders (server.py), dropped when the peer releases them.

Bounds: at most MAX_ANSWERS of the peer's questions unfinished, MAX_CAPABILITIES
capabilities in one message; past either the connection is aborted (ProtocolError).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import capnp

from . import capwire, twopartyflat
from .capwire import Segment
from .client import Client, ClientClasses
from .engine import Returned
from .errors import Failed, RpcError, Unimplemented
from .interface import Interface, Method
from .server import Forwarder, Forwarders, Server
from .structs import StructReader
from .twoparty import (
    CALL_CONTENT,
    NONE,
    RETURN_CONTENT,
    Descriptor,
    content,
    decode,
    encode_bootstrap_return,
    encode_call,
    encode_exception,
    encode_release,
    encode_results,
    encode_results_elsewhere,
    encode_unimplemented,
    frame,
    read_descriptor,
    read_exception,
    read_transform,
)

log = logging.getLogger("capbus.rpc.streamengine")

MAX_ANSWERS = 8192
"""The peer's questions this side keeps at once (running, or returned and not finished):
past that the connection is aborted (each answer holds its results for pipelining)."""
MAX_CAPABILITIES = 4096
"""Capabilities one message may carry (its capTable): past that it is refused whole."""


class ProtocolError(Exception):
    """The peer broke the protocol: the connection is aborted with this reason."""


@dataclass(eq=False)
class Question:
    done: Any
    """What the driver's waiters wait on (streamvat: a trio Event and the Returned list)."""
    method: Method | None
    """None for a Bootstrap."""
    params: list[Descriptor] = field(default_factory=list)
    returned: bool = False
    finished: bool = False
    finish_sent: bool = False


@dataclass(eq=False)
class Answer:
    driver: Any = None
    """What the IO driver keeps of it (streamvat: its cancel scope, done event, the calls
    pipelined on it under way)."""
    lookup: Callable[[tuple[int, ...]], object] | None = None
    """Once returned with results: the capability at a transform of them (pipelining)."""
    error: RpcError | None = None
    results: list[Descriptor] = field(default_factory=list)
    returned: bool = False
    finished: bool = False
    kept_here: bool = False
    """The caller asked for the results to stay here (sendResultsTo.yourself): its Return
    says resultsSentElsewhere, and calls pipelined on it get them."""
    no_pipelining: bool = False
    """The caller promised no call pipelined on it (Call.noPromisePipelining): flat results
    go with noFinishNeeded, the answer forgotten as they go."""


@dataclass(eq=False)
class Export:
    server: Server
    references: int = 0


class PromisedServer(Server):
    """A capability in the results of one of the peer's calls that has not returned yet (a
    CapDescriptor receiverAnswer naming an answer of this side): the driver's subclass
    makes calls to it wait for those results."""

    def __init__(self, interface: Interface, answer: Answer, transform: tuple[int, ...]) -> None:
        self.interface = interface
        self.answer, self.transform = answer, transform


# -- what receive() returns -----------------------------------------------------------------


@dataclass(slots=True)
class Send:
    """A framed message to write now, in this order among the events; ``answered``: an
    answer it returns (what waits on that answer may go on)."""

    framed: bytes
    answered: Answer | None = None


@dataclass(slots=True)
class CallArrived:
    """One of the peer's calls to serve: ``where`` is the capability called (a client of
    this side's object, or of a capability the peer passed) or, for a pipelined call, the
    answer and transform it names; ``params`` reads the params as a struct of the schema
    given (a malformed payload raises then)."""

    question_id: int
    answer: Answer
    where: Client | tuple[Answer, tuple[int, ...]]
    key: tuple[int, int]
    params: Callable[[Any], StructReader]


@dataclass(slots=True)
class ReturnArrived:
    """The Return of one of our questions (the engine has done its bookkeeping)."""

    question: Question
    returned: Returned


@dataclass(slots=True)
class FinishArrived:
    """The peer is done with an answer; one still running is to be cancelled."""

    answer: Answer


@dataclass(slots=True)
class DisembargoAsked:
    """A senderLoopback Disembargo: to echo once the promise (an answer of this side, at a
    transform) has resolved and the calls pipelined on it have gone on."""

    answer: Answer
    transform: tuple[int, ...]
    embargo_id: int


@dataclass(slots=True)
class Aborted:
    """The peer aborted the connection."""

    reason: str


Event: TypeAlias = Send | CallArrived | ReturnArrived | FinishArrived | DisembargoAsked | Aborted


def _no_capabilities(transform: tuple[int, ...]) -> object:
    """What a pipelined call finds in flat results (twopartyflat.py): no capability."""
    return None


class StreamEngine(ClientClasses):
    """The tables of one connection (module docstring). ``vat`` is what clients made here
    call through (the driver); ``post(framed, sent)`` writes a message later, calling
    ``sent`` once it is out; ``promised(answer, transform)`` makes the driver's server
    for a capability in an answer not yet returned; ``answer_state()`` what the driver
    keeps of each new answer (:attr:`Answer.driver`)."""

    def __init__(
        self,
        vat: Any,
        bootstrap: Server | Client | None,
        *,
        max_message_bytes: int,
        post: Callable[[bytes, Callable[[], None] | None], None],
        promised: Callable[[Answer, tuple[int, ...]], PromisedServer],
        answer_state: Callable[[], Any] = lambda: None,
    ) -> None:
        super().__init__()
        self.vat, self.bootstrap = vat, bootstrap
        self.max_message_bytes = max_message_bytes
        self._post, self._promised, self._answer_state = post, promised, answer_state
        self.closed = False
        """Set by the driver when the connection ends: nothing is posted any more."""
        self.questions: dict[int, Question] = {}
        self._free_questions: list[int] = []
        self.answers: dict[int, Answer] = {}
        self._no_finish_needed: dict[int, None] = {}
        self._forgot_some = False
        """Answers returned with noFinishNeeded (:meth:`finish_ignored`)."""
        self.exports: dict[int, Export] = {}
        self._export_of: dict[int, int] = {}
        self._free_exports: list[int] = []
        self.imports: weakref.WeakValueDictionary[int, Client] = weakref.WeakValueDictionary()
        self._import_references: dict[int, int] = {}
        self._locals: weakref.WeakValueDictionary[int, Client] = weakref.WeakValueDictionary()
        self._forwarders = Forwarders()
        """The Forwarder exported for each client of another vat."""
        self.generic = Interface(0, "Capability", None)

    def words(self) -> int:
        """The traversal budget of reading one received message."""
        return self.max_message_bytes // 8 * 4

    def local(self, server: Server) -> Client:
        return self.local_client(self.vat, server, self._locals)

    def as_client(self, value: object) -> object:
        return self.local(value) if isinstance(value, Server) else value

    # -- questions -------------------------------------------------------------------------------

    def question(self, method: Method | None, done: Any) -> tuple[int, Question]:
        """A new question (``done``: what the driver waits on for its Return)."""
        question_id = self._free_questions.pop() if self._free_questions else len(self.questions)
        while question_id in self.questions:
            question_id += 1
        question = Question(done, method)
        self.questions[question_id] = question
        return question_id, question

    def call(
        self,
        client: Client,
        target: Descriptor,
        method: Method,
        params: Mapping[str, Any],
        done: Any,
        *,
        no_pipelining: bool,
    ) -> tuple[int, Question, bytes]:
        """A new question calling ``method`` on ``target`` (of ``client``), and its Call,
        framed. Raises what encoding raises (the question and any export references
        taken for its capabilities are given back then), or Failed past the size limit."""
        question_id, question = self.question(method, done)
        described: list[Descriptor] = []
        try:
            framed = None
            if target.kind == "receiverHosted":
                framed = twopartyflat.encode_call(
                    question_id, target.id, method, params, no_pipelining=no_pipelining
                )
            if framed is None:
                segments, question.params = encode_call(
                    question_id, target, method, params, lambda value: self._described(value, described)
                )
                framed = frame(segments)
            self._check_size("call", framed)
        except BaseException:
            self.free_question(question_id)
            self.released(described)  # (never sent: the peer holds none of them)
            raise
        return question_id, question, framed

    def _check_size(self, what: str, framed: bytes) -> None:
        """Refuses a message the peer would refuse (and abort the connection for)."""
        size = len(framed) - 8  # (at least one segment's table entry)
        if size > self.max_message_bytes:
            raise Failed(
                f"the {what} is {size} bytes: over this connection's limit of {self.max_message_bytes}"
            )

    def finish(self, question_id: int, question: Question) -> None:
        """Sends Finish for a question (once): its id is free again once the Finish is out
        and the Return is in, so that the peer never sees the id reused before."""
        if question.finished:
            return
        question.finished = True

        def sent() -> None:
            question.finish_sent = True
            if question.returned:
                self.free_question(question_id)

        self._post(twopartyflat.encode_finish(question_id), sent)

    def free_question(self, question_id: int) -> None:
        if self.questions.pop(question_id, None) is not None:
            self._free_questions.append(question_id)

    def target(self, client: Client) -> Descriptor | None:
        """How a call to ``client`` names its target here (None: a pipelined client whose
        question has returned, or that is not this connection's)."""
        if client.pipeline is None:
            if client.vat is not self.vat:
                raise Failed(f"{client!r} belongs to another vat")
            return Descriptor("receiverHosted", client.handle)
        promise, transform = client.pipeline
        question = self.questions.get(promise.question_id)
        if (
            promise.vat is self.vat
            and question is not None
            and question.done is promise._done  # (not a later question given its id)
            and not question.returned
        ):
            return Descriptor("receiverAnswer", promise.question_id, transform)
        return None

    def fail_questions(self, error: RpcError) -> list[Question]:
        """Every question not returned, marked returned (the connection ended): the driver
        wakes their waiters with ``error``."""
        failed = [q for q in self.questions.values() if not q.returned]
        for question in failed:
            question.returned = True
        return failed

    # -- capabilities out --------------------------------------------------------------------

    def _described(self, value: object, made: list[Descriptor]) -> Descriptor:
        """:meth:`describe`, noting each descriptor in ``made`` (to take back the export
        references of a message that is not sent after all)."""
        descriptor = self.describe(value)
        made.append(descriptor)
        return descriptor

    def describe(self, value: object) -> Descriptor:
        """How capability ``value`` (a server, or a client) travels to the peer."""
        if isinstance(value, Client):
            if isinstance(value.server, Forwarder) and value.server.target.vat is self.vat:
                value = value.server.target  # (one of ours, back from a trip over the bus)
            if value.server is not None:
                return self._export(value.server)
            if value.vat is self.vat:
                target = self.target(value)
                if target is not None:
                    return target
                return self.describe(_answered(value))
            return self._export(self._forwarders.of(value))
        if isinstance(value, Server):
            return self._export(value)
        raise TypeError(f"not a capability: {value!r}")

    def _export(self, server: Server) -> Descriptor:
        export_id = self._export_of.get(id(server))
        if export_id is None:
            export_id = self._free_exports.pop() if self._free_exports else len(self.exports)
            while export_id in self.exports:
                export_id += 1
            self.exports[export_id] = Export(server)
            self._export_of[id(server)] = export_id
        self.exports[export_id].references += 1
        return Descriptor("senderHosted", export_id)

    def release_export(self, export_id: int, count: int) -> None:
        export = self.exports.get(export_id)
        if export is None or count > export.references:
            held = 0 if export is None else export.references
            raise ProtocolError(f"Release of export {export_id} by {count}: it holds {held}")
        export.references -= count
        if not export.references:
            del self.exports[export_id]
            self._export_of.pop(id(export.server), None)
            self._free_exports.append(export_id)

    def released(self, descriptors: Sequence[Descriptor]) -> None:
        for descriptor in descriptors:
            if descriptor.kind == "senderHosted":
                self.release_export(descriptor.id, 1)

    # -- capabilities in ---------------------------------------------------------------------

    def _received(self, reader: Any) -> list[object]:
        """The capability of each entry of a received payload's capTable."""
        table = reader.capTable
        if len(table) > MAX_CAPABILITIES:
            raise ProtocolError(f"a message of {len(table)} capabilities (at most {MAX_CAPABILITIES})")
        return [self._capability(read_descriptor(d)) for d in table]

    def _capability(self, descriptor: Descriptor) -> object:
        if descriptor.kind in ("senderHosted", "senderPromise"):
            return self._import(descriptor.id)
        if descriptor.kind == "receiverHosted":
            export = self.exports.get(descriptor.id)
            if export is None:
                raise ProtocolError(f"a capability of export {descriptor.id}, which is not one")
            return self.local(export.server)
        if descriptor.kind == "receiverAnswer":
            answer = self.answers.get(descriptor.id)
            if answer is None:
                raise ProtocolError(f"a capability in answer {descriptor.id}, which is not one")
            if answer.lookup is None:  # (not returned yet: a promise of it)
                return self.local(self._promised(answer, descriptor.transform))
            return answer.lookup(descriptor.transform)
        return None

    def _import(self, import_id: int) -> Client:
        client = self.imports.get(import_id)
        if client is None:
            client = self.client_class(self.generic)(self.vat, import_id)
            self.imports[import_id] = client
            weakref.finalize(client, self._import_gone, import_id)
        self._import_references[import_id] = self._import_references.get(import_id, 0) + 1
        return client

    def _import_gone(self, import_id: int) -> None:
        if import_id in self.imports:
            return  # (a newer client of the same import)
        references = self._import_references.pop(import_id, 0)
        if references and not self.closed:
            self._post(frame(encode_release(import_id, references)), None)

    def drop(self, client: Client) -> bytes | None:
        """Lets an import go now (its client is dropped): the Release to send, if any."""
        if client.server is not None or client.pipeline is not None:
            return None  # (an object of this side, or a promised one: no import of its own)
        if self.imports.get(client.handle) is not client:
            return None  # (released already)
        del self.imports[client.handle]
        references = self._import_references.pop(client.handle, 0)
        return frame(encode_release(client.handle, references)) if references else None

    # -- answers ---------------------------------------------------------------------------------

    def results(self, question_id: int, answer: Answer, method: Method, results: Mapping[str, Any]) -> bytes:
        """The framed Return of a call's results (flat when they are: twopartyflat.py), the
        answer made ready for calls pipelined on them."""
        no_finish_needed = answer.no_pipelining
        flat = twopartyflat.encode_results(question_id, method, results, no_finish_needed=no_finish_needed)
        if flat is not None:
            self._check_size("results", flat)
            answer.lookup = _no_capabilities
            if answer.no_pipelining and not answer.finished:
                answer.finished = True  # (forgotten once sent: no Finish comes)
                self._finish_ignored(question_id)
            return flat
        described: list[Descriptor] = []
        try:
            segments, answer.results, values = encode_results(
                question_id, method, results, lambda value: self._described(value, described)
            )
            framed = frame(segments)
            self._check_size("results", framed)
        except BaseException:
            self.released(described)  # (the results are not sent: an exception is)
            raise
        answer.lookup = self._lookup(segments, method, values)
        return framed

    @staticmethod
    def failed(question_id: int, answer: Answer, error: RpcError) -> bytes:
        """The framed Return of a call that failed with ``error``."""
        answer.error = error
        return frame(encode_exception(question_id, error))

    def settle(self, question_id: int, answer: Answer, encoded: bytes) -> bytes:
        """Marks an answer returned and gives the Return to send (forgotten already if
        finished: the caller may ask with its id again as soon as it has the Return)."""
        answer.returned = True
        if answer.kept_here and answer.error is None:
            encoded = frame(encode_results_elsewhere(question_id))
        if answer.finished:
            self.answers.pop(question_id, None)
        return encoded

    def read_back(self, method: Method, results: Mapping[str, Any]) -> StructReader:
        """Results of a call of an object of this side, read as a caller would read them
        (capabilities as clients)."""
        segments, _, values = encode_results(0, method, results, lambda value: NONE)
        clients = [self.as_client(value) for value in values]
        reader = decode(segments, self.words()).__getattr__("return").results.content
        return content(segments, reader, RETURN_CONTENT, method.results, clients, self.typed)

    def _lookup(
        self, segments: list[Segment], method: Method, values: list[object]
    ) -> Callable[[tuple[int, ...]], object]:
        clients = [self.as_client(v) for v in values]

        def lookup(transform: tuple[int, ...]) -> object:
            reader = decode(segments, self.words()).__getattr__("return").results.content
            results = content(segments, reader, RETURN_CONTENT, method.results, clients, self.typed)
            return results.capability_at(transform)

        return lookup

    def _finish_ignored(self, question_id: int) -> None:
        """Notes an answer returned with noFinishNeeded: a Finish the caller may still send
        for it is ignored (rpc.capnp), until the id is asked again. Bounded as the answers
        are, oldest first; once any was let go, a Finish for a question this side does not
        know is ignored too (it may be one of those: rpc.capnp says ignore it)."""
        self._no_finish_needed.pop(question_id, None)
        if len(self._no_finish_needed) >= MAX_ANSWERS:
            del self._no_finish_needed[next(iter(self._no_finish_needed))]  # (the oldest)
            self._forgot_some = True
        self._no_finish_needed[question_id] = None

    def _new_answer(self, question_id: int) -> Answer:
        if question_id in self.answers:
            raise ProtocolError(f"question {question_id} asked twice")
        self._no_finish_needed.pop(question_id, None)
        if len(self.answers) >= MAX_ANSWERS:
            raise ProtocolError(f"more than {MAX_ANSWERS} questions unfinished (the peer sends no Finish)")
        answer = self.answers[question_id] = Answer(self._answer_state())
        return answer

    # -- receiving -------------------------------------------------------------------------------

    def receive(self, segments: list[Segment]) -> list[Event]:
        """What one received message means (ProtocolError, or what pycapnp raises reading a
        malformed one: the driver aborts the connection)."""
        hot = twopartyflat.read(segments)
        if isinstance(hot, twopartyflat.HotCall):
            return [self._on_hot_call(segments, hot)]
        if isinstance(hot, twopartyflat.HotReturn):
            question = self.questions.get(hot.answer_id)
            if question is not None and question.method is not None:  # (a Bootstrap's: below)
                return [self._on_return(segments, hot)]
        elif isinstance(hot, twopartyflat.HotFinish):
            return self._on_finish(hot.question_id, hot.release_result_caps)
        message = decode(segments, self.words())
        try:
            kind = message.which()
        except capnp.KjException:  # (a kind rpc.capnp has added since: not ours to take)
            return [Send(frame(encode_unimplemented(message)))]
        if kind == "call":
            return [self._on_call(segments, message.call)]
        if kind == "return":
            return [self._on_return(segments, message.__getattr__("return"))]
        if kind == "finish":
            return self._on_finish(int(message.finish.questionId), bool(message.finish.releaseResultCaps))
        if kind == "release":
            self.release_export(int(message.release.id), int(message.release.referenceCount))
            return []
        if kind == "bootstrap":
            return [self._on_bootstrap(int(message.bootstrap.questionId))]
        if kind == "abort":
            return [Aborted(str(message.abort.reason))]
        if kind == "resolve":
            return self._on_resolve(message.resolve)
        if kind == "disembargo":
            return [self._on_disembargo(message.disembargo)]
        if kind == "unimplemented":
            return self._on_unimplemented(message.unimplemented)
        return [Send(frame(encode_unimplemented(message)))]

    def _on_bootstrap(self, question_id: int) -> Send:
        answer = self._new_answer(question_id)
        answer.returned = True
        if self.bootstrap is None:
            answer.error = Failed("nothing is served here")
            return Send(frame(encode_exception(question_id, answer.error)), answer)
        descriptor = self.describe(self.bootstrap)
        answer.results = [descriptor]
        bootstrap = self.as_client(self.bootstrap)
        answer.lookup = lambda transform: bootstrap if not transform else None
        return Send(frame(encode_bootstrap_return(question_id, descriptor)), answer)

    def _on_call(self, segments: list[Segment], call: Any) -> CallArrived:
        question_id = int(call.questionId)
        if question_id in self.answers:
            raise ProtocolError(f"question {question_id} asked twice")
        results_to = call.sendResultsTo.which()
        if results_to not in ("caller", "yourself"):
            raise ProtocolError(f"results sent to {results_to} (three-party handoff is not supported)")
        target = call.target
        where: Client | tuple[Answer, tuple[int, ...]]
        if target.which() == "importedCap":
            where = self._exported(int(target.importedCap))
        else:
            promised = target.promisedAnswer
            base = self.answers.get(int(promised.questionId))
            if base is None:
                raise ProtocolError(f"a call pipelined on question {promised.questionId}, which is not one")
            where = (base, read_transform(promised))
        caps = self._received(call.params)
        payload = call.params

        def params(schema: Any) -> StructReader:
            return content(segments, payload.content, CALL_CONTENT, schema, caps, self.typed)

        answer = self._new_answer(question_id)
        answer.kept_here = results_to == "yourself"
        answer.no_pipelining = bool(call.noPromisePipelining) and not answer.kept_here
        return CallArrived(question_id, answer, where, (int(call.interfaceId), int(call.methodId)), params)

    def _on_hot_call(self, segments: list[Segment], call: twopartyflat.HotCall) -> CallArrived:
        """A Call of the plain shape twopartyflat.py reads: no capabilities, to an export."""
        if call.question_id in self.answers:
            raise ProtocolError(f"question {call.question_id} asked twice")
        where = self._exported(call.import_id)

        def general(schema: Any) -> Callable[[], StructReader]:
            def read() -> StructReader:
                payload = decode(segments, self.words()).call.params
                return content(segments, payload.content, CALL_CONTENT, schema, [], self.typed)

            return read

        def params(schema: Any) -> StructReader:
            return call.params.read(schema, general(schema))

        answer = self._new_answer(call.question_id)
        answer.no_pipelining = call.no_pipelining
        return CallArrived(call.question_id, answer, where, (call.interface_id, call.method_id), params)

    def _exported(self, export_id: int) -> Client:
        export = self.exports.get(export_id)
        if export is None:
            raise ProtocolError(f"a call to export {export_id}, which is not one")
        return self.local(export.server)

    def _on_return(self, segments: list[Segment], returned: Any) -> ReturnArrived:
        """A Return, as pycapnp reads it or (``twopartyflat.HotReturn``) as read plain."""
        hot = returned if isinstance(returned, twopartyflat.HotReturn) else None
        question_id = hot.answer_id if hot is not None else int(returned.answerId)
        question = self.questions.get(question_id)
        if question is None or question.returned:
            raise ProtocolError(f"a Return for question {question_id}, which is not awaiting one")
        question.returned = True
        if hot.release_param_caps if hot is not None else returned.releaseParamCaps:
            self.released(question.params)
        if hot is not None:
            assert question.method is not None  # (a Bootstrap's Return is read by pycapnp)
            schema = question.method.results

            def general() -> StructReader:
                payload = decode(segments, self.words()).__getattr__("return").results
                return content(segments, payload.content, RETURN_CONTENT, schema, [], self.typed)

            answer = Returned(question_id, results=hot.results.read(schema, general))
        else:
            answer = self._returned(segments, question_id, question, returned)
        no_finish_needed = hot.no_finish_needed if hot is not None else returned.noFinishNeeded
        if no_finish_needed and not question.finished:
            question.finished = question.finish_sent = True  # (the callee forgot it already)
        if question.finish_sent:
            self.free_question(question_id)
        else:
            self.finish(question_id, question)
        return ReturnArrived(question, answer)

    def _returned(
        self, segments: list[Segment], question_id: int, question: Question, returned: Any
    ) -> Returned:
        kind = returned.which()
        if kind == "results":
            caps = self._received(returned.results)
            if question.method is None:  # a Bootstrap's: the content is the capability
                index = capwire.read_cap(segments, RETURN_CONTENT)
                value: Any = caps[index] if index is not None and index < len(caps) else None
                return Returned(question_id, results=value)
            reader = returned.results.content
            view = content(segments, reader, RETURN_CONTENT, question.method.results, caps, self.typed)
            return Returned(question_id, results=view)
        if kind == "exception":
            return Returned(question_id, error=read_exception(returned.exception))
        if kind == "canceled":
            return Returned(question_id, error=Failed("the call was canceled"))
        return Returned(question_id, error=Unimplemented(f"a Return of kind {kind}"))

    def _on_finish(self, question_id: int, release_result_caps: bool) -> list[Event]:
        answer = self.answers.get(question_id)
        if answer is None or answer.finished:
            if question_id in self._no_finish_needed:
                del self._no_finish_needed[question_id]
                return []
            if answer is None and self._forgot_some:
                return []
        if answer is None or answer.finished:
            raise ProtocolError(f"a Finish for question {question_id}, which is not one")
        answer.finished = True
        if release_result_caps:
            self.released(answer.results)
            answer.results = []
        if answer.returned:
            del self.answers[question_id]
            return []
        return [FinishArrived(answer)]

    def _on_resolve(self, resolve: Any) -> list[Event]:
        """This side holds on to the promise it was sent and keeps calling through it (the
        peer forwards); a capability it is resolved to is released at once."""
        if resolve.which() == "cap":
            descriptor = read_descriptor(resolve.cap)
            if descriptor.kind in ("senderHosted", "senderPromise"):
                self._post(frame(encode_release(descriptor.id, 1)), None)
        return []

    def _on_disembargo(self, disembargo: Any) -> DisembargoAsked:
        context = disembargo.context
        if context.which() != "senderLoopback":
            raise ProtocolError(f"a Disembargo of kind {context.which()} (this side sends no senderLoopback)")
        target = disembargo.target
        if target.which() == "promisedAnswer":
            answer = self.answers.get(int(target.promisedAnswer.questionId))
            if answer is None:
                raise ProtocolError(
                    f"a Disembargo for answer {target.promisedAnswer.questionId}, which is not one"
                )
            transform = read_transform(target.promisedAnswer)
        else:
            export = self.exports.get(int(target.importedCap))
            if export is None or not isinstance(export.server, PromisedServer):
                raise ProtocolError(
                    f"a Disembargo for export {target.importedCap}, which is no promise of this side"
                )
            answer, transform = export.server.answer, export.server.transform
        return DisembargoAsked(answer, transform, int(context.senderLoopback))

    def _on_unimplemented(self, echoed: Any) -> list[Event]:
        if echoed.which() != "call":
            log.warning("the peer does not implement a %s message", echoed.which())
            return []
        question_id = int(echoed.call.questionId)
        question = self.questions.get(question_id)
        if question is None or question.returned:
            return []
        question.returned = True
        self.free_question(question_id)
        return [ReturnArrived(question, Returned(0, error=Unimplemented("the peer does not take this call")))]


def _answered(client: Client) -> object:
    """The capability a pipelined client names, its question having returned."""
    assert client.pipeline is not None
    promise, transform = client.pipeline
    done = promise._done
    returned = done[1][0] if done is not None and done[1] else None
    if returned is None or returned.results is None:
        raise Failed(f"{client!r}: its call failed, so it names no capability")
    target = returned.results.capability_at(transform)
    if target is None:
        raise Failed(f"the pipelined capability (pointer fields {list(transform)}) is null")
    return target
