"""One module per CLI command; each defines a single ``click`` command named ``command``."""
