"""Discord-facing cogs: the only layer that talks to users."""
