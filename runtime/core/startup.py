"""Start a process fast: Python's cyclic garbage collector paused while torch, diffusers and transformers import
and the model loads.

Those imports allocate about a million container objects. With the collector on, each 700 allocations start a
collection, and the full ones walk everything imported so far: on 2 CPU cores that is about 0.9 s of a 5 s
``diffrt generate`` (fashion-lcm, torch backend), and the first call pays another 0.2 s for the collection
the load left pending. Imports make almost no cyclic garbage, so pausing the collector loses nothing. At the
end, :func:`gc.freeze` moves everything loaded into the permanent generation, so later collections (during
generation) skip the model and the imported modules.

The cost: what ``fast_start`` froze is not freed by the cyclic collector while the program runs (reference
counting still frees acyclic objects). That suits a process that keeps its pipeline (the ``diffrt`` commands,
a server replica, a batch worker); a program that loads and drops many pipelines should not use it. At exit
the frozen objects are handed back, so the interpreter's last collection frees them as before (extension
modules such as Triton's report objects still alive at exit as leaks).
"""

from __future__ import annotations

import atexit
import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def fast_start() -> Iterator[None]:
    """Pause the cyclic collector inside the block (imports, ``diffrt.load``); freeze what it loaded on exit.

    The collector's state is restored afterwards: a caller that had it off keeps it off."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        atexit.unregister(gc.unfreeze)  # one registration however often this runs
        atexit.register(gc.unfreeze)
        if was_enabled:
            gc.enable()
