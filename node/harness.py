"""Node processes driven over a pipe: each node of a test or simulated swarm in its own
interpreter, as on its own board, and the driver asking it to write, wait and report.

    with NodeProcess(Config(home=..., regions=["plant"], broker_port=port)) as n:
        version = n.put("plant", "pump", {"rpm": 1200})
        assert n.wait_versions([version], 10)  # (a wait takes its timeout last)

The driver writes one JSON line per call to the process's stdin; the process answers one
JSON line: {"ok": result} or {"error": "..."}. Waits happen in the node process on the
node's own event (a message handled), never by polling from the driver.
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .config import Config


LOG = "node.log"
ANSWER_TIMEOUT = 120.0  # seconds a node process has to answer a call (beyond a wait's own timeout)


class HarnessError(Exception):
    """The node process failed a call, or is gone."""


class NodeProcess:
    def __init__(self, config: Config, *, persistent: bool = True) -> None:
        self.config = config
        self.persistent = persistent  # False: the broker keeps no session for it (a board that lost its state)
        self.node_id = ""
        self._proc: subprocess.Popen | None = None

    def start(self) -> NodeProcess:
        """Write the node's configuration file (as `edgeswarm init` would) and start the
        process on it; returns once the node is connected."""
        if self.config.rules:
            raise HarnessError("coherence rules are not written to a configuration file: not carried")
        self.config.home.mkdir(parents=True, exist_ok=True)
        self.config.config_path.write_text(self.config.to_toml(), encoding="utf-8")
        with open(self.config.home / LOG, "ab") as log:  # the node's log (stderr)
            self._proc = subprocess.Popen([sys.executable, "-m", "edgeswarm.node.harness"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        try:
            self.node_id = self._call({"home": str(self.config.home), "persistent": self.persistent})
        except HarnessError:
            self._wait()
            raise
        return self

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, request: dict, timeout: float = ANSWER_TIMEOUT) -> Any:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise HarnessError(f"node process {self.node_id or self.config.home} is not running")
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            # (one line per answer: nothing is left buffered between calls)
            if not select.select([proc.stdout], [], [], timeout)[0]:
                self.kill()
                raise HarnessError(f"node process {self.node_id}: no answer to {request.get('call')}"
                                   f" in {timeout:.0f} s")
            line = proc.stdout.readline()
        except (BrokenPipeError, OSError) as e:
            raise HarnessError(f"node process {self.node_id}: {e}") from None
        if not line:
            raise HarnessError(f"node process {self.node_id or self.config.home} exited ({proc.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise HarnessError(f"node {self.node_id or self.config.home}: {answer['error']}")
        return answer["ok"]

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in COMMANDS:
            raise AttributeError(name)
        def call(*args: Any) -> Any:  # a wait's own timeout is its last argument
            waits = name.startswith("wait_") and args and isinstance(args[-1], (int, float))
            return self._call({"call": name, "args": list(args)}, ANSWER_TIMEOUT + (args[-1] if waits else 0))
        return call

    def stop(self) -> None:
        """Stop the node cleanly (death message, store closed) and wait for the process."""
        if self._proc is None:
            return
        try:
            if self._proc.poll() is None:
                self._call({"call": "stop", "args": []})
        except HarnessError:
            pass
        self._wait()

    def kill(self) -> None:
        """Power cut: SIGKILL, nothing flushed."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
        self._wait()

    def _wait(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


# -- the node process ---------------------------------------------------------------

def _digest(node, root: str) -> str:
    return node.sync.digest(root)["hashes"].hex()


def _has(node, versions: list[str]) -> bool:
    return all(node.store.has_version(bytes.fromhex(v)) for v in versions)


def _heads(node, region: str, keys: list[str]) -> dict:
    return {k: (fv.version if (fv := node.head(region, k)) else None) for k in keys}


def _consensus(node, region: str, keys: list[str]) -> dict:
    return {k: (fv.version if (fv := node.consensus(region, k)) else None) for k in keys}


def _status(node, region: str, keys: list[str]) -> dict:
    return {k: node.status(region, k) for k in keys}


def _put_batches(node, region: str, items: list, size: int) -> int:
    """Write `items` ([key, value] pairs) `size` at a time, each group one node.batch()."""
    for i in range(0, len(items), size):
        with node.batch():
            for key, value in items[i:i + size]:
                node.put(region, key, value)
    return len(items)


class _Events:
    """What this node process wrote and when each version reached consensus here, as
    [version, CLOCK_MONOTONIC ns] pairs: one clock for every process of the machine, so a
    driver can tell write-to-consensus latency across processes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wrote: list[list] = []
        self._consensus: list[list] = []

    def wrote(self, write):
        t = time.monotonic_ns()
        version = write()
        with self._lock:
            self._wrote.append([version, t])
        return version

    def on_change(self, fv) -> None:
        if fv.state == "consensus":
            t = time.monotonic_ns()
            with self._lock:
                self._consensus.append([fv.version, t])

    def take(self) -> dict:
        """The events since the last take."""
        with self._lock:
            taken = {"wrote": self._wrote, "consensus": self._consensus}
            self._wrote, self._consensus = [], []
        return taken


EVENTS = _Events()


COMMANDS = {
    "put": lambda node, region, key, value: EVENTS.wrote(lambda: node.put(region, key, value)),
    "put_many": lambda node, region, items: [EVENTS.wrote(lambda: node.put(region, k, v)) for k, v in items],
    "put_batches": lambda node, region, items, size: _put_batches(node, region, items, size),
    "patch": lambda node, region, key, changes: EVENTS.wrote(lambda: node.patch(region, key, set=changes)),
    "events": lambda node: EVENTS.take(),
    "delete": lambda node, region, key: node.delete(region, key),
    "has_versions": _has,
    "wait_versions": lambda node, versions, timeout: node.wait_until(lambda: _has(node, versions), timeout),
    "digest": _digest,
    "wait_digest": lambda node, root, hashes, timeout: node.wait_until(lambda: _digest(node, root) == hashes,
                                                                       timeout),
    "heads": _heads,
    "wait_heads": lambda node, region, expected, timeout: node.wait_until(
        lambda: _heads(node, region, list(expected)) == expected, timeout),
    "consensus": _consensus,
    "wait_consensus": lambda node, region, expected, timeout: node.wait_until(
        lambda: _consensus(node, region, list(expected)) == expected, timeout),
    "status": _status,
    "get": lambda node, region, key, consensus=False: node.get(region, key, consensus=consensus),
    "keys": lambda node, region: node.keys(region),
    "counters": lambda node: dict(node.counters),
    "metrics": lambda node: node.metrics(),
    "cpu": lambda node: time.process_time(),  # CPU seconds this node process has used
    "wait_counter": lambda node, name, at_least, timeout: node.wait_until(lambda: node.counters[name] >= at_least,
                                                                          timeout),
    "trace_head": lambda node, node_id: (h := node.store.trace_head(node_id)) and [h[0], h[1].hex()],
    "wait_trace": lambda node, node_id, seq, timeout: node.wait_until(
        lambda: (h := node.store.trace_head(node_id)) is not None and h[0] >= seq, timeout),
    "flagged": lambda node: sorted(node.store.flagged()),
    "sync_now": lambda node: node.sync_now(),
    "wait_published": lambda node, timeout: node.wait_published(timeout),
    "snapshot": lambda node: str(node.snapshot()),
    "node_id": lambda node: node.node_id,
    "bus": lambda node: {"port": node.transport.port, "connected": node.transport.connected,
                         "hosting": node.handover.hosting},
    "wait_bus": lambda node, port, timeout: node.transport.wait_state(
        lambda: node.transport.connected and node.transport.port == port, timeout),
    "wait_hosting": lambda node, hosting, timeout: node.handover.wait_hosting(hosting, timeout),
    "wait_bus_hosts": lambda node, count, timeout: node.wait_until(lambda: len(node.handover.hosts) >= count,
                                                                   timeout),
}


def _serve() -> None:
    import logging

    from .node import Node

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    first = json.loads(sys.stdin.readline())
    try:
        node = Node(Config.load(Path(first["home"])))
        node.transport.persistent = first.get("persistent", True)
        node.subscribe(EVENTS.on_change)
        node.start()
    except Exception as e:  # a broken configuration or store, no broker: said, and the process ends
        print(json.dumps({"error": f"start: {type(e).__name__}: {e}"}), flush=True)
        sys.exit(1)
    print(json.dumps({"ok": node.node_id}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        name = request.get("call")
        if name == "stop":
            node.stop()
            print(json.dumps({"ok": None}), flush=True)
            return
        try:
            answer = {"ok": COMMANDS[name](node, *request.get("args", []))}
        except Exception as e:  # reported to the driver; the node goes on
            answer = {"error": f"{name}: {type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)
    node.stop()  # the driver went away


if __name__ == "__main__":
    _serve()
