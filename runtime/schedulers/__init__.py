"""Schedulers in NumPy, at numerical parity with diffusers."""
