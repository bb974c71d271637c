"""The smallest realistic job: init, one 1024-element kernel, one reduction. Used by benchmarks."""
import taichi as ti

ti.init(arch=ti.cpu)
x = ti.field(ti.f32, shape=1024)


@ti.kernel
def fill_and_sum() -> ti.f32:
    s = 0.0
    for i in x:
        x[i] = 1.0
        s += x[i]
    return s


print(fill_and_sum())
