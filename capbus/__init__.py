"""capbus: capability IPC for Python.

The bus1 object model (peers, nodes, handles, globally ordered messages with attached
handles and fds, per-user quotas) enforced by a small C kernel, used from trio.
"""

from typing import TYPE_CHECKING

from .errors import (
    AlreadyDestroyed,
    BadFileDescriptor,
    CapbusError,
    Disconnected,
    DuplicateId,
    HandleBusy,
    InvalidArgument,
    KernelOutOfFds,
    MalformedFrame,
    MessageTooLarge,
    NodeDestroyed,
    NoSeed,
    NoSuchHandle,
    NoSuchPeer,
    NotOwner,
    NotPermitted,
    NotSealed,
    NotSupported,
    QuotaExceeded,
    ReceiveReplaced,
    ShutDown,
    Undelivered,
    UnknownCommand,
)

if TYPE_CHECKING:
    from .activation import activatable
    from .bootstrapping import Bootstrap, bootstrap
    from .kernel import Kernel, KernelStatistics, Limits, open_kernel
    from .messages import Credentials, Handle, HandleLike, Message, MessageKind
    from .peer import HandleState, MonitorRecord, Peer, PeerInfo, decode_monitor_record
    from .peer import connect as connect_peer
    from .rpc.anypointer import list_value, struct_value
    from .rpc.interface import load
    from .rpc.schemacheck import SchemaError
    from .sandbox import Sandbox, SandboxError
    from .serving import ServeError, Service, connect, serve
    from .spawning import Child, ChildError, spawn

_LAZY = {
    # (the peer API too: the sans-IO parts, such as capbus.rpc.engine, import capbus
    # without trio or sockets)
    **dict.fromkeys(("Credentials", "Handle", "HandleLike", "Message", "MessageKind"), "messages"),
    **dict.fromkeys(("HandleState", "MonitorRecord", "Peer", "PeerInfo", "decode_monitor_record"), "peer"),
    "connect_peer": "peer",
    "Kernel": "kernel",
    "KernelStatistics": "kernel",
    "Limits": "kernel",
    "open_kernel": "kernel",
    "load": "rpc.interface",
    "struct_value": "rpc.anypointer",
    "list_value": "rpc.anypointer",
    "SchemaError": "rpc.schemacheck",
    "spawn": "spawning",
    "activatable": "activation",
    "Child": "spawning",
    "ChildError": "spawning",
    "bootstrap": "bootstrapping",
    "Bootstrap": "bootstrapping",
    "Sandbox": "sandbox",
    "serve": "serving",
    "connect": "serving",
    "Service": "serving",
    "ServeError": "serving",
    "SandboxError": "sandbox",
}


def __getattr__(name: str) -> object:
    # Imported on first use: `import capbus` (the peer API) then loads neither Cap'n Proto
    # (the RPC layer and what builds on it) nor the kernel's C code (a peer in a child
    # process never needs it).
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'capbus' has no attribute {name!r}")
    import importlib

    found = getattr(
        importlib.import_module(f".{module}", __name__), "connect" if name == "connect_peer" else name
    )
    globals()[name] = found  # (looked up once)
    return found


__all__ = [
    "connect_peer",
    "serve",
    "Service",
    "ServeError",
    "struct_value",
    "list_value",
    "AlreadyDestroyed",
    "BadFileDescriptor",
    "Bootstrap",
    "CapbusError",
    "Child",
    "ChildError",
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
    "NotPermitted",
    "NotSealed",
    "KernelOutOfFds",
    "NotSupported",
    "Peer",
    "PeerInfo",
    "QuotaExceeded",
    "ReceiveReplaced",
    "ShutDown",
    "Undelivered",
    "Sandbox",
    "SandboxError",
    "SchemaError",
    "UnknownCommand",
    "bootstrap",
    "connect",
    "decode_monitor_record",
    "load",
    "open_kernel",
    "spawn",
    "activatable",
]
