"""Tuning over TVM RPC: wall time of the same trials on one server and on two, against the
local tuner. Starts its own tracker and three servers on the loopback interface (key ``one``:
one server, key ``two``: two), tunes each model from an empty cache with the whole-model check
off, alternating the setups, and stops everything it started.

Run from the repo root:  PYTHONPATH=. python benchmarks/rpc_tune.py [--repeats N] [--pin]
Writes benchmarks/results/rpc_tune.json and .md (rpc_tune_pinned.* with --pin).

On one machine the servers share its cores with each other and with the build: the wall time
shows what running trials at once buys (each trial's timing loop lasts a fixed ~0.3 s,
whatever the load), the kernel times measured in parallel are not those of a quiet board.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests"))
from bench_host import publish  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], procs: list, core: int | None = None) -> None:
    """``python -m ARGS`` in its own process group; with ``core``, pinned to that core with
    one TVM thread (a single-core board)."""
    from sparsec.targets import physical_cores

    # the local tuner runs kernels on every core (sparsec sets TVM_NUM_THREADS); a server
    # left to TVM's default would use half of them on x86
    prefix, env = [], {**os.environ, "TVM_NUM_THREADS": str(physical_cores())}
    if core is not None:
        prefix, env["TVM_NUM_THREADS"] = ["taskset", "-c", str(core)], "1"
    procs.append(subprocess.Popen([*prefix, sys.executable, "-m", *args], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pin", action="store_true",
                    help="pin each server to its own core with one TVM thread (single-core "
                         "boards; the build still shares both cores)")
    args = ap.parse_args(argv)

    import onnx
    from test_tuning import small_net

    from sparsec.remote import Remote, devices
    from sparsec.targets import resolve_target, tuning

    models = {"digits_cnn": onnx.load(str(REPO / "examples" / "digits_cnn.onnx")),
              "test net (tests/test_tuning.py)": small_net()}
    host = resolve_target("host")
    procs: list[subprocess.Popen] = []
    port = free_port()
    address = f"127.0.0.1:{port}"
    try:
        start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
               "--port-end", str(port + 1)], procs)
        for core, key in enumerate(("one", "two", "two")):
            p = free_port()
            start(["tvm.exec.rpc_server", "--tracker", address, "--key", key, "--host",
                   "127.0.0.1", "--port", str(p), "--port-end", str(p + 1)], procs,
                  core=max(core - 1, 0) if args.pin else None)
        end = time.monotonic() + 120
        while time.monotonic() < end:
            try:
                have = {r["key"]: r["free"] for r in devices(address)}
            except Exception:  # noqa: BLE001 - the tracker is starting
                have = {}
            if have == {"one": 1, "two": 2}:
                break
            time.sleep(0.5)
        else:
            raise SystemExit("the servers did not register")
        setups = {"here": None, "1 server": Remote.of(address, "one"),
                  "2 servers": Remote.of(address, "two")}
        results = {}
        for name, model in models.items():
            walls: dict[str, list[float]] = {s: [] for s in setups}
            picks: dict[str, list[dict]] = {s: [] for s in setups}
            trials = 0
            for _ in range(args.repeats):
                for setup, remote in setups.items():
                    with tempfile.TemporaryDirectory() as tmp:
                        cache = tuning.Cache(Path(tmp) / "tuning.json")
                        t0 = time.monotonic()
                        records = tuning.tune(model, host, 600, cache=cache,
                                              log=lambda s: None, check=False, remote=remote)
                        walls[setup].append(time.monotonic() - t0)
                    trials = sum(len(r["ms"]) for r in records)
                    picks[setup].append({json.dumps([r["strategy"], r.get("shape"),
                                                     r.get("alternatives")]):
                                         r.get("knobs", r.get("choice")) for r in records})
            results[name] = {"trials": trials, "wall_s": walls, "picks": picks}
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()

    how = ("each server pinned to one core with one TVM thread (the local tune: 2 threads)"
           if args.pin else "servers unpinned, as many TVM threads as the local tune")
    setup = "pinned" if args.pin else "shared cores"
    lines = [f"## Tuning over TVM RPC: one server against two ({setup})",
             "", f"{os.cpu_count()} cores; tracker, servers and build on this machine, {how}; "
             f"median (min-max) wall seconds of `tune` from an empty cache over "
             f"{args.repeats} alternating runs, the whole-model check off. Same picks: the "
             "share of kernels whose recorded knobs (or strategy choice) equal the local "
             "tune's in the same round (here: the local tune of the next round, the noise "
             "floor).", "",
             "| model | trials | here | 1 server | 2 servers | 1 / 2 servers | same picks: here "
             "(next round) | 1 server | 2 servers |", "| --- | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: | ---: |"]
    for name, r in results.items():
        w = r["wall_s"]

        def cell(s: str) -> str:
            return f"{statistics.median(w[s]):.1f} ({min(w[s]):.1f}-{max(w[s]):.1f})"

        def same(s: str) -> str:
            here = r["picks"]["here"]
            others = here[1:] + here[:1] if s == "here" else r["picks"][s]
            agree = [sum(local.get(k) == v for k, v in other.items()) / max(len(other), 1)
                     for local, other in zip(here, others)]
            return f"{100 * statistics.mean(agree):.0f} %"

        ratio = statistics.median(w["1 server"]) / statistics.median(w["2 servers"])
        lines.append(f"| {name} | {r['trials']} | {cell('here')} | {cell('1 server')} | "
                     f"{cell('2 servers')} | {ratio:.2f}x | {same('here')} | "
                     f"{same('1 server')} | {same('2 servers')} |")
    publish("rpc_tune_pinned" if args.pin else "rpc_tune", results, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
