"""What guided_diffusion and evaluations share: the one user-error type, the one-line command-line
wrapper, atomic file writes, folder locks and the NPZ writer. Imports neither package."""
