"""Allocates a new 64 MiB Taichi ndarray every 50 ms and fills it. On a software Vulkan driver
(lavapipe) device memory is host memory, so the RSS monitor sees it grow (memory)."""
import time

import taichi as ti

ti.init(arch=ti.vulkan)
hoard = []
while True:
    a = ti.ndarray(ti.f32, shape=16 * 1024 * 1024)
    a.fill(1.0)
    hoard.append(a)
    time.sleep(0.05)
