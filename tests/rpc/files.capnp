@0xe3c1a5b7d9f20416;

using Fd = import "/capbus/fd.capnp".Fd;

interface Files {
  open @0 (name :Text) -> (file :Fd, size :UInt64);
  fill @1 (sink :Fd, data :Data) -> ();
}
