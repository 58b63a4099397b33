@0xa1b2c3d4e5f60718;
# Interfaces for tests/rpc/test_views.py: Data and Text read as memoryviews.

struct Nested { blob @0 :Data; }

interface Blobs {
  size @0 (data :Data, note :Text) -> (size :UInt64, first :UInt8, last :UInt8, isView :Bool, mapped :Bool, note :Text);
  # What the handler saw: how large, its ends, whether it got a view and whether that view
  # is of a mapping (the call's memfd), and the note it got back as Text.
  back @1 (data :Data) -> (data :Data);
  nested @2 (inner :Nested, pick :UInt8) -> (size :UInt64, isView :Bool);
  # A param that is not flat: read through pycapnp (its view is of a copy).
  make @3 (size :UInt64, seed :UInt8) -> (data :Data);
  # Results that the server builds in a sealed memfd (test_attached_segments.py).
}
