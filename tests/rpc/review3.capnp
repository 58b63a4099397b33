@0xb7a3c5e9d1f20864;

using Fd = import "/capbus/fd.capnp".Fd;

interface Sink {
  fill @0 (sink :Fd, data :Data) -> ();
}

interface Hub {
  sink @0 () -> (sink :Sink);
}
