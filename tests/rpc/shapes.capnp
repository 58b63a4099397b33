@0xd6b1a7e03c2f4b12;
# Params and results shapes a handler must be able to take and return as written.

struct Choice {
  union {
    byName @0 :Text;
    byIndex @1 :UInt32;
  }
}

struct Listing {
  files @0 :List(Text);
  total @1 :UInt32;
}

interface Shapes {
  pick @0 Choice -> (chosen :Text);
  # A params list that is a union: only the member set is passed.
  list @1 () -> (listing :Listing);
  # One struct result: a handler returns the struct's fields.
  listing @2 () -> Listing;
  # Results that are a struct type: a handler returns its fields.
}
