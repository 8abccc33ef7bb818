"""A Discord-compatible gateway, REST and voice server on loopback.

For tests, the demo and bot developers: a real discord.py bot with Legato runs against it with no
Discord and no internet.
"""
