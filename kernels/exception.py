"""Raises after a kernel ran: a plain job error with a traceback (error)."""
import taichi as ti

ti.init(arch=ti.cpu)
x = ti.field(ti.f32, shape=8)
x.fill(2.0)
raise ValueError(f"bad input: sum is {x.to_numpy().sum()}")
