# The demo's interfaces (examples/demo.py): a notebook of pages, each page a capability.
@0xe5a4c3b2a1908f71;

interface Notebook {
  page @0 (title :Text) -> (page :Page);
  # A new page: a capability of its own, handed to the caller.
  share @1 (page :Page, why :Text) -> (lines :UInt32);
  # Someone else's page (the sandboxed worker's own object): the notebook calls it back.
}

interface Page {
  write @0 (line :Text) -> ();
  read @1 () -> (lines :List(Text));
}
