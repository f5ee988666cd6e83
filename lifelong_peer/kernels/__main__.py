"""``python -m lifelong_peer.kernels``: build (or find) the native PEER kernels and say where they are."""

import sys
import time

from lifelong_peer import kernels

t0 = time.perf_counter()
module = kernels.load()
if module is None:
    print("native PEER kernels unavailable (LPEER_NATIVE=0, no C++ compiler, or a failed build)", file=sys.stderr)
    sys.exit(1)
print(f"native PEER kernels ready in {time.perf_counter() - t0:.1f} s: {kernels.build_dir()}")
