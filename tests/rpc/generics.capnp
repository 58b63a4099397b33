# A generic interface extending a generic one with its own parameter, and a generic struct
# with two parameters in a brand (tests/rpc/test_generics.py).
@0xe3a1f5b7c9d2e404;
interface Ping { ping @0 () -> (n :UInt32); }
interface Box(V) { get @0 () -> (value :V); }
interface Shelf(V) extends(Box(V)) { put @0 (value :V) -> (); }
struct Pair(A, B) { first @0 :A; second @1 :B; }
interface Maker {
  shelf @0 () -> (shelf :Shelf(Ping));
  pair @1 () -> (pair :Pair(Ping, Text));
}
