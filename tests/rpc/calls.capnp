@0xd5e6f708192a3b4c;

interface Echo {
  echo @0 (text :Text) -> (text :Text);
  fail @1 (kind :Text) -> ();
  slow @2 () -> ();
}

interface Counter {
  increment @0 (by :UInt32) -> (value :UInt64);
  spawn @1 () -> (counter :Counter);
  # A new counter, starting where this one is.
}

interface Factory extends(Echo) {
  newCounter @0 () -> (counter :Counter);
  same @1 (cap :Counter) -> (cap :Counter);
  sum @2 (counters :List(Counter)) -> (total :UInt64);
}

interface Subscriber {
  event @0 (seq :UInt32, text :Text) -> ();
}

interface Early extends(Later) {
  # Declared before its base: the compiler defines Later first.
  louder @0 () -> ();
}

interface Later {
  quiet @0 () -> ();
}
