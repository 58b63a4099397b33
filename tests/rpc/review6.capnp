@0xd5f2b8e3ca4a7179;
# Interfaces for tests/rpc/test_attacks_review6.py.

interface Store {
  put @0 (text :Text) -> ();
  # Takes the text and returns once the store has it (the test holds it, like slow I/O).
}
