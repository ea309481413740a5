"""Speed and memory measurements of the sampling code (bench_sampling.py is their command line;
RESULTS.md holds what they measured)."""
