"""The command line: thin modules that parse options, call ``stages.<name>.run`` and render its result."""
