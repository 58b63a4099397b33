@0xc1d2e3f4a5b6c711;
enum Color { red @0; green @1; blue @2; }
struct Point { x @0 :Int32; y @1 :Int32; color @2 :Color = green; }
const origin :Point = (x = 0, y = 0);
const maxSize :UInt32 = 1024;
const greeting :Text = "hello";
