@0xe3b1c5a9d7f20431;
# Interfaces for tests/rpc/test_attacks_review4.py.

using Fd = import "/capbus/fd.capnp".Fd;

interface Sink {
  fill @0 (sink :Fd, data :Data) -> ();
}

interface Hub {
  sink @0 () -> (sink :Sink);
  hub @1 () -> (hub :Hub);
}

interface Named {
  put @0 (of :Int32, name :Text) -> (of :Int32, name :Text);
  # A field named like a classmethod of FlatReader.
}

enum Shade { light @0; dark @1; }

struct Painted {
  shade @0 :Shade;
  depth @1 :Int32;
}

interface Store {
  put @0 (file :Fd) -> ();
  # Takes a file; its handler takes a while.
}

interface Relay {
  relay @0 (file :Fd) -> (file :Fd, relay :Relay);
  # Hands the file back, with a capability to itself.
}

interface Pair {
  pair @0 (a :Fd, b :Fd) -> ();
}

interface PairHub {
  get @0 () -> (pair :Pair);
}
