"""Engine overhead on 1,000 cheap nodes: validation, cold execution, fully cached rerun.

    python bench/engine_overhead.py [--nodes 1000] [--repeat 20]

Two shapes: a chain (each node feeds the next) and a wide fan-out (one source feeding
N output nodes). The nodes do no work, so the time measured is the engine's own.
Targets: < 50 µs of engine overhead per node; < 5 ms for a fully cached rerun of 1,000 nodes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodeflow import Executor, Int, Node, Output, Registry, Result, Socket, parse, validate  # noqa: E402


class Source(Node):
    inputs = {"value": Int(default=0)}
    outputs = [Output("INT")]

    def run(self, value):
        return (value,)


class Inc(Node):
    inputs = {"x": Socket("INT"), "by": Int(default=1, min=0, max=10)}
    outputs = [Output("INT")]

    def run(self, x, by):
        return (x + by,)


class Sink(Node):
    inputs = {"x": Socket("INT")}
    outputs = []
    output_node = True

    def run(self, x):
        return Result(ui={"value": [x]})


def chain(n: int, seed: int = 0) -> dict:
    wf = {"0": {"class_type": "Source", "inputs": {"value": seed}}}
    for i in range(1, n - 1):
        wf[str(i)] = {"class_type": "Inc", "inputs": {"x": [str(i - 1), 0], "by": 1}}
    wf[str(n - 1)] = {"class_type": "Sink", "inputs": {"x": [str(n - 2), 0]}}
    return wf


def fan_out(n: int, seed: int = 0) -> dict:
    wf = {"0": {"class_type": "Source", "inputs": {"value": seed}}}
    for i in range(1, n):
        wf[str(i)] = {"class_type": "Sink", "inputs": {"x": ["0", 0]}}
    return wf


def timed(fn, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def bench(name: str, make, n: int, repeat: int) -> dict:
    registry = Registry([Source, Inc, Sink])
    t_validate = timed(lambda: validate(parse(make(n)), registry), repeat)

    def cold():
        ex = Executor(registry)
        graph = parse(make(n))
        ex.execute(graph, validate(graph, registry))

    t_cold = timed(cold, repeat)
    ex = Executor(registry)
    graph = parse(make(n))
    report = validate(graph, registry)
    result = ex.execute(graph, report)
    assert result.ok and len(result.executed) == n
    t_cached = timed(lambda: ex.execute(graph, report), repeat)
    again = ex.execute(graph, report)
    assert not again.executed, "cached rerun executed nodes"

    def full_cached():  # what a resubmitted identical workflow costs end to end
        g = parse(make(n))
        ex.execute(g, validate(g, registry))

    t_full_cached = timed(full_cached, repeat)
    return {"shape": name, "nodes": n, "validate_ms": t_validate * 1e3, "cold_ms": t_cold * 1e3,
            "cold_us_per_node": (t_cold - t_validate) / n * 1e6,
            "cached_ms": t_cached * 1e3, "resubmit_cached_ms": t_full_cached * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    rows = [bench("chain", chain, args.nodes, args.repeat), bench("fan-out", fan_out, args.nodes, args.repeat)]
    print(f"{'shape':8} {'nodes':>6} {'validate ms':>12} {'cold ms':>9} {'exec µs/node':>13} "
          f"{'cached rerun ms':>16} {'parse+validate+cached ms':>25}")
    for r in rows:
        print(f"{r['shape']:8} {r['nodes']:>6} {r['validate_ms']:>12.2f} {r['cold_ms']:>9.2f} "
              f"{r['cold_us_per_node']:>13.1f} {r['cached_ms']:>16.2f} {r['resubmit_cached_ms']:>25.2f}")
    worst_node = max(r["cold_us_per_node"] for r in rows)
    worst_cached = max(r["cached_ms"] for r in rows)
    print(f"\nengine overhead per node (cold, excluding validation): {worst_node:.1f} µs (target < 50)")
    print(f"fully cached rerun of {args.nodes} nodes: {worst_cached:.2f} ms (target < 5)")


if __name__ == "__main__":
    main()
