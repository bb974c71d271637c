"""A simulation function run in the sandbox with `sandboxed`, returning its final field as an array.

`diffuse` is an ordinary function of this script: calling it ships it (and this file's source, which
Taichi compiles the kernel from) to a sandboxed child under the limits given to the decorator; its
final temperature field comes back as a numpy array. A second call with too little memory shows
SandboxError carrying the verdict.

    .venv/bin/python examples/sandboxed_simulation.py
"""

import numpy as np
import taichi as ti

from sandbox import SandboxError, sandboxed


@sandboxed(memory="1GiB", cpu_time="30s", wall_time="60s")
def diffuse(n: int, steps: int, alpha: float = 0.2) -> np.ndarray:
    """Explicit heat diffusion on an n x n plate with a hot square in the middle."""
    u = ti.field(ti.f32, shape=(n, n))
    v = ti.field(ti.f32, shape=(n, n))

    @ti.kernel
    def heat_square():
        for i, j in u:
            u[i, j] = 100.0 if abs(i - n // 2) < n // 8 and abs(j - n // 2) < n // 8 else 0.0

    @ti.kernel
    def step():
        for i, j in u:
            if 0 < i < n - 1 and 0 < j < n - 1:
                v[i, j] = u[i, j] + alpha * (u[i + 1, j] + u[i - 1, j] + u[i, j + 1] + u[i, j - 1] - 4 * u[i, j])
            else:
                v[i, j] = 0.0
        for i, j in u:
            u[i, j] = v[i, j]

    heat_square()
    for _ in range(steps):
        step()
    return u.to_numpy()


@sandboxed(memory="200MiB")
def too_big() -> np.ndarray:
    return np.ones((1 << 28,), np.uint8)  # 256 MiB


def main() -> None:
    field = diffuse(256, 500)
    print(f"final field: {field.dtype} {field.shape}, total heat {field.sum():.1f}, peak {field.max():.2f}")
    try:
        too_big()
    except SandboxError as err:
        print(f"SandboxError: {err}")
        print(f"  verdict {err.result.verdict.value}, peak memory {err.result.usage.peak_rss >> 20} MiB")


if __name__ == "__main__":
    main()
