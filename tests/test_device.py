"""The device lock: a latency measurement holds the machine alone."""

import subprocess
import sys
import time

from gatesearch.objectives.device import DeviceLock

CHILD = """
import sys, time
from gatesearch.objectives.device import DeviceLock
lock = DeviceLock(sys.argv[1])
print("ready", flush=True)
start = time.perf_counter()
with lock.shared():
    print(f"{time.perf_counter() - start:.3f}", flush=True)
"""


def test_training_step_waits_for_a_measurement(tmp_path):
    lock = DeviceLock(tmp_path)
    with lock.exclusive(threads=1):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # the child is blocked in shared() all this time
    waited = float(child.stdout.readline())
    child.wait(timeout=30)
    assert waited >= 0.4


def test_shared_holders_do_not_block_each_other(tmp_path):
    a, b = DeviceLock(tmp_path), DeviceLock(tmp_path)
    with a.shared():
        start = time.perf_counter()
        with b.shared():
            assert time.perf_counter() - start < 1.0
    a.close()
    b.close()
