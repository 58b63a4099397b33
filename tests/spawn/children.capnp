# What the spawn tests' children (children.py) serve and use.
@0xfae8734538cf2a21;

using Fd = import "/capbus/fd.capnp".Fd;

interface Prober {
  probe @0 (what :Text, arg :Text) -> (outcome :Text);
  # Tries something from inside the sandbox: "ALLOWED: ..." or "denied: ERRNO".
  forge @1 (first :UInt64, last :UInt64) -> (reached :List(UInt64));
  # Sends to every handle id in [first, last] that the child does not hold; the ids that took it.
  allocate @2 (megabytes :UInt32) -> ();
  flood @3 (target :Sink, calls :UInt32) -> (refused :UInt32);
  # One-way calls as fast as it can; how many the kernel refused.
  crash @4 () -> ();
  hang @5 () -> ();
  offerMany @6 (count :UInt32, batch :UInt32, sameName :Bool) -> (accepted :UInt32, refusal :Text);
  # Offers `count` fds to the parent, `batch` to an offer, under one name or distinct ones;
  # how many offers went through, and why the next did not.
  offerNamed @7 (name :Text) -> (refusal :Text);
  # Offers one fd under `name`; "" or why the parent refused.
}

interface Sink {
  put @0 (data :Data) -> ();
  done @1 () -> ();
}

interface Source {
  file @0 () -> (fd :Fd);
}
