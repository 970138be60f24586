"""The benchmark's wing: sweeps, their reports, the cost table, quality metrics and multi-GPU sharding."""
