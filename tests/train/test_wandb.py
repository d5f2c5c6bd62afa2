"""W&B mirroring of metrics.jsonl: an offline run end to end (config and every logged metric
read back from the run's .wandb file), no network in offline mode, clear errors."""

import glob
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import pytest
import wandb
from wandb.proto import wandb_internal_pb2

from nested_learning.train import metrics as metrics_mod
from nested_learning.train.loop import run
from nested_learning.train.metrics import MetricsLog
from tests.train.conftest import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _restore_wandb_env(monkeypatch):
    """MetricsLog sets WANDB_MODE and WANDB_ERROR_REPORTING for the process: undone after each test."""
    for k in ("WANDB_MODE", "WANDB_ERROR_REPORTING", "WANDB_SILENT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def read_wandb_records(path: str, growing: bool = False) -> list:
    """The protobuf Records of a run-*.wandb file: a 7-byte header (":W&B", 0xBEE1, version 0)
    then LevelDB log blocks of 32 KiB, each record split into chunks with a 7-byte header
    (crc32 of the type byte and data, length, type: 1 full, 2 first, 3 middle, 4 last).
    wandb 0.31 no longer ships a Python reader of its own files. growing: the file may still be
    being written (its last chunk half there): stop at the first chunk that does not check."""
    with open(path, "rb") as f:
        data = f.read()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        crc, n, typ = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and typ == 0:
            break
        chunk = data[pos + 7:pos + 7 + n]
        if growing and zlib.crc32(chunk, zlib.crc32(bytes([typ]))) != crc:
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([typ]))) == crc, f"corrupt record at byte {pos}"
        pos += 7 + n
        buf = chunk if typ in (1, 2) else buf + chunk
        if typ in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _nested(items) -> dict:
    """{key or nested-key path: value} of config/history items into a nested dict."""
    out = {}
    for it in items:
        path = list(it.nested_key) or [it.key]
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = json.loads(it.value_json)
    return out


def offline_run(out_dir: str) -> tuple[dict, dict[int, dict]]:
    """(config, {step: history row}) of the one offline run under out_dir/wandb/."""
    files = glob.glob(os.path.join(out_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1, files
    # the file is complete once it holds the run's exit record: wandb's service process may still be
    # writing it when run.finish() returns (a loaded machine once read 4 of 6 history rows)
    deadline = time.monotonic() + 120
    while True:
        records = read_wandb_records(files[0], growing=True)
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "exit" in kinds, f"no exit record after 120 s; record types: {sorted(set(kinds))}"
    records = read_wandb_records(files[0])  # complete now: every chunk must check
    config, history = {}, {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            config.update(_nested(rec.run.config.update))
        elif kind == "config":
            config.update(_nested(rec.config.update))
        elif kind == "history":
            row = _nested(rec.history.item)
            history[row["_step"]] = row
    return config, history


def test_offline_run_writes_config_and_metrics(make_cfg):
    cfg = make_cfg()
    cfg["train"]["wandb"] = {"enabled": True, "mode": "offline", "project": "nl-test"}
    cfg["train"]["save_every"] = 0
    summary = run(cfg)
    out = cfg["train"]["out_dir"]
    recs = read_metrics(out)
    config, history = offline_run(out)

    assert config["train"]["wandb"] == cfg["train"]["wandb"]
    assert config["model"] == cfg["model"] and config["train"]["steps"] == cfg["train"]["steps"]
    assert sorted(history) == [r["step"] for r in recs] == list(range(1, cfg["train"]["steps"] + 1))
    for r in recs:  # every metric of every record, nested dicts included, equal after the JSON trip
        row = history[r["step"]]
        for k, v in r.items():
            assert row[k] == v, (r["step"], k, row.get(k), v)
    assert history[recs[-1]["step"]]["loss"] == recs[-1]["loss"] == summary["final_loss"]
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_ERROR_REPORTING"] == "false"


NO_NETWORK = textwrap.dedent("""
    import socket, sys
    calls, LOCAL = [], ("localhost", "127.0.0.1", "::1")
    _getaddrinfo, _connect = socket.getaddrinfo, socket.socket.connect
    def refuse(what):
        calls.append(what)
        raise OSError("network refused by the test")
    def getaddrinfo(host, *a, **k):
        return _getaddrinfo(host, *a, **k) if host in LOCAL else refuse(host)
    def connect(self, addr):  # Unix sockets and loopback (older wandb's service port) only
        return _connect(self, addr) if self.family == socket.AF_UNIX or addr[0] in LOCAL else refuse(addr)
    socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
    import atexit
    atexit.register(lambda: calls and sys.stderr.write(f"NETWORK {calls}\\n"))  # registered first: runs last
    from nested_learning.train.metrics import MetricsLog
    m = MetricsLog(sys.argv[1], True, {"enabled": True, "mode": "offline", "project": "nl-test"}, {"a": 1})
    m.log({"step": 1, "loss": 2.5})
    m.close()
""")


def test_offline_mode_opens_no_network_connection(tmp_path):
    """A whole process, exit included (wandb's usage metrics go out from a background thread
    and at exit): Python resolves no host name but localhost and connects nowhere but Unix
    sockets and loopback. (wandb 0.31,
    given only mode="offline", does: it posts usage metrics to its server.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_SILENT="true", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", NO_NETWORK, str(tmp_path)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "NETWORK" not in r.stderr, r.stderr[-3000:]
    _, history = offline_run(str(tmp_path))
    assert history[1]["loss"] == 2.5


def test_init_failure_is_a_clear_error(tmp_path, monkeypatch):
    def boom(**kw):
        raise OSError("disk full")

    monkeypatch.setattr(wandb, "init", boom)
    with pytest.raises(RuntimeError, match=r"train.wandb: wandb.init \(mode=offline.*OSError: disk full"):
        MetricsLog(str(tmp_path), True, {"enabled": True, "mode": "offline"}, {})
    with pytest.raises(ValueError, match="train.wandb.mode"):
        MetricsLog(str(tmp_path), True, {"enabled": True, "mode": "cloud"}, {})


def test_log_and_close_failures_never_stop_the_run(tmp_path, monkeypatch):
    class Run:
        def __init__(self, fail_log):
            self.fail_log, self.logged, self.finished = fail_log, [], 0

        def log(self, rec, step=None):
            if self.fail_log:
                raise ConnectionError("gone")
            self.logged.append((step, rec))

        def finish(self):
            self.finished += 1
            raise RuntimeError("finish failed")

    runs = []
    monkeypatch.setattr(metrics_mod, "_wandb_init", lambda *a: runs.append(Run(len(runs) == 1)) or runs[-1])
    m = MetricsLog(str(tmp_path / "a"), True, {"enabled": True}, {})
    os.makedirs(tmp_path / "a")
    m.log({"step": 1, "loss": float("nan"), "inner_stats": {"level0": {"update_norm": float("inf")}}})
    assert runs[0].logged == [(1, {"step": 1, "loss": None, "inner_stats": {"level0": {"update_norm": None}}})]
    with pytest.warns(UserWarning, match="wandb finish failed"):
        m.close()
    m.close()  # once only
    assert runs[0].finished == 1

    m = MetricsLog(str(tmp_path / "b"), True, {"enabled": True}, {})
    os.makedirs(tmp_path / "b")
    with pytest.warns(UserWarning) as caught:
        m.log({"step": 1, "loss": 1.0})
    assert "wandb.log failed (ConnectionError: gone)" in str(caught[0].message)
    assert runs[1].finished == 1  # the broken run is finished (its failure a warning too)
    m.log({"step": 2, "loss": 0.5})  # the mirror is gone, metrics.jsonl goes on
    assert [r["step"] for r in read_metrics(str(tmp_path / "b"))] == [1, 2]
