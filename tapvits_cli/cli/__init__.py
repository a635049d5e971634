"""The command line: thin modules that parse options, call stage logic and write artifacts."""
