# Groups (in structs and in results), a union inside a group-like field, and defaults of
# every kind: fields, params and results (tests/rpc/test_groups_defaults.py).
@0xb4e2c9d17a3f5e08;
enum Level { low @0; high @1; }
struct Inner { depth @0 :UInt8 = 1; }
struct Settings {
  name @0 :Text = "unnamed";
  retries @1 :UInt32 = 3;
  level @2 :Level = high;
  ratio @3 :Float64 = 0.5;
  tags @4 :List(Text) = ["a", "b"];
  limits :group {
    soft @5 :UInt64 = 100;
    hard @6 :UInt64 = 200;
  }
  target :union {
    host @7 :Text = "localhost";
    port @8 :UInt16 = 80;
  }
  inner @9 :Inner = (depth = 2);
  blob @10 :Data = 0x"ca fe";
}
interface Config {
  put @0 (settings :Settings, count :UInt32 = 5) -> (settings :Settings, count :UInt32);
  defaults @1 () -> (settings :Settings);
  where @2 () -> Where;
}
struct Where { at :group { x @0 :Int32; y @1 :Int32 = -1; } level @2 :Level = low; }
