"""A reduction with an entry function: `kernels/reduction.py:sum_of_squares` returns a JSON value.

As a script it prints the same value.
"""
import taichi as ti


def sum_of_squares(n: int = 1000) -> int:
    """Sum of i*i for i < n, computed by a parallel Taichi reduction in 64-bit integers."""
    ti.init(arch=ti.cpu)

    @ti.kernel
    def reduce(n: ti.i64) -> ti.i64:
        s = ti.i64(0)
        for i in range(n):
            s += ti.i64(i) * i
        return s

    return reduce(n)


if __name__ == "__main__":
    print(sum_of_squares(1000))
