"""What the tools and the tests run in place of the world: the fake Evolution API
(fake_evolution.py), a fake OpenAI-compatible API (fake_openai.py), and the servers that
host a fake or a daemon on loopback (servers.py)."""
