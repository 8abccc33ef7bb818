"""A Discord-compatible gateway, REST and voice server on loopback, for tests, the demo and bot developers."""
