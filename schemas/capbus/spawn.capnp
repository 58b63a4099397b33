# How a spawned child (capbus.spawn) gets the capabilities its parent passes, and hands
# back its own. The child's seed holds one handle: a Launcher, served by the parent.
@0x8dab9d53c356621d;

using Fd = import "/capbus/fd.capnp".Fd;

interface Anything {}
# Stands for a capability of any interface (Entry.interfaceId says which).

struct Entry {
  name @0 :Text;
  interfaceId @1 :UInt64;
  # The interface of `capability`: the receiver gives the client that interface's class.
  union {
    capability @2 :Anything;
    fd @3 :Fd;
  }
}

interface Launcher {
  start @0 (report :Text) -> (capabilities :List(Entry));
  # The child's first call, once its sandbox is up and before it runs any code it was
  # started for. `report` is the sandbox report (JSON, layer -> state), for the parent to
  # check: it answers a strict sandbox that lacks a layer with Failed, and the child stops.
  # The results are the capabilities the parent passes, by name.

  offer @1 (capabilities :List(Entry)) -> ();
  # Capabilities the child hands its parent (the service it runs, say).
}
