# What the activation tests' child (activated.py) serves.
@0xc3a1d2e4f5b60719;

interface Worker {
  work @0 (n :UInt32) -> (n :UInt32, pid :UInt32, order :List(UInt32));
  # Returns n, the child's pid, and every n this child was given so far, in order.
  retire @1 () -> ();
  # Answers, then the child exits (as a service that is done would).
}
