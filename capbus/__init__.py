"""capbus: capability IPC for Python.

The bus1 object model (peers, nodes, handles, globally ordered messages with attached
handles and fds, per-user quotas) enforced by a small C kernel, used from trio.
"""

from .errors import (
    AlreadyDestroyed,
    BadFileDescriptor,
    CapbusError,
    Disconnected,
    DuplicateId,
    HandleBusy,
    InvalidArgument,
    MalformedFrame,
    MessageTooLarge,
    NodeDestroyed,
    NoSeed,
    NoSuchHandle,
    NoSuchPeer,
    NotOwner,
    NotSealed,
    NotSupported,
    QuotaExceeded,
    UnknownCommand,
)
from .kernel import Kernel, KernelStatistics, Limits, open_kernel
from .peer import (
    Credentials,
    Handle,
    HandleLike,
    HandleState,
    Message,
    MessageKind,
    MonitorRecord,
    Peer,
    PeerInfo,
    connect,
    decode_monitor_record,
)


def __getattr__(name: str) -> object:
    # capbus.load lives in the RPC layer; importing it lazily keeps `import capbus` (the peer
    # API) free of Cap'n Proto.
    if name == "load":
        from .rpc.interface import load

        return load
    raise AttributeError(f"module 'capbus' has no attribute {name!r}")


__all__ = [
    "AlreadyDestroyed",
    "BadFileDescriptor",
    "CapbusError",
    "Credentials",
    "Disconnected",
    "DuplicateId",
    "Handle",
    "HandleBusy",
    "HandleLike",
    "HandleState",
    "InvalidArgument",
    "Kernel",
    "KernelStatistics",
    "Limits",
    "MalformedFrame",
    "Message",
    "MessageKind",
    "MessageTooLarge",
    "MonitorRecord",
    "NoSeed",
    "NoSuchHandle",
    "NoSuchPeer",
    "NodeDestroyed",
    "NotOwner",
    "NotSealed",
    "NotSupported",
    "Peer",
    "PeerInfo",
    "QuotaExceeded",
    "UnknownCommand",
    "connect",
    "decode_monitor_record",
    "load",
    "open_kernel",
]
