"""The `rae` command line: `app` builds the parser and runs a command; one module per command group."""
