@0xc8e2d3c4b5a69712;
# Structs for tests/rpc/test_flat.py: flat ones (every plain kind, defaults) and ones that
# are not flat (each for one reason).

enum Color { red @0; green @1; blue @2; }

struct Every {
  i8 @0 :Int8; i16 @1 :Int16; i32 @2 :Int32; i64 @3 :Int64;
  u8 @4 :UInt8; u16 @5 :UInt16; u32 @6 :UInt32; u64 @7 :UInt64;
  f32 @8 :Float32; f64 @9 :Float64;
  yes @10 :Bool; no @11 :Bool;
  color @12 :Color;
  text @13 :Text; data @14 :Data; other @15 :Text;
  nothing @16 :Void;
}

struct Defaults {
  count @0 :Int32 = -5;
  big @1 :UInt64 = 1234567890123;
  on @2 :Bool = true;
  color @3 :Color = green;
  name @4 :Text = "default";
}

struct WithUnion { union { a @0 :Int32; b @1 :Text; } }
struct WithGroup { g :group { x @0 :Int32; } }
struct WithList { l @0 :List(Int32); }
struct WithStruct { s @0 :Defaults; }
struct WithFloatDefault { f @0 :Float64 = 1.5; }
struct WithAnyPointer { p @0 :AnyPointer; }
interface Thing {}
struct WithCapability { c @0 :Thing; }

struct Plain {
  # Every kind the flat reader reads (an enum is read through pycapnp).
  i8 @0 :Int8; i16 @1 :Int16; i32 @2 :Int32; i64 @3 :Int64;
  u8 @4 :UInt8; u16 @5 :UInt16; u32 @6 :UInt32; u64 @7 :UInt64;
  f32 @8 :Float32; f64 @9 :Float64;
  yes @10 :Bool; no @11 :Bool;
  text @12 :Text; data @13 :Data; other @14 :Text;
  nothing @15 :Void;
  withDefault @16 :Int32 = -5; on @17 :Bool = true; name @18 :Text = "default"; blob @19 :Data = 0x"0102";
}

struct Older {
  # Plain as an older schema had it: a smaller data and pointer section.
  i8 @0 :Int8; i16 @1 :Int16;
  text @2 :Text;
}
