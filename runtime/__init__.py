"""sdrt.runtime: what applications embed. NumPy plus engines; never torch."""
