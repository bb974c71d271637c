"""Grows its resident memory by 64 MiB every 50 ms (numpy, touched) until stopped (memory)."""
import time

import numpy as np
import taichi as ti

ti.init(arch=ti.cpu)
field = ti.field(ti.f32, shape=1024)
field.fill(1.0)

hoard = []
while True:
    hoard.append(np.ones(16 * 1024 * 1024, dtype=np.float32))  # 64 MiB, every page written
    time.sleep(0.05)
