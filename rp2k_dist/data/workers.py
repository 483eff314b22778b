"""Start methods for the packer's and the loader's worker processes.

Workers start from a *forkserver* by default: plain ``fork`` is unsafe in processes that
already run threads (Ray actors, anything that touched CUDA or a thread pool). A bare
forkserver would make every worker it forks re-import torch, Pillow, OpenCV and this
package on its own, again for every new pool and loader; so the server imports them once
and its forks inherit them (what that saves: bench/RESULTS.md).
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.context import BaseContext

#: Imported once by the forkserver; everything a packing or loading worker needs.
PRELOAD = ("rp2k_dist.data.loader", "rp2k_dist.data.pack")


def worker_context(start_method: str = "forkserver") -> BaseContext:
    """The multiprocessing context for worker pools, with the forkserver preloaded.

    The preload list only takes effect when this process starts its forkserver (the
    first pool or loader); later calls change nothing, which is harmless.
    """
    context = mp.get_context(start_method)
    if start_method == "forkserver":
        context.set_forkserver_preload(list(PRELOAD))
    return context
