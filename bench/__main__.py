"""`make bench` / `python -m bench`: lora_kernels.bench's CLI with the outputs in this checkout's bench/out/."""
import os
import sys

from lora_kernels.bench.__main__ import main

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

if __name__ == "__main__":
    sys.exit(main(prog="python -m bench", default_out=OUT))
