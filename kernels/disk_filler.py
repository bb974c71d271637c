"""Writes 8 MiB files into its work dir until a write fails, then keeps the space (disk)."""
import os
import time

import taichi as ti

ti.init(arch=ti.cpu)
block = os.urandom(1 << 20)
written = 0
try:
    for n in range(1 << 16):
        with open(f"fill-{n}.bin", "wb") as f:
            for _ in range(8):
                f.write(block)
                written += len(block)
except OSError as err:
    print(f"write failed after {written >> 20} MiB: {err.strerror}", flush=True)
time.sleep(60)  # a job that filled its disk and stays is ended by the sandbox, not by its wall_time
