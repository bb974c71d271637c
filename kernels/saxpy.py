"""saxpy on 1M floats: the plain 'ok' job. Prints a checksum."""
import taichi as ti

ti.init(arch=ti.cpu)

n = 1_000_000
x = ti.field(ti.f32, shape=n)
y = ti.field(ti.f32, shape=n)


@ti.kernel
def fill():
    for i in x:
        x[i] = i * 0.5
        y[i] = 1.0


@ti.kernel
def saxpy(a: ti.f32):
    for i in y:
        y[i] = a * x[i] + y[i]


@ti.kernel
def total() -> ti.f64:
    s = 0.0
    for i in y:
        s += y[i]
    return s


fill()
saxpy(2.0)
print(f"saxpy checksum {total():.6e}")
