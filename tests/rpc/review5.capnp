@0xc4e1a7d2b93f5068;
# Interfaces for tests/rpc/test_attacks_review5.py.

interface Blob {
  get @0 (text :Text) -> (text :Text, again :Blob);
  # Hands the text back, with a capability to itself (results with a capability are kept
  # for a caller that asks).
}
