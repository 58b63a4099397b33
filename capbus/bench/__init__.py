"""``capbus bench``: the same workloads on capbus and on the systems people would pick instead,
in one sitting, interleaved, with medians, p99s and ratios (docs/performance.md).

Each contender is a module of this package (``raw``, ``capbus_rpc``, ``pycapnp_rpc``,
``dbus``, ``grpc_unix``, ``zeromq``) with the same three parts: a *sitting* that runs in the
runner (it starts the contender's broker or kernel if it has one, and its server process) and
gives the client what it needs to connect; ``serve``, the server process; and ``measure``,
the client process, which runs the workloads asked of it and prints one JSON line. Client and
server are always separate processes.
"""
