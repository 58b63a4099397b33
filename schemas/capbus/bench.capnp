# The interface `capbus bench` measures (capbus and pycapnp alike).
@0xb1c2a4e0f3d95a17;

interface Bench {
  echo @0 (text :Text) -> (text :Text);
  ping @1 () -> ();
  take @2 (cap :Bench) -> ();
  received @3 () -> (calls :UInt64);
  data @4 (data :Data) -> (size :UInt64);
  sink @5 (data :Data) -> stream;
  # The streaming workload: 1 MiB chunks, flow-controlled by the stream's window.
}

# The multicast workloads' subscribers: one event, one-way, to each of N of them at once.
interface Subscriber {
  event @0 (seq :UInt64) -> ();
}
