"""Spawns 3 children, each with 2 grandchildren, all sleeping; one grandchild double-forks into its
own session. Every process prints "pid N". Runs until a limit ends it: the sandbox must leave none
of them alive."""
import os
import time

import taichi as ti

ti.init(arch=ti.cpu)


def live_forever():
    print(f"pid {os.getpid()}", flush=True)
    while True:
        time.sleep(1)


def child(index: int) -> None:
    for g in range(2):
        if os.fork() == 0:
            if index == 0 and g == 0:
                if os.fork() != 0:
                    os._exit(0)  # the double-forked grandchild is orphaned ...
                os.setsid()  # ... and leaves the job's session and process group
            live_forever()
    live_forever()


for i in range(3):
    if os.fork() == 0:
        child(i)
live_forever()
