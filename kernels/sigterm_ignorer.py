"""Ignores SIGTERM and stays busy in a long kernel: only SIGKILL after the grace period ends it."""
import signal

import taichi as ti

signal.signal(signal.SIGTERM, signal.SIG_IGN)
ti.init(arch=ti.cpu, cpu_max_num_threads=1)
x = ti.field(ti.i64, shape=())


@ti.kernel
def busy(n: ti.i64):
    ti.loop_config(serialize=True)
    for i in range(n):
        x[None] += i % 7


while True:
    busy(200_000_000)
