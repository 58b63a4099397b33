# The capbus RPC envelope (DESIGN.md section 3).
#
# Every call, return and finish is one Envelope, sent as one bus1 message to a node. The
# message's attached handles are the envelope's capability table: every capability pointer
# in it (the reply capability, and any capability in params or results) holds an index into
# those handles, exactly as a Cap'n Proto RPC Payload's pointers index its capTable.
@0xa89c88b6b2bf1e42;

interface Reply {}
# The caller's reply node. A call carries a handle to it; the callee answers there. Per-peer
# handle deduplication gives the callee one id per caller's reply node, so (that id,
# questionId) identifies a call.

struct Envelope {
  union {
    call @0 :Call;
    return @1 :Return;
    finish @2 :Finish;
  }
}

struct Call {
  questionId @0 :UInt64;
  # Chosen by the caller; unique among its calls in flight through one reply node.

  interfaceId @1 :UInt64;
  methodId @2 :UInt16;
  # The method: the id of the interface that declares it and its ordinal there.

  replyTo @3 :Reply;
  # Where the return goes; null for a one-way call, which gets no return.

  target :union {
    node @4 :Void;
    # The object behind the node the message was sent to.
    promisedAnswer @5 :PromisedAnswer;
    # Promise pipelining: a capability in the results of an earlier call of the same caller
    # to the same callee, used before those results have come back.
  }

  params @6 :AnyPointer;
  # The method's parameter struct.

  keepResults @7 :Bool;
  # The caller may pipeline on this call's results: the callee keeps them after returning
  # them, until the caller's Finish.
}

struct PromisedAnswer {
  questionId @0 :UInt64;
  # The earlier call (same reply node).
  transform @1 :List(UInt16);
  # Pointer fields to follow from its results struct to the capability (Cap'n Proto's
  # PromisedAnswer.Op getPointerField steps).
}

struct Return {
  questionId @0 :UInt64;
  union {
    results @1 :AnyPointer;
    # The method's result struct.
    exception @2 :Exception;
    canceled @3 :Void;
    # The caller sent Finish before the call completed; its handler was cancelled.
    redirect @4 :Void;
    # Only for a pipelined call: its capability is not this vat's object but a handle to
    # another vat's (or the caller's own), which the caller holds from this vat's return of
    # the call it was pipelined on. This vat did not make the call; the caller makes it
    # there itself. (Were the callee to make it, it would be the callee's call to the
    # other vat, charged to the callee there: its callers could use up its quotas.) Calls
    # pipelined on a redirected call are redirected in turn.
  }
}

struct Finish {
  questionId @0 :UInt64;
  replyTo @1 :Reply;
  # The caller no longer wants the answer to (replyTo, questionId): cancel the handler if it
  # still runs, and forget the results kept for pipelined calls.
}

struct Exception {
  reason @0 :Text;
  type @1 :Type;
  enum Type {
    failed @0;
    overloaded @1;
    disconnected @2;
    unimplemented @3;
  }
}
