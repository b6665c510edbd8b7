"""Peak resident memory of one pipeline call, above what the loaded pipeline already holds (run as a script:
``python measure_peak.py MODEL HEIGHT WIDTH N``; prints JSON). Used by test_memory.py in a fresh process."""

import json
import sys

import diffrt


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key + ":"))


def main(model: str, height: int, width: int, n: int) -> dict:
    pipe = diffrt.load(model, device="cpu")
    pipe.generate("a coat", steps=1, num_images=1, progress=False)  # warm: lazy allocations happen now
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets the peak (VmHWM) to the current resident set
    before = _status("VmRSS")
    settings = dict(steps=1, num_images=n, height=height, width=width)
    pipe.generate("a coat", progress=False, **settings)
    measured = _status("VmHWM") - before
    found = pipe.estimate_memory("a coat", **settings)
    return {"measured": measured, "estimated": found.peak, "largest": found.largest}


if __name__ == "__main__":
    model, height, width, n = sys.argv[1], *map(int, sys.argv[2:])
    print(json.dumps(main(model, height, width, n)))
