"""Chime's platform side: the terminal simulator, the `chime` command line (and later Discord and the API)."""
