"""The output wing: result files written whole or not at all, and their paths checked before the work."""
