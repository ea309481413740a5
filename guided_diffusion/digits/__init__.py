"""The digits demo: scikit-learn's 8x8 digits as data, a feature network for a Frechet distance,
the shipped models' training, and the demo that runs it all on a CPU."""
