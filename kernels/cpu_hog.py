"""An infinite loop inside one Taichi kernel: burns CPU and holds the GIL until killed (cpu_time)."""
import taichi as ti

ti.init(arch=ti.cpu, cpu_max_num_threads=1)

x = ti.field(ti.i64, shape=())


@ti.kernel
def spin():
    ti.loop_config(serialize=True)
    for _ in range(1):
        i = 0
        while i >= 0:  # never false: i wraps to 0 through the bit mask
            i = (i + 1) & 0x3FFFFFFF
            x[None] += 1


spin()
