"""A simulation function run in the sandbox with `sandboxed`, returning its final field as an array.

`bounce` is an ordinary function of this script: calling it ships it (and this file's source, which
Taichi compiles the kernels from) to a sandboxed child under the limits given to the decorator; the
final positions of its particles come back as a numpy array. A second function that asks for more
memory than its limit shows SandboxError carrying the verdict.

    .venv/bin/python examples/sandboxed_simulation.py
"""

import numpy as np
import taichi as ti

from sandbox import SandboxError, sandboxed


@sandboxed(memory="1GiB", cpu_time="30s", wall_time="60s")
def bounce(n: int, steps: int, dt: float = 0.005) -> np.ndarray:
    """n particles falling in a unit box, bouncing off its walls with damping: their final positions."""
    x = ti.Vector.field(2, ti.f32, shape=n)
    v = ti.Vector.field(2, ti.f32, shape=n)

    @ti.kernel
    def scatter():
        for i in x:
            x[i] = ti.Vector([ti.random(), ti.random()])
            v[i] = ti.Vector([ti.random() - 0.5, 0.0])

    @ti.kernel
    def advance():
        for i in x:
            v[i].y -= 9.8 * dt
            x[i] += v[i] * dt
            for d in ti.static(range(2)):
                if x[i][d] < 0.0 or x[i][d] > 1.0:
                    x[i][d] = ti.min(ti.max(x[i][d], 0.0), 1.0)
                    v[i][d] *= -0.8

    scatter()
    for _ in range(steps):
        advance()
    return x.to_numpy()


@sandboxed(memory="200MiB")
def too_big() -> np.ndarray:
    return np.ones((1 << 28,), np.uint8)  # 256 MiB


def main() -> None:
    positions = bounce(10_000, 400)
    inside = bool(((positions >= 0) & (positions <= 1)).all())
    print(f"final positions: {positions.dtype} {positions.shape}, mean height {positions[:, 1].mean():.3f}, "
          f"all inside the box: {inside}")
    try:
        too_big()
    except SandboxError as err:
        print(f"SandboxError: {err}")
        usage = err.result.usage
        print(f"  verdict {err.result.verdict.value}, peak memory {(usage.peak_memory or usage.peak_rss) >> 20} MiB")


if __name__ == "__main__":
    main()
