"""What the tools and the tests run in place of the world: the fake Evolution API
(fake_evolution.py), and the servers that host a fake or a daemon on loopback (servers.py)."""
