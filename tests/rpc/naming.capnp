@0xd6b1a7e03c2f4b11;
# Names Python cannot use as they are (capbus/rpc/naming.py): keywords, and names clients,
# servers and struct readers use for themselves.

struct Item {
  def @0 :Text;
  which @1 :UInt8;
  self @2 :Bool;
}

interface Keywords {
  from @0 (class :Text, self :UInt32, pass :Bool) -> (import :Text, which :UInt32);
  aclose @1 () -> (send :UInt8);
  lambda @2 (item :Item, global :Item) -> (item :Item, def :Text);
}
