# A newer version of anypointer.capnp's Point (fields added), as a newer peer sends it, and a
# server that passes a List(Text) param on in an AnyPointer result or a List(Text) one
# (tests/rpc/test_attacks_review13.py).
@0xd3a4c13b7e2f9a51;
struct PointV2 { x @0 :Int32; y @1 :Int32; z @2 :Int32; label @3 :Text; }
interface P { }
interface Forward {
  texts @0 (names :List(Text)) -> (value :AnyPointer);
  caps @1 (names :List(P)) -> (value :AnyPointer);
  echo @2 (names :List(Text)) -> (names :List(Text));
}
