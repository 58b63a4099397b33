@0xf1e2d3c4b5a69788;

interface Sink {
  write @0 (seq :UInt32, data :Data) -> stream;
  done @1 () -> (count :UInt32, bytes :UInt64);
}
