"""Build script. The C++/CUDA extension `lora_kernels._C` is added by the native-backend work
(see csrc/); until then the package is pure Python and this file only defers to pyproject.toml."""
from setuptools import setup

setup()
