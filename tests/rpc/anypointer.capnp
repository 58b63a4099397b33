# AnyStruct, AnyList, AnyPointer and Capability fields holding structs, lists, Text, Data
# and capabilities (tests/rpc/test_anypointer.py).
@0xa7c3e1f2d4b5c601;
interface Ping { ping @0 () -> (n :UInt32); }
struct Point { x @0 :Int32; y @1 :Int32; }
struct Tagged { name @0 :Text; ping @1 :Ping; points @2 :List(Point); }
struct Either { union { n @0 :UInt32; any @1 :AnyPointer; } }
interface Store {
  anyStruct @0 (value :AnyStruct) -> (value :AnyStruct);
  anyList @1 (value :AnyList) -> (value :AnyList);
  anyPointer @2 (value :AnyPointer) -> (value :AnyPointer);
  capability @3 (value :Capability) -> (value :Capability);
  either @4 (e :Either) -> (e :Either);
  unpack @5 (value :AnyStruct) -> (name :Text, n :UInt32);
  tag @6 (name :Text, ping :Ping) -> (value :AnyStruct);
}
