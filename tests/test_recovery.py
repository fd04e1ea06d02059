"""Crashes: nothing acknowledged is lost."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from edgeswarm.node import Config, Node

TIMEOUT = 30.0

WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from edgeswarm.node import Config, Node
    home, port, protocol, region, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    node = Node(Config(home=Path(home), regions=[region], broker_port=port, protocol=protocol,
                       sync_interval=0, snapshot_interval=0)).start()
    for i in range(0, 100000, size):
        with node.batch():  # (a batch of one is a plain put)
            versions = [node.put(region, f"k{j % 200}", {"i": j}) for j in range(i, i + size)]
        for version in versions:  # acknowledged: the batch returned
            print(version, flush=True)
""")


@pytest.mark.parametrize("size", [1, 20])
def test_kill_9_during_writes_loses_no_acknowledged_frame(tmp_path, broker, region, size):
    reader = Node(Config(home=tmp_path / "reader", regions=[region], broker_host=broker.host,
                         broker_port=broker.port, protocol=broker.protocol, sync_interval=0)).start()
    writer_home = tmp_path / "writer"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(writer_home), str(broker.port), broker.protocol,
                             region, str(size)], stdout=subprocess.PIPE, text=True)
    acknowledged = []
    try:
        for line in proc.stdout:  # every line is a put() that returned
            acknowledged.append(bytes.fromhex(line.strip()))
            if len(acknowledged) == 300:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(TIMEOUT)
        assert proc.returncode == -signal.SIGKILL
        # the board comes back: what it stored but had not sent goes out now
        restarted = Node(Config(home=writer_home, regions=[region], broker_host=broker.host,
                                broker_port=broker.port, protocol=broker.protocol, sync_interval=0)).start()
        try:
            missing = lambda: [v for v in acknowledged if not reader.store.has_version(v)]  # noqa: E731
            assert reader.wait_until(lambda: not missing(), TIMEOUT), f"{len(missing())} acknowledged frames lost"
            assert restarted.wait_published(TIMEOUT) and not restarted.store.unpublished()
        finally:
            restarted.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.stop()
