"""Initialises Taichi, then sleeps for an hour: uses no CPU, only wall time (wall_time)."""
import time

import taichi as ti

ti.init(arch=ti.cpu)
time.sleep(3600)
