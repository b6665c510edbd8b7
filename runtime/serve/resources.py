"""What a CPU actor (a serving replica, a batch worker) asks Ray for, and how many torch threads it runs."""

from __future__ import annotations


def cpu_share(total_cpus: float, actors: int, given: float | None) -> float:
    """The CPUs each of ``actors`` asks for: ``given``, else an equal share of the cluster's (at least one)."""
    return given or max(1.0, total_cpus / actors)


def torch_threads(share: float, given: bool) -> int:
    """torch threads for an actor holding ``share`` CPUs: all of a share the user gave; of a default share, one
    CPU is left to Ray's own processes (proxy, gateway, data executor). torch's threads wait on each other when a
    core is taken from them: on 2 cores, fashion-lcm served 30.7 images/s with 1 thread against 19.4 with 2
    (``bench/results/serve-fashion-lcm-threads-cpu.json``), and a batch worker made 36 images/s against 27."""
    return max(1, int(share) - (0 if given else 1))
