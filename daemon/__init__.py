"""The message pipeline of the SDR agent and everything it talks to."""
