"""Exposure bias measured (delta_t, epsilon norms) and the lambda search built on it."""
