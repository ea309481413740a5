"""EDM (Karras et al. 2022): its networks, the reader of its pickles, its samplers and its
generate.py seed mode."""
