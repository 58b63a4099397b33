# Schema constructs a user writes every day (tests/rpc/test_coverage.py): imports, enums,
# constants, Capability, AnyPointer, a generic interface and its brand, several bases.
@0xc1d2e3f4a5b6c712;
using T = import "coverage_types.capnp";
annotation note(*) :Text;
interface Ping { ping @0 () -> (n :UInt32); }
interface Box(V) { get @0 () -> (value :V); }
interface A { a @0 () -> (); }
interface B { b @0 () -> (); }
interface AB extends(A, B) { ab @0 () -> (); }
struct Local { c @0 :T.Color; p @1 :T.Point; }
const limit :UInt64 = 99 $note("a limit");
interface Cov $note("the interface") {
  move @0 (p :T.Point) -> (p :T.Point);
  paint @1 (c :T.Color) -> (c :T.Color);
  anyCap @2 (cap :Capability) -> (cap :Capability);
  anyPtr @3 (ptr :AnyPointer) -> (ptr :AnyPointer);
  boxed @4 () -> (box :Box(Ping));
  local @5 (l :Local) -> (l :Local);
  both @6 () -> (ab :AB);
  call @7 (ping :Ping) -> (n :UInt32);
}
