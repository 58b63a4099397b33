# File descriptors in capbus messages.
#
# A field of type Fd carries a file descriptor: the fd travels with the bus1 message
# (SCM_RIGHTS through the kernel) and the field holds its index among the message's fds, as
# a capability pointer holds its index among the message's handles. In a schema:
#
#   using Fd = import "/capbus/fd.capnp".Fd;
#   interface Files { open @0 (name :Text) -> (file :Fd); }
#
# (capbus.load and capbus compile put capbus's schema directory on the import path.)
@0xa9f6b377c1a89f2d;

struct Fd {
  index @0 :UInt32;
}
