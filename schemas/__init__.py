"""capbus's own Cap'n Proto schemas (shipped in the package as ``capbus.schemas``)."""
