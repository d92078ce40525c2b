"""Triton kernels, one file per op family. Imported lazily: triton is optional on CPU machines."""
