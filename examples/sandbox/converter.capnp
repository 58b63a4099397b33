# The sandbox example: an untrusted converter writes what it makes to an Output capability.
@0xc24bc2d8a59f9070;

interface Output {
  write @0 (line :Text) -> stream;
  # One converted record; -> stream: the converter may go on while earlier lines are in
  # flight, within a window (flow control).
  note @1 (text :Text) -> ();
  # Something the converter wants its parent to know.
  close @2 (records :UInt32) -> ();
}
