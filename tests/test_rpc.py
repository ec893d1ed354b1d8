"""Remote devices through TVM's RPC tracker, without hardware: the tests start TVM's own tracker
and two device servers on the loopback interface (``python -m tvm.exec.rpc_tracker`` /
``rpc_server``, host packages), and stop every process they started, whatever happens.

Covered: devices listing, validate and run over RPC (``via: rpc:KEY``), a wrong key and an
unreachable tracker (one-line errors with their exit codes, nothing written), and a tune over
both servers that loses one of them midway and still completes with every record kept.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES
from test_tuning import small_net

from sparsec import cli
from sparsec import remote as remote_mod
from sparsec.errors import DeviceUnreachableError
from sparsec.remote import Remote, devices

KEY = "sparsec-test"
START_TIMEOUT = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Farm:
    """A tracker and device servers, each in its own process group (a server forks a worker
    and a process per session: killing the group stops them all)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", *args], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def start_tracker(self) -> None:
        self._spawn("tracker", ["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                                str(self.port), "--port-end", str(self.port + 1)])

    def start_server(self, name: str) -> None:
        port = free_port()
        self._spawn(name, ["tvm.exec.rpc_server", "--tracker", self.address, "--key", KEY,
                           "--host", "127.0.0.1", "--port", str(port), "--port-end",
                           str(port + 1)])

    def wait_for(self, servers: int) -> dict:
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            try:
                rows = [r for r in devices(self.address) if r["key"] == KEY]
            except DeviceUnreachableError:     # the tracker is still starting
                rows = []
            if rows and rows[0]["servers"] == servers and rows[0]["free"] == servers:
                return rows[0]
            time.sleep(0.3)
        raise RuntimeError(f"{servers} servers did not register: "
                           + " ".join(self.log(n) for n in self.procs))

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self) -> None:
        for name in list(self.procs):
            try:
                self.kill(name)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()[-500:]


@pytest.fixture(scope="module")
def farm(request, tmp_path_factory):
    farm = Farm(tmp_path_factory.mktemp("rpc"))
    request.addfinalizer(farm.stop)
    farm.start_tracker()
    for name in ("a", "b"):
        farm.start_server(name)
    farm.wait_for(2)
    return farm


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    import sparsec

    out = tmp_path_factory.mktemp("pkg") / "digits"
    sparsec.compile(EXAMPLES / "digits_cnn.onnx", out, ratio=0.25,
                    keep_onnx=True)    # validate on new inputs: ONNX Runtime needs the model
    return out


def main(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("sparsec-rpc-*")}


def test_devices_lists_keys_with_free_and_busy(farm, capsys):
    code, out, _ = main(capsys, "devices", "--rpc", farm.address)
    assert code == 0
    [row] = [ln.split() for ln in out.splitlines() if ln.startswith(KEY)]
    assert row == [KEY, "2", "2", "0", "0"]           # servers, free, busy, pending
    session = Remote.of(farm.address, KEY).session()   # one taken: busy
    try:
        code, out, _ = main(capsys, "devices", "--rpc", farm.address, "--json")
        assert json.loads(out) == [{"key": KEY, "servers": 2, "free": 1, "busy": 1,
                                    "pending": 0}]
    finally:
        del session
    farm.wait_for(2)


def test_validate_and_run_over_rpc(farm, package, capsys, tmp_path):
    import sparsec

    before = sorted((p.name, p.stat().st_mtime_ns) for p in package.rglob("*"))
    temps = leftovers()
    code, out, err = main(capsys, "validate", package, "--rpc", farm.address, "--key", KEY)
    assert code == 0, err
    assert any(ln.startswith(f"via: rpc:{KEY};") for ln in out.splitlines())
    assert "library matches ONNX Runtime" in out
    report = sparsec.validate(package, rpc=farm.address, key=KEY, seed=3)
    assert report.ok and report.via == f"rpc:{KEY}" and report.max_abs_err < 1e-4
    # the device's outputs are the library's: equal to running it here
    feeds = {"image": np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype("float32")}
    there = sparsec.run(package, feeds, rpc=farm.address, key=KEY)
    here = sparsec.run(package, feeds)
    assert list(there) == list(here) == ["linear"]
    np.testing.assert_allclose(there["linear"], here["linear"], rtol=1e-6, atol=1e-6)
    np.savez(tmp_path / "x.npz", **feeds)
    code, out, err = main(capsys, "run", package, "--inputs", tmp_path / "x.npz", "--outputs",
                          tmp_path / "y.npz", "--rpc", farm.address, "--key", KEY)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "y.npz")["linear"], there["linear"])
    assert sorted((p.name, p.stat().st_mtime_ns) for p in package.rglob("*")) == before
    assert leftovers() == temps
    farm.wait_for(2)      # every session given back


def test_wrong_key_and_unreachable_tracker(farm, package, capsys, tmp_path):
    out_file = tmp_path / "y.npz"
    np.savez(tmp_path / "x.npz", image=np.zeros((1, 1, 8, 8), "float32"))
    code, out, err = main(capsys, "run", package, "--inputs", tmp_path / "x.npz", "--outputs",
                          out_file, "--rpc", farm.address, "--key", "rasp4")
    assert code == DeviceUnreachableError.exit_code == 12
    assert err.count("\n") == 1 and "no device server under key 'rasp4'" in err
    assert f"keys there: {KEY}" in err and not out_file.exists()
    # nothing waits at the tracker for the wrong key
    assert [r["key"] for r in devices(farm.address)] == [KEY]
    dead = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    code, _, err = main(capsys, "validate", package, "--rpc", dead, "--key", KEY)
    assert code == 12 and f"cannot reach the RPC tracker at {dead}" in err
    assert time.monotonic() - t0 < 10
    cache = tmp_path / "tuning.json"
    os.environ["SPARSEC_TUNING_CACHE"] = str(cache)
    try:
        code, _, err = main(capsys, "tune", EXAMPLES / "digits_cnn.onnx", "--rpc", dead,
                            "--key", KEY)
    finally:
        del os.environ["SPARSEC_TUNING_CACHE"]
    assert code == 12 and "cannot reach" in err and not cache.exists()
    code, _, err = main(capsys, "devices", "--rpc", "nohost")
    assert code == 6 and "HOST:PORT" in err
    code, _, err = main(capsys, "validate", package, "--key", KEY)
    assert code == 6 and "--rpc" in err


def test_compile_tunes_over_rpc(farm, tmp_path, monkeypatch, capsys):
    """compile --tune --rpc: the kernels and the whole model are timed on the servers, the
    records land under the package's target, and the package is built and checked."""
    from sparsec.targets import resolve_target, tuning

    cache_file = tmp_path / "tuning.json"
    monkeypatch.setenv("SPARSEC_TUNING_CACHE", str(cache_file))
    out = tmp_path / "pkg"
    code, _, err = main(capsys, "compile", EXAMPLES / "digits_cnn.onnx", "-o", out, "--tune",
                        "60", "--rpc", farm.address, "--key", KEY)
    assert code == 0, err
    assert "2 at once" in err and "whole model:" in err     # both timed on the devices
    key = tuning.target_key(dict(resolve_target("host").tvm_target))
    entries = json.loads(cache_file.read_text())[key].values()
    # the stride-2 conv's 8 width tiles; the two width-vectorized convs' 2 kernels each
    assert sorted(len(e["ms"]) for e in entries) == [2, 2, 8] and (out / "model.so").is_file()
    farm.wait_for(2)


def test_tune_on_two_servers_survives_losing_one(farm, tmp_path, monkeypatch):
    """Both servers time trials at once; server b is killed once the first record is written:
    its trial goes to a, the tune completes with every record, and compile builds them."""
    import tvm

    from sparsec.targets import resolve_target, tuning
    from sparsec.targets.host import compile_onnx

    cache_file = tmp_path / "tuning.json"
    monkeypatch.setenv("SPARSEC_TUNING_CACHE", str(cache_file))
    host = resolve_target("host")
    model = small_net()
    logs: list[str] = []
    on_disk_at_kill = []

    def log(line: str) -> None:
        logs.append(line)
        if line.startswith("  [1/") and not on_disk_at_kill:
            on_disk_at_kill.append(json.loads(cache_file.read_text()))
            farm.kill("b")

    # Whether b's device thread meets its dead server depends on who takes the next batch:
    # after the kill, a library load waits (up to 3 s) until some device has failed over, so
    # b's thread, polling the queue, takes a batch while a's holds one, and fails on it
    load = remote_mod.KernelTimer._load

    def load_after_a_failover(sess, path):
        end = time.monotonic() + 3
        while (on_disk_at_kill and time.monotonic() < end
               and not any("goes to another" in ln for ln in logs)):
            time.sleep(0.05)
        return load(sess, path)

    monkeypatch.setattr(remote_mod.KernelTimer, "_load", staticmethod(load_after_a_failover))
    remote = Remote.of(farm.address, KEY, timeout=30)
    t0 = time.monotonic()
    records = tuning.tune(model, host, budget_s=120, log=log, check=False, remote=remote)
    assert time.monotonic() - t0 < 60
    assert any("2 at once" in ln for ln in logs)
    [timed] = [ln for ln in logs if "trials timed by each device thread" in ln]
    per_device = [int(n) for n in timed.split(":")[-1].split(",")]
    # two device threads worked at once; under load b may not have finished a trial before
    # a's first record triggered the kill, so b's count may be 0 (CI saw [0, 20])
    assert len(per_device) == 2 and max(per_device) >= 1
    # the lost server was noticed: its batch failed over to a, or (its thread still waiting
    # for a session from the tracker when b died) the thread gave up on it
    assert any(("failed" in ln and "goes to another" in ln) or "one device fewer" in ln
               for ln in logs), "\n".join(logs)
    # the first record was on disk before the kill, and none was lost after it
    [entries] = on_disk_at_kill[0].values()
    assert len(entries) == 1
    kernels = [r for r in records if r["strategy"] != "choice"]
    choices = [r for r in records if r["strategy"] == "choice"]
    assert sorted(r["strategy"] for r in kernels) == ["conv1x1_nchw", "conv1x1_nchw",
                                                      "dense_packed", "depthwise_nchw"]
    assert len(choices) == 2
    for r in kernels:      # every variant timed (the lost trial too), the fastest kept
        with tvm.target.Target(dict(host.tvm_target)):
            assert len(r["ms"]) == len(tuning._variants(r["strategy"], r["shape"]))
        assert r["ms"][json.dumps(r["knobs"], sort_keys=True)] == min(r["ms"].values())
    data = json.loads(cache_file.read_text())
    assert list(data) == [tuning.target_key(dict(host.tvm_target))]   # under the target
    assert len(data[tuning.target_key(dict(host.tvm_target))]) == 6
    facts = compile_onnx(model, host, tmp_path / "m.so", log=lambda s: None)
    convs = [d for d in facts["decisions"] if d["shape"].get("weight", [0, 0, 0])[2:] == [1, 1]]
    assert sorted(d["chosen"] for d in convs) == sorted(c["choice"] for c in choices)
    assert all(d["chosen_by"] == "measurement" for d in convs)
    assert all("tuned" in d for d in facts["decisions"]
               if d["chosen"] in ("conv1x1_nchw", "dense_packed", "depthwise_nchw"))
    # (the tracker's view afterwards, one free server, is not asserted: how soon it drops the
    # killed server and frees the other depends on garbage collection and load, and CI once
    # waited 90 s for it after every assertion above had passed)
