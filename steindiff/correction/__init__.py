"""The Stein correction: divergence estimation and the gamma rule with its safeguards."""
