"""Envelope throughput, measured in one run.

    python bench/bench_envelope.py [--seconds 2]

Prints, per second: raw PyNaCl Ed25519 sign and verify of a payload the size of a typical
diff envelope, and edgeswarm's envelope encode+sign and decode+verify of the same diff (the
ratio to raw is the figure that matters: what the envelope costs on top of the signature).
Frames through a broker, against raw MQTT: bench_brokers.py.
"""

from __future__ import annotations

import argparse
import time

from nacl.signing import SigningKey

from edgeswarm.shared import diff
from edgeswarm.shared.envelope import decode, encode
from edgeswarm.shared.identity import Identity


def rate(fn, seconds: float) -> float:
    """Calls of fn per second, timed over about `seconds`."""
    n, batch = 0, 64
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        for _ in range(batch):
            fn()
        n += batch
    return n / elapsed


def sample_diff(identity: Identity):
    region, key = "plant/line1/vision", "camera-3"
    old = {"fps": 30, "exposure": 0.01, "gain": 1.5, "roi": {"x": 0, "y": 0, "w": 640, "h": 480}}
    new = {**old, "fps": 25, "roi": {**old["roi"], "w": 320}}
    parent = diff.version_hash(region, key, None, old)
    body = {"key": key, "parent": parent, "version": diff.version_hash(region, key, parent, new),
            "ops": diff.make(old, new)}
    return region, body


def bench_envelope(seconds: float) -> None:
    me = Identity.generate()
    region, body = sample_diff(me)
    env = encode(me, "diff", region, 1, 1, body)
    topic = f"es/v1/diff/{region}"
    raw_key = SigningKey(bytes(me.signing_key))
    message = env.payload  # the same bytes the envelope signs
    signed = raw_key.sign(message)
    verify_key = raw_key.verify_key

    sign_raw = rate(lambda: raw_key.sign(message), seconds)
    verify_raw = rate(lambda: verify_key.verify(signed), seconds)
    enc = rate(lambda: encode(me, "diff", region, 1, 1, body), seconds)
    dec = rate(lambda: decode(env.raw, topic=topic), seconds)
    print(f"payload {len(message)} B, envelope {len(env.raw)} B on the wire")
    print(f"{'operation':<34}{'per second':>12}{'vs raw':>9}")
    print(f"{'raw PyNaCl sign':<34}{sign_raw:>12,.0f}")
    print(f"{'envelope encode + sign':<34}{enc:>12,.0f}{enc / sign_raw:>9.2f}")
    print(f"{'raw PyNaCl verify':<34}{verify_raw:>12,.0f}")
    print(f"{'envelope decode + verify':<34}{dec:>12,.0f}{dec / verify_raw:>9.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0, help="time per micro-benchmark")
    args = p.parse_args()
    bench_envelope(args.seconds)


if __name__ == "__main__":
    main()
