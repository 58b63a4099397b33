# The interface `capbus bench` measures (capbus and pycapnp alike).
@0xb1c2a4e0f3d95a17;

interface Bench {
  echo @0 (text :Text) -> (text :Text);
  ping @1 () -> ();
  take @2 (cap :Bench) -> ();
  received @3 () -> (calls :UInt64);
  data @4 (data :Data) -> (size :UInt64);
}

# The multicast workloads' subscribers: one event, one-way, to each of N of them at once.
interface Subscriber {
  event @0 (seq :UInt64) -> ();
}
