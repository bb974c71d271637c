"""Dereferences a null pointer through ctypes after a Taichi kernel ran: dies by SIGSEGV (crashed)."""
import ctypes

import taichi as ti

ti.init(arch=ti.cpu)
x = ti.field(ti.f32, shape=8)
x.fill(1.0)
ctypes.string_at(0)
