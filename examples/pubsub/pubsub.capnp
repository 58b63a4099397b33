# Publish/subscribe with capabilities: a subscriber hands the publisher a callback; the
# publisher multicasts each event to every callback in one send, so all subscribers see
# the events in the same order, even when several topics publish at once.
@0xb6d44d1f01104511;

interface Subscriber {
  event @0 (topic :Text, seq :UInt32, body :Text) -> ();
  # One event (a one-way call).
  end @1 () -> ();
  # No more events.
}

interface Publisher {
  subscribe @0 (subscriber :Subscriber) -> (subscribers :UInt32);
  # Registers a callback; returns how many subscribers there are now.
}
