@0xc4a6f3d2b1e09087;
# A message shape that puts capabilities everywhere they can be: a struct field, a list of
# capabilities with a hole, inside list elements, inside a group, and as a union member.

interface Echo {
  echo @0 (text :Text) -> (text :Text);
}

struct Entry {
  name @0 :Text;
  cap @1 :Echo;
  weight @2 :UInt32;
}

struct Holder {
  id @0 :UInt64;
  single @1 :Echo;
  many @2 :List(Echo);
  entries @3 :List(Entry);
  label @4 :Text;
  group :group {
    note @5 :Text;
    inner @6 :Echo;
  }
  union {
    nothing @7 :Void;
    capInUnion @8 :Echo;
    text @9 :Text;
  }
  blob @10 :Data;
}
