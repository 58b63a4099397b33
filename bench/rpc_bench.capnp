# The interface bench/rpc.py measures.
@0x939557dd93c88bcc;

interface Bench {
  echo @0 (text :Text) -> (text :Text);
  ping @1 () -> ();
  take @2 (cap :Bench) -> ();
  received @3 () -> (calls :UInt64);
}
