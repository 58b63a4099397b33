# The service the serving tests run (tests/serving/echo_service.py).
@0xf1c2d3e4a5b60708;
interface Ping { ping @0 () -> (n :UInt32); }
interface Echo {
  echo @0 (text :Text) -> (text :Text);
  pid @1 () -> (pid :UInt32);
  call @2 (ping :Ping) -> (n :UInt32);
}
