"""Epsilon Scaling in other libraries' samplers: diffusers pipelines and schedulers."""
