"""Small utilities shared by training, the command line and benchmarks (never imported by ops or layers)."""
