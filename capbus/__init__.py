"""capbus: capability IPC for Python.

The bus1 object model (peers, nodes, handles, globally ordered messages with attached
handles and fds, per-user quotas) enforced by a small C kernel, used from trio.
"""

from .errors import (
    AlreadyDestroyed as AlreadyDestroyed,
    BadFileDescriptor as BadFileDescriptor,
)
from .errors import (
    CapbusError as CapbusError,
)
from .errors import (
    Disconnected as Disconnected,
)
from .errors import (
    DuplicateId as DuplicateId,
)
from .errors import (
    HandleBusy as HandleBusy,
)
from .errors import (
    InvalidArgument as InvalidArgument,
)
from .errors import (
    MalformedFrame as MalformedFrame,
)
from .errors import (
    MessageTooLarge as MessageTooLarge,
)
from .errors import (
    NodeDestroyed as NodeDestroyed,
)
from .errors import (
    NoSeed as NoSeed,
)
from .errors import (
    NoSuchHandle as NoSuchHandle,
)
from .errors import (
    NoSuchPeer as NoSuchPeer,
)
from .errors import (
    NotOwner as NotOwner,
    NotSealed as NotSealed,
)
from .errors import (
    NotSupported as NotSupported,
)
from .errors import (
    QuotaExceeded as QuotaExceeded,
)
from .errors import (
    UnknownCommand as UnknownCommand,
)
from .kernel import Kernel as Kernel
from .kernel import KernelStatistics as KernelStatistics
from .kernel import Limits as Limits
from .kernel import open_kernel as open_kernel
from .peer import (
    Credentials as Credentials,
)
from .peer import (
    Handle as Handle,
)
from .peer import (
    HandleLike as HandleLike,
)
from .peer import (
    HandleState as HandleState,
)
from .peer import (
    Message as Message,
)
from .peer import (
    MessageKind as MessageKind,
)
from .peer import (
    Peer as Peer,
)
from .peer import (
    PeerInfo as PeerInfo,
)
from .peer import (
    connect as connect,
)

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
    "open_kernel",
]
