"""The `edgeswarm` command, run as separate processes against the embedded broker."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid


from edgeswarm.broker.embedded import free_port

TIMEOUT = 20.0
EXE = [sys.executable, "-m", "edgeswarm.node.cli"]


def cli(*args, home=None, timeout=TIMEOUT, stdin=None):
    cmd = EXE + (["--home", str(home)] if home else []) + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=stdin)


class Proc(subprocess.Popen):
    """A child process whose output lines are collected by reader threads, so a test can
    wait for a given line without blocking on a pipe."""

    def __init__(self, cmd):
        super().__init__(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        for name, q in self.lines.items():
            threading.Thread(target=self._pump, args=(getattr(self, name), q), daemon=True).start()

    @staticmethod
    def _pump(stream, q):
        for line in stream:
            q.put(line)
        q.put(None)

    def wait_line(self, stream, needle, timeout=TIMEOUT):
        """Return the first line of `stream` containing `needle`, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            try:
                line = self.lines[stream].get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"no line with {needle!r} from {self.args}; got {''.join(seen)!r}")
            seen.append(line)
            if needle in line:
                return line

    def rest(self, stream):
        self.wait(TIMEOUT)
        out = []
        while (line := self.lines[stream].get(timeout=TIMEOUT)) is not None:
            out.append(line)
        return "".join(out)


def spawn(*args, home=None):
    return Proc(EXE + (["--home", str(home)] if home else []) + [str(a) for a in args])


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def assert_one_line_error(result, match):
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeswarm: error:") and match in lines[0], result.stderr


def test_nodes_as_processes_end_to_end(tmp_path):
    port = free_port()
    region = f"cli/{uuid.uuid4().hex[:8]}"
    host_home, writer_home = tmp_path / "host", tmp_path / "writer"
    for home in (host_home, writer_home):
        r = cli("init", "--region", region, "--port", port, home=home)
        assert r.returncode == 0, r.stderr
    host = spawn("-v", "run", "--embedded-broker", home=host_home)
    watch = None
    try:
        host.wait_line("stdout", "running")
        watch = spawn("watch", region, "--count", 2, "--timeout", TIMEOUT, home=writer_home)
        watch.wait_line("stderr", "watching")
        put = cli("put", region, "pump", '{"rpm": 1500, "on": true}', home=writer_home)
        assert put.returncode == 0, put.stderr
        version = put.stdout.strip()
        assert len(version) == 64

        out = watch.rest("stdout")
        assert watch.returncode == 0, watch.rest("stderr")
        msgs = [json.loads(line) for line in out.strip().splitlines()]
        writer_id = cli("get", region, home=writer_home)  # the writer's own store has it too
        assert json.loads(writer_id.stdout)["version"] == version
        author = json.loads(writer_id.stdout)["author"]
        msg = msgs[0]  # the change (the writer's vote too: its round), then the host's vote, in the writer's relay
        assert msg["kind"] == "diff" and msg["region"] == region and msg["sender"] == author
        assert msg["body"]["version"] == version and msg["body"]["key"] == "pump" and msg["body"]["round"] == 1
        votes = msgs[1:]
        assert [m["kind"] for m in votes] == ["vote"] and votes[0]["sender"] != author
        assert votes[0]["body"]["version"] == version

        host.wait_line("stderr", version)  # the hosting node stored it
        got = cli("get", region, "pump", home=host_home)
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout) == {"rpm": 1500, "on": True}
        deadline = time.monotonic() + TIMEOUT
        while True:  # (what a node did with others' versions reaches its trace within trace.LINGER)
            trace = [json.loads(line) for line in cli("trace", home=host_home).stdout.splitlines()]
            accepted = any(e["event"] == "accepted" and e["data"]["version"] == version for e in trace)
            if accepted or time.monotonic() > deadline:
                break
        assert accepted
        seqs = sorted({e["seq"] for e in trace})  # (a line per event; an entry may hold several)
        assert seqs == list(range(1, len(seqs) + 1)) and [e["seq"] for e in trace] == sorted(e["seq"] for e in trace)
        history = cli("get", region, "pump", "--history", home=host_home)
        assert [json.loads(line)["version"] for line in history.stdout.splitlines()] == [version]

        # several changes from a script, written together
        lines = "".join(json.dumps({"key": f"tank-{i}", "value": {"level": i}}) + "\n" for i in range(3))
        put = cli("put", region, "--batch", "-", home=writer_home, stdin=lines + "\n")
        assert put.returncode == 0, put.stderr
        versions = put.stdout.split()
        assert len(versions) == 3
        host.wait_line("stderr", versions[-1])
        for i, v in enumerate(versions):
            got = json.loads(cli("get", region, f"tank-{i}", home=host_home).stdout)
            assert got == {"level": i}
    finally:
        if watch is not None and watch.poll() is None:
            stop(watch)
        assert stop(host) == 0


def test_standalone_broker_starts_and_stops_cleanly():
    port = free_port()
    broker = spawn("broker", "--port", port)
    broker.wait_line("stdout", f"listening on 127.0.0.1:{port}")
    busy = cli("broker", "--port", port)
    assert_one_line_error(busy, "cannot listen")
    assert stop(broker) == 0
    again = spawn("broker", "--port", port)  # the port is free again
    again.wait_line("stdout", "listening")
    assert stop(again) == 0


def test_demo_converges():
    r = cli("demo", "--nodes", 3, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "converged in" in r.stdout and "messages rejected: 0" in r.stdout


def test_errors_are_one_line(tmp_path):
    home = tmp_path / "n"
    assert_one_line_error(cli("get", "r", "k", home=home), "edgeswarm init")
    assert cli("init", "--region", "plant", "--port", free_port(), home=home).returncode == 0
    assert_one_line_error(cli("init", home=home), "already exists")
    assert_one_line_error(cli("get", "plant", "nothing", home=home), "no frame")
    assert_one_line_error(cli("put", "plant", "k", "{not json", home=home), "not valid JSON")
    assert_one_line_error(cli("put", "plant", "k", home=home), "needs a key and a JSON value")
    assert_one_line_error(cli("put", "plant", "--batch", "-", home=home, stdin='{"key": "k", "value": {}}\n[1]\n'),
                          "line 2")
    assert_one_line_error(cli("put", "plant", "--batch", tmp_path / "none.jsonl", home=home), "none.jsonl")
    assert_one_line_error(cli("put", "plant/+", "k", "{}", home=home), "forbidden character")
    assert_one_line_error(cli("put", "plant", "k", "{}", home=home), "cannot reach broker")
    assert_one_line_error(cli("swarm-sim", "--voters", "3"), "voters is between the 4 writers and the 20 nodes")

    config = home / "config.toml"
    good = config.read_text()
    config.write_text(good.replace("[broker]", "[broker\n"))
    assert_one_line_error(cli("get", "plant", "k", home=home), "not valid TOML")
    config.write_text(good.replace("port =", "colour = 1\nport =", 1))
    assert_one_line_error(cli("get", "plant", "k", home=home), "unknown setting(s) colour")
    config.write_text(good.replace('regions = ["plant"]', 'regions = ["a//b"]'))
    assert_one_line_error(cli("get", "plant", "k", home=home), "empty level")
    config.write_text(good)

    (home / "node.key").chmod(0o644)
    assert_one_line_error(cli("get", "plant", "k", home=home), "chmod 600")
    (home / "node.key").chmod(0o600)


def test_corrupt_store_is_reported_and_left_alone(tmp_path):
    home = tmp_path / "n"
    assert cli("init", "--region", "plant", home=home).returncode == 0
    store = home / "store.db"
    junk = b"this is not a database" * 100
    store.write_bytes(junk)
    assert_one_line_error(cli("get", "plant", "k", home=home), "cannot open store")
    assert store.read_bytes() == junk
