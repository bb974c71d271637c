"""Tries to escape the supervisor's Taichi settings: TI_ARCH, bigger device memory, more threads."""
import os

import taichi as ti

os.environ["TI_ARCH"] = "cuda"
os.environ["TI_DEVICE_MEMORY_GB"] = "64"
ti.init(arch=ti.cuda, device_memory_GB=64, cpu_max_num_threads=64, offline_cache_file_path="/tmp/mine")
x = ti.field(ti.f32, shape=4)
x.fill(3.0)
print("sum", x.to_numpy().sum())
