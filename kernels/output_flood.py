"""Prints about 1 MiB per iteration forever (output)."""
import sys

import taichi as ti

ti.init(arch=ti.cpu)
line = "x" * 1023 + "\n"
block = line * 1024
while True:
    sys.stdout.write(block)
