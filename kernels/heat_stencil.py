"""2-D heat diffusion (Jacobi 5-point stencil) on an n x n grid: a realistic GPU-style job.

Entry function `simulate(n, steps)` returns the total heat and the centre temperature; as a script
it runs the default size and prints them.
"""
import taichi as ti


def simulate(n: int = 512, steps: int = 200) -> dict:
    ti.init(arch=ti.gpu)
    t = ti.field(ti.f32, shape=(n, n))
    t_next = ti.field(ti.f32, shape=(n, n))

    @ti.kernel
    def hot_centre():
        for i, j in t:
            t[i, j] = 100.0 if abs(i - n // 2) < n // 16 and abs(j - n // 2) < n // 16 else 0.0

    @ti.kernel
    def step(src: ti.template(), dst: ti.template()):
        for i, j in src:
            if 0 < i < n - 1 and 0 < j < n - 1:
                dst[i, j] = src[i, j] + 0.2 * (src[i - 1, j] + src[i + 1, j] + src[i, j - 1] + src[i, j + 1]
                                               - 4.0 * src[i, j])
            else:
                dst[i, j] = 0.0

    @ti.kernel
    def total() -> ti.f32:
        s = 0.0
        for i, j in t:
            s += t[i, j]
        return s

    hot_centre()
    for k in range(steps // 2):
        step(t, t_next)
        step(t_next, t)
    return {"n": n, "steps": steps, "total_heat": round(float(total()), 1),
            "centre": round(float(t[n // 2, n // 2]), 3), "arch": str(ti.lang.impl.current_cfg().arch)}


if __name__ == "__main__":
    print(simulate())
