"""Crashes: nothing acknowledged is lost."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from edgeswarm.node import Config, Node

TIMEOUT = 30.0

WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from edgeswarm.node import Config, Node
    home, port, protocol, region = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    node = Node(Config(home=Path(home), regions=[region], broker_port=port, protocol=protocol,
                       sync_interval=0, snapshot_interval=0)).start()
    for i in range(100000):
        print(node.put(region, f"k{i % 200}", {"i": i}), flush=True)
""")


def test_kill_9_during_writes_loses_no_acknowledged_frame(tmp_path, broker, region):
    reader = Node(Config(home=tmp_path / "reader", regions=[region], broker_host=broker.host,
                         broker_port=broker.port, protocol=broker.protocol, sync_interval=0)).start()
    writer_home = tmp_path / "writer"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(writer_home), str(broker.port), broker.protocol,
                             region], stdout=subprocess.PIPE, text=True)
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
