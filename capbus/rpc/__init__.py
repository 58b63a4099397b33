"""capbus.rpc: Cap'n Proto-style RPC over the peer API (docs/design.md section 3).

Built on :mod:`capbus` (the peer API); knows nothing of sockets or the kernel's frames.
"""
