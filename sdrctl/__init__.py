"""The sdrctl command line: thin commands that parse, load the config, call `daemon`."""
