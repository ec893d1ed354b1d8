"""Remote devices through TVM's RPC tracker: run, validate and tune on boards that a tracker
hands out by key, with TVM's own RPC (``tvm.rpc``); sparsec adds no protocol of its own.

A device runs TVM's RPC server registered with a tracker under a key (``python -m
tvm.exec.rpc_server --tracker HOST:PORT --key rasp4``, or TVM's C++ ``rpc_server`` where the
device has no Python); ``--rpc HOST:PORT --key rasp4`` then asks the tracker for one such
server, uploads a library to it (``RPCSession.upload``), loads it there and runs or times it
(Relax VM over RPC, ``time_evaluator``). What is uploaded lives in the server's per-session
work directory, which the server removes when the session ends; nothing is written here
except the kernel libraries of a tune, in a temporary directory that is removed.

Errors: ``DeviceUnreachableError`` when there is no device to run on (the tracker does not
answer, no server is registered under the key, none became free in time), ``RemoteError``
when a device failed during the run and no other could finish it.

Tuning (:class:`KernelTimer`): one thread per server registered under the key, each holding
its own session and pulling kernel trials from one queue, a few variants of a kernel at a time
built here into one library (one compile at a time, one link and one upload for them all) and
timed there. Trials whose server drops out go back on the queue for another; the thread that
lost its server asks the tracker for a new one.
"""

from __future__ import annotations

import itertools
import os
import queue
import socket
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from sparsec.errors import BadOptionError, DeviceUnreachableError, RemoteError

if TYPE_CHECKING:
    import numpy as np

    from sparsec.targets import TargetSpec

#: seconds to wait for a free server under the key before giving up (``--rpc-timeout``)
DEFAULT_TIMEOUT = 60.0
#: seconds to wait for the tracker to accept a connection
CONNECT_TIMEOUT = 5.0
#: tries of one kernel trial on different servers before it counts as failed
TRIAL_ATTEMPTS = 3


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv6 host in brackets: ``[::1]:9190``) -> (host, port)."""
    host, sep, port = str(text).strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadOptionError(f"--rpc takes the tracker's address as HOST:PORT, got '{text}'")
    return host, int(port)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # TVM errors carry a traceback first; the last line says what happened
    return (lines[-1] if lines else type(e).__name__)[:200]


@dataclass(frozen=True)
class Remote:
    """Where to run: a tracker's address and the key of the devices to ask it for."""

    host: str
    port: int
    key: str
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def of(cls, rpc: str | None, key: str | None, timeout: float | None = None
           ) -> "Remote | None":
        """The ``rpc=`` / ``key=`` keywords (``--rpc`` / ``--key``) as a Remote; None when
        ``rpc`` is not given. A key without a tracker, or a tracker without a key, is an
        error."""
        if rpc is None:
            if key is not None:
                raise BadOptionError("--key names the devices to ask a tracker for: give "
                                     "--rpc HOST:PORT too")
            return None
        if not key:
            raise BadOptionError("--rpc needs --key: the key the device servers registered "
                                 "under (`sparsec devices --rpc HOST:PORT` lists them)")
        if timeout is not None and timeout <= 0:
            raise BadOptionError(f"--rpc-timeout takes a positive number of seconds, got "
                                 f"{timeout:g}")
        host, port = parse_address(rpc)
        return cls(host, port, key, DEFAULT_TIMEOUT if timeout is None else timeout)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def via(self) -> str:
        """How a report says the library ran: ``rpc:KEY``."""
        return f"rpc:{self.key}"

    def check(self) -> dict:
        """The tracker answers and has servers under the key (its :func:`devices` line), or
        ``DeviceUnreachableError`` saying what it has: called before any heavy work."""
        rows = devices(self.address)
        for row in rows:
            if row["key"] == self.key and row["servers"]:
                return row
        keys = [r["key"] for r in rows if r["servers"]]
        have = f"keys there: {', '.join(keys)}" if keys else "no server is registered"
        raise DeviceUnreachableError(f"no device server under key '{self.key}' at tracker "
                                     f"{self.address} ({have})")

    def session(self, wait: float | None = None):
        """An RPC session on a server under this key, waiting up to ``wait`` seconds (default
        ``timeout``) for one to be free. ``DeviceUnreachableError`` when the tracker does not
        answer, no server is registered under the key, or none became free in time."""
        wait = self.timeout if wait is None else wait
        row = self.check()
        tracker = _tracker(self.host, self.port)
        try:
            tracker._sock.settimeout(wait)    # the request blocks until a server is free
            return tracker.request(self.key, max_retry=1)
        except Exception as e:  # noqa: BLE001 - TVM raises RuntimeError for all of them
            if "timed out" in str(e):
                raise DeviceUnreachableError(
                    f"no server under key '{self.key}' at {self.address} became free within "
                    f"{wait:g} s ({row['servers']} registered, {row['busy']} busy)") from None
            raise DeviceUnreachableError(f"cannot get a session on key '{self.key}' from "
                                         f"{self.address}: {_first_line(e)}") from None
        finally:
            tracker.close()


def _tracker(host: str, port: int):
    """A connection to the tracker at host:port (``tvm.rpc.connect_tracker``), failing fast:
    TVM's own connect retries a refused connection for a minute."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        if isinstance(e, socket.timeout):
            why = f"no answer within {CONNECT_TIMEOUT:g} s"
        raise DeviceUnreachableError(f"cannot reach the RPC tracker at {host}:{port} "
                                     f"({why})") from None
    from tvm import rpc

    with _CONNECT_LOCK:   # a peer that accepts and never answers must not hang us
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(CONNECT_TIMEOUT)
        try:
            tracker = rpc.connect_tracker(host, port)
        except Exception:  # noqa: BLE001 - not a tracker, or it went away
            raise DeviceUnreachableError(f"{host}:{port} does not answer as an RPC tracker") \
                from None
        finally:
            socket.setdefaulttimeout(old)
    return tracker


_CONNECT_LOCK = threading.Lock()


def devices(address: str) -> list[dict]:
    """What the tracker at ``address`` (HOST:PORT) has: per key, the servers registered, how
    many are free and busy, and the requests waiting (sorted by key)."""
    tracker = _tracker(*parse_address(address))
    try:
        summary = tracker.summary()
    except Exception as e:  # noqa: BLE001
        raise DeviceUnreachableError(f"the RPC tracker at {address} did not answer "
                                     f"({_first_line(e)})") from None
    finally:
        tracker.close()
    servers: dict[str, int] = {}
    for info in summary.get("server_info", []):
        key = str(info.get("key", "")).split(":", 1)[-1]    # "server:rasp4"
        servers[key] = servers.get(key, 0) + 1
    queues = summary.get("queue_info", {})
    rows = []
    for key in sorted(set(servers) | set(queues)):
        q = queues.get(key, {})
        n, free = servers.get(key, 0), int(q.get("free", 0))
        if n or q.get("pending"):
            rows.append({"key": key, "servers": n, "free": free, "busy": max(n - free, 0),
                         "pending": int(q.get("pending", 0))})
    return rows


# --------------------------------------------------------------------------- running a package


class RemoteRunner:
    """``backend.Runner``'s interface for a package library on a remote device: uploaded and
    loaded into a Relax VM there once; each ``run`` sends the inputs and fetches the outputs.
    A server that drops out is replaced once by another under the key."""

    def __init__(self, remote: Remote, lib_path: str | os.PathLike,
                 input_names: Sequence[str]) -> None:
        self.remote = remote
        self.lib_path = Path(lib_path)
        self.input_names = list(input_names)
        self.via = remote.via
        self._sess = self._vm = self._dev = None

    def _open(self) -> None:
        from tvm import relax

        self._sess = self.remote.session()
        name = f"sparsec-{os.getpid()}-{self.lib_path.name}"
        self._sess.upload(str(self.lib_path), name)
        lib = self._sess.load_module(name)
        self._sess.remove(name)     # loaded; the server's session directory goes at its end
        self._dev = self._sess.cpu()
        self._vm = relax.VirtualMachine(lib, self._dev)

    def _run_once(self, inputs: dict) -> list:
        import numpy as np
        import tvm

        from sparsec.targets.backend import _flatten

        if self._vm is None:
            self._open()
        args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[n]), self._dev)
                for n in self.input_names]
        self._vm.set_input("main", *args)      # the VM's calling convention over RPC
        self._vm.invoke_stateful("main")
        return [t.numpy() for t in _flatten(_outputs(self._vm))]

    def run(self, inputs: dict[str, "np.ndarray"]) -> list["np.ndarray"]:
        """Run once; ``inputs`` keyed by ONNX input name; outputs in ONNX graph order."""
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise KeyError(f"missing input(s): {', '.join(missing)}")
        for attempt in (1, 2):
            try:
                return self._run_once(inputs)
            except DeviceUnreachableError:
                raise
            except Exception as e:  # noqa: BLE001 - the session, or the library, failed there
                self.close()
                if attempt == 2 or not _session_lost(e):
                    raise RemoteError(f"the library failed on a device under key "
                                      f"'{self.remote.key}' ({_first_line(e)})") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._vm = self._dev = self._sess = None     # the session ends with its last reference


def _outputs(vm, idx: tuple = ()):
    """``VirtualMachine.get_outputs("main")`` without its reference cycle (a closure that
    calls itself), which kept the VM, and so the device's session, alive until the next
    garbage collection."""
    arity = vm["get_output_arity"]("main", *idx)
    if arity == -1:
        return vm["get_output"]("main", *idx)
    return tuple(_outputs(vm, idx + (i,)) for i in range(arity))


def _session_lost(e: BaseException) -> bool:
    """Whether an error from an RPC call says the connection to the server is gone (rather
    than that the remote code failed)."""
    text = str(e).lower()
    return any(w in text for w in ("socket", "connection", "closed", "broken pipe",
                                   "timeout", "reset", "shutdown"))


# --------------------------------------------------------------------------- tuning


class KernelTimer:
    """Times kernel trials ``(strategy, shape, knobs)`` on every server under the key at once.

    Used as a context manager around one tune: entering starts a worker thread per server the
    tracker has under the key (each asks for its own session); :meth:`run` feeds it jobs (a
    kernel's trials) and yields each job's timings as it completes, so that its record can be
    written at once. A trial whose server drops out is queued again for another server."""

    def __init__(self, remote: Remote, target: "TargetSpec",
                 log: Callable[[str], None] = print, min_ms: float = 50.0) -> None:
        self.remote, self.target, self.log, self.min_ms = remote, target, log, min_ms
        self._tasks: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._build_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.timed: list[int] = []
        self._alive = 0
        self._alive_lock = threading.Lock()
        self._names = itertools.count()
        self._work: tempfile.TemporaryDirectory | None = None

    @property
    def workers(self) -> int:
        return len(self._threads)

    def __enter__(self) -> "KernelTimer":
        row = self.remote.check()
        self._work = tempfile.TemporaryDirectory(prefix="sparsec-rpc-")
        self._alive = row["servers"]
        self.timed = [0] * row["servers"]      # trials timed per worker (per device)
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True,
                                          name=f"sparsec-rpc-{i}")
                         for i in range(row["servers"])]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.timed:
            self.log(f"  trials timed by each device thread (key '{self.remote.key}'): "
                     f"{', '.join(map(str, self.timed))}")
        self._stop.set()
        for _ in self._threads:
            self._tasks.put(None)
        for t in self._threads:
            t.join(timeout=10)     # one waiting for a session notices the stop within 1 s
        if self._work is not None:
            self._work.cleanup()
            self._work = None

    # ---- the coordinator's side (the calling thread)

    def run(self, jobs: Sequence[Sequence[tuple[str, dict, dict | None]]], deadline: float,
            step: Callable[[int], None] = lambda job: None
            ) -> Iterator[tuple[int, list[float | None]]]:
        """Yield ``(job index, [ms or None per trial])`` as each job completes (a trial that
        could not be built or timed is None, its error logged). A job is started only before
        ``deadline`` (``time.monotonic()``); a job started is finished. ``step(job)`` is
        called after each trial."""
        pending = {}                       # job -> [result per trial]
        left = {}                          # job -> trials not finished
        next_job = 0
        while next_job < len(jobs) or pending:
            # keep every worker busy: start jobs while fewer trials than workers are queued
            while (next_job < len(jobs) and self._tasks.qsize() < max(self.workers, 1)
                   and time.monotonic() <= deadline):
                trials = jobs[next_job]
                pending[next_job] = [None] * len(trials)
                left[next_job] = len(trials)
                # one library per chunk: a worker builds and uploads it once for several
                # variants (the link costs as much as the compile), every worker gets one
                chunks = max(1, min(len(trials), self.workers))
                for c in range(chunks):
                    idx = list(range(c, len(trials), chunks))
                    if idx:
                        self._tasks.put((next_job, [(t, trials[t]) for t in idx], 0))
                next_job += 1
            if not pending:
                return                       # the budget is spent
            try:
                item = self._results.get(timeout=1.0)
            except queue.Empty:
                if self._alive <= 0:
                    raise RemoteError(f"every device under key '{self.remote.key}' at "
                                      f"{self.remote.address} dropped out of the tune") from None
                continue
            kind = item[0]
            if kind == "note":
                self.log(f"  {item[1]}")
                continue
            _, job, t, ms, err = item
            if err is not None:
                strategy, _, knobs = jobs[job][t]
                self.log(f"  {strategy} {knobs}: {err}")
            pending[job][t] = ms
            left[job] -= 1
            step(job)
            if left[job] == 0:
                left.pop(job)
                yield job, pending.pop(job)

    # ---- the workers' side

    def _worker(self, wid: int) -> None:
        """Hold a session and time trials from the queue with it; a worker without a session
        takes no trial (it asks the tracker for another server while the others go on)."""
        sess = None
        try:
            while not self._stop.is_set():
                if sess is None:
                    sess = self._session()
                    if sess is None:
                        if not self._stop.is_set():
                            self._results.put(("note", f"no server under key "
                                                       f"'{self.remote.key}' became free "
                                                       f"within {self.remote.timeout:g} s: "
                                                       f"one device fewer"))
                        return
                try:
                    task = self._tasks.get(timeout=0.5)
                except queue.Empty:
                    continue
                if task is None:
                    return
                job, batch, attempts = task
                try:
                    path, funcs = self._build([trial for _, trial in batch])
                except Exception as e:  # noqa: BLE001 - a variant TVM cannot build
                    if len(batch) > 1:      # find which: each alone
                        for one in batch:
                            self._tasks.put((job, [one], attempts))
                    else:
                        self._results.put(("done", job, batch[0][0], None,
                                           f"{type(e).__name__}: {_first_line(e)[:80]}"))
                    continue
                done = 0
                try:
                    mod, dev = self._load(sess, path)
                    for i, (t, _) in enumerate(batch):
                        ms = self._time(mod, dev, f"k{i}", funcs[i])
                        done += 1
                        self.timed[wid] += 1
                        self._results.put(("done", job, t, ms, None))
                except Exception as e:  # noqa: BLE001 - the server dropped, or the kernel
                    sess = None
                    batch = batch[done:]       # what this device did not time
                    strategy, _, knobs = batch[0][1]
                    if attempts + 1 >= TRIAL_ATTEMPTS:
                        for t, _ in batch:
                            self._results.put(("done", job, t, None, f"failed on "
                                               f"{TRIAL_ATTEMPTS} devices: "
                                               f"{_first_line(e)[:80]}"))
                    else:
                        self._results.put(("note", f"a device under key '{self.remote.key}' "
                                                   f"failed ({_first_line(e)[:100]}); "
                                                   f"{strategy} {knobs} goes to another"))
                        self._tasks.put((job, batch, attempts + 1))
                    continue
                finally:
                    Path(path).unlink(missing_ok=True)
        finally:
            with self._alive_lock:
                self._alive -= 1

    def _session(self):
        """A session for a worker, asking the tracker every second (so that a stop is seen)
        until ``remote.timeout``; None if none came."""
        end = time.monotonic() + self.remote.timeout
        while not self._stop.is_set() and time.monotonic() < end:
            try:
                return self.remote.session(wait=min(1.0, self.remote.timeout))
            except DeviceUnreachableError:
                time.sleep(0.2)
        return None

    def _build(self, trials: list[tuple[str, dict, dict | None]]):
        """One library holding each trial's kernel as ``k0``, ``k1``, ...; returns its path
        and the PrimFuncs."""
        import tvm

        from sparsec.targets.backend import export_library
        from sparsec.targets.knobs import build
        from sparsec.targets.scratch import tir_pipeline

        with self._build_lock:    # one TVM compile at a time (not known to be thread-safe)
            target = tvm.target.Target(dict(self.target.tvm_target))
            with target:     # the tiles depend on the ISA (as when the model is compiled)
                funcs = [build(strategy, shape, knobs) for strategy, shape, knobs in trials]
            mod = tvm.IRModule({f"k{i}": f.with_attr("global_symbol", f"k{i}")
                                for i, f in enumerate(funcs)})
            ex = tvm.compile(mod, target=target, tir_pipeline=tir_pipeline())
            path = Path(self._work.name) / f"k{next(self._names)}.so"
        export_library(ex, self.target, path)     # the link, a subprocess: in parallel
        return path, funcs

    @staticmethod
    def _load(sess, path: Path):
        sess.upload(str(path), path.name)
        mod = sess.load_module(path.name)
        sess.remove(path.name)
        return mod, sess.cpu()

    def _time(self, mod, dev, name: str, func) -> float:
        """Median ms of one call of the kernel ``name`` of a loaded library on ``dev``."""
        import tvm

        from sparsec.targets.tuning import _random_args, time_module

        args = [tvm.runtime.tensor(a.numpy(), dev) for a in _random_args(func)]
        return time_module(mod, dev, args, self.min_ms, name)


def whole_model_ms(remote: Remote, libs: dict[str, Path], feeds: dict, input_names: list[str],
                   rounds: int = 3) -> dict[str, float]:
    """Median ms of one call of each library (a compiled model) on one device under the key,
    timed in alternating rounds (as ``tuning.interleaved_ms`` does here); one retry on
    another device if the first drops out."""
    import numpy as np
    import tvm
    from tvm import relax

    for attempt in (1, 2):
        try:
            sess = remote.session()
            dev = sess.cpu()
            vms = {}
            for label, path in libs.items():
                name = f"sparsec-{os.getpid()}-{label}.so"
                sess.upload(str(path), name)
                vm = relax.VirtualMachine(sess.load_module(name), dev)
                sess.remove(name)
                vm.set_input("main", *[tvm.runtime.tensor(np.ascontiguousarray(feeds[n]), dev)
                                       for n in input_names])
                vms[label] = vm
            times: dict[str, list[float]] = {k: [] for k in vms}
            for _ in range(rounds):
                for label, vm in vms.items():
                    res = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=5,
                                            min_repeat_ms=200)("main")
                    times[label].extend(res.results)
            return {k: statistics.median(v) * 1e3 for k, v in times.items()}
        except DeviceUnreachableError:
            raise
        except Exception as e:  # noqa: BLE001
            if attempt == 2:
                raise RemoteError(f"timing the whole model on key '{remote.key}' failed "
                                  f"({_first_line(e)})") from None
    raise AssertionError("unreachable")

