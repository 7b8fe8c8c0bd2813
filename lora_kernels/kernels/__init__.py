"""Triton kernels and their launchers, one file per kernel family."""
