"""What the tools and the tests run in place of the world: the fake Evolution API and the
background server that hosts a fake (or a daemon) on a free port."""
