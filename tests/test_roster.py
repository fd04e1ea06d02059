"""The swarm roster on a real broker: only admitted nodes, within their regions and their
certificates' lifetime, change the swarm; a revocation is enforced, kept and retained."""

from __future__ import annotations

import threading
import time

import pytest

from edgeswarm.node import Node
from edgeswarm.node.admission import AdmissionError
from edgeswarm.node.cli import main
from edgeswarm.shared import diff, roster
from edgeswarm.shared.envelope import encode
from edgeswarm.shared.identity import Identity
from edgeswarm.shared.topics import node_topic, region_topic

from helpers import certificate

TIMEOUT = 20.0


@pytest.fixture
def admitted(make_node, tmp_path, admin, region):
    """admitted(name, regions=[region], days=1) -> a started node holding a certificate."""

    def make(name: str, regions: list[str] | None = None, days: float = 1, **config) -> Node:
        identity = Identity.load_or_create(tmp_path / name / "node.key")
        (tmp_path / name / "admission.cert").write_bytes(certificate(admin, identity, regions or [region], days))
        return make_node(name, swarm_admin=admin.public_key.hex(), certificate="admission.cert", **config)

    return make


def knows(node: Node, region: str, members: set[str]) -> bool:
    return node.wait_until(lambda: node.members(region) == members, TIMEOUT)


def signed_diff(identity: Identity, region: str, key: str, seq: int):
    value = {"by": identity.node_id}
    version = diff.version_hash(region, key, None, value)
    return version, encode(identity, "diff", region, seq, int(time.time() * 1000) << 16,
                           {"key": key, "parent": None, "version": version, "ops": [["set", [], value]]})


def test_only_admitted_nodes_change_the_swarm(admitted, make_node, admin, region, attacker):
    a, b, c = (admitted(n) for n in "abc")
    everyone = {a.node_id, b.node_id, c.node_id}
    assert all(knows(n, region, everyone) for n in (a, b, c))
    v = a.put(region, "valve", {"open": True})
    assert all(n.wait_until(lambda n=n: (f := n.consensus(region, "valve")) is not None and f.version == v, TIMEOUT)
               for n in (a, b, c))
    # a node of the swarm without a certificate cannot write, and an outsider's writes are refused
    stranger = make_node("stranger", swarm_admin=admin.public_key.hex())
    with pytest.raises(AdmissionError, match="no admission certificate"):
        stranger.put(region, "valve", {"open": False})
    outsider = make_node("outsider")  # an open node: it signs and publishes what it likes
    forged = outsider.put(region, "valve", {"open": False})
    intruder = Identity.generate()
    version, env = signed_diff(intruder, region, "gate", 1)
    attacker.send(region_topic("diff", region), env.raw)
    assert a.wait_until(lambda: a.counters["rejected.not-admitted"] >= 2, TIMEOUT)
    assert not a.store.has_version(bytes.fromhex(forged)) and not a.store.has_version(version)
    assert a.consensus(region, "valve").version == v and a.members(region) == everyone


def test_writes_outside_the_certificate_regions_are_refused(admitted, region, attacker):
    a = admitted("a")
    other_region = f"{region}-elsewhere"
    d = admitted("d", regions=[other_region])
    assert a.wait_until(lambda: d.node_id in a.admission.members(other_region), TIMEOUT)
    with pytest.raises(AdmissionError, match="does not cover"):
        d.put(region, "valve", {"open": False})
    d_identity = Identity.load(d.config.key_path)
    version, env = signed_diff(d_identity, region, "valve", 10_000)
    attacker.send(region_topic("diff", region), env.raw)
    assert a.wait_until(lambda: a.counters["rejected.outside-regions"] >= 1, TIMEOUT)
    assert not a.store.has_version(version) and d.node_id not in a.members(region)


def test_an_expired_certificate_is_refused(admitted, region, attacker):
    a = admitted("a")
    e = admitted("e", days=-1)
    assert a.wait_until(lambda: e.node_id in a.admission._certs, TIMEOUT)
    assert e.node_id not in a.members(region)
    with pytest.raises(AdmissionError, match="expired"):
        e.put(region, "valve", {"open": False})
    version, env = signed_diff(Identity.load(e.config.key_path), region, "valve", 10_000)
    attacker.send(region_topic("diff", region), env.raw)
    assert a.wait_until(lambda: a.counters["rejected.expired"] >= 1, TIMEOUT)
    assert not a.store.has_version(version)


def test_a_revocation_is_enforced_kept_and_retained(admitted, admin_dir, broker, region, attacker):
    a, b, r = admitted("a"), admitted("b"), admitted("r")
    everyone = {a.node_id, b.node_id, r.node_id}
    assert knows(a, region, everyone) and knows(b, region, everyone)
    r_key = Identity.load(r.config.key_path).public_key.hex()
    try:
        assert main(["revoke", r_key, "--admin-dir", str(admin_dir), "--broker", f"mqtt://{broker.host}:{broker.port}",
                     "--protocol", broker.protocol]) == 0
        assert knows(a, region, {a.node_id, b.node_id}) and knows(b, region, {a.node_id, b.node_id})
        v = r.put(region, "valve", {"open": False})  # r still thinks it may
        assert a.wait_until(lambda: a.counters["rejected.revoked"] >= 1, TIMEOUT)
        assert not a.store.has_version(bytes.fromhex(v))
        # kept: a restarted node still refuses it
        a.stop()
        a2 = Node(a.config).start()
        try:
            assert r.node_id not in a2.members(region) and a2.store.flag_reason(r.node_id) is not None
        finally:
            a2.stop()
        # retained: a node that joins later learns it from the broker
        c = admitted("c")
        assert c.wait_until(lambda: r.node_id in c.store.flagged(), TIMEOUT)
    finally:  # (the broker may be shared: leave no retained revocation behind)
        attacker.client.publish(node_topic(r.node_id, "revoke"), b"", qos=1, retain=True).wait_for_publish(5)


def test_admin_commands_make_a_node_that_joins_the_roster(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGESWARM_ADMIN", str(tmp_path / "admin"))
    assert main(["swarm", "create"]) == 0
    admin_key = capsys.readouterr().out.split()[-1]
    assert main(["swarm", "create"]) == 1  # never overwritten
    home = tmp_path / "board"
    assert main(["--home", str(home), "init", "--region", "plant"]) == 0
    capsys.readouterr()
    assert main(["--home", str(home), "id"]) == 0
    public_key = capsys.readouterr().out.split('"public_key": "')[1].split('"')[0]
    cert = tmp_path / "board.cert"
    assert main(["admit", public_key, "--region", "plant/line1", "--days", "30", "--out", str(cert)]) == 0
    home2 = tmp_path / "board2"
    (home2).mkdir()
    (home2 / "node.key").write_bytes((home / "node.key").read_bytes())
    (home2 / "node.key").chmod(0o600)
    assert main(["--home", str(home2), "init", "--region", "plant", "--admin", admin_key,
                 "--certificate", str(cert)]) == 0
    from edgeswarm.node import Config
    config = Config.load(home2)
    assert config.swarm_admin == admin_key and config.certificate_path.read_bytes() == cert.read_bytes()
    c = roster.check_certificate(cert.read_bytes(), bytes.fromhex(admin_key))
    assert c.public_key.hex() == public_key and c.regions == ("plant/line1",)
    # a certificate signed by another key is refused when the configuration names this admin
    assert main(["admit", public_key, "--region", "plant", "--out", str(cert), "--admin-dir",
                 str(tmp_path / "other")]) == 1


def clear_retained_birth(attacker, node_id: str) -> None:
    """Clear a node's retained birth once the broker holds it (the node publishes it as it
    starts: a clear that came first would leave it there)."""
    topic = node_topic(node_id, "birth")
    birth, cleared = threading.Event(), threading.Event()
    attacker.client.on_message = lambda c, u, m: (birth if m.payload else cleared).set() if m.topic == topic else None
    attacker.client.subscribe(topic, qos=1)
    assert birth.wait(TIMEOUT)
    attacker.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    assert cleared.wait(TIMEOUT)  # (the broker took the clear after the birth)
    attacker.client.unsubscribe(topic)


def test_a_certificate_also_travels_in_fingerprints(admitted, region, attacker):
    b = admitted("b")
    # as on a broker that keeps no retained birth: b's is gone, its retained fingerprint is there
    clear_retained_birth(attacker, b.node_id)
    c = admitted("c", start=False)
    # A thread that sees b among the members finds b's record too: the certificate counts
    # once the record is stored, in one transaction (it did before the record: a race).
    member_before_record = []
    set_peer = c.store.set_peer

    def recording(node_id: str, **fields) -> None:
        if node_id == b.node_id:
            member_before_record.append(b.node_id in c.members(region))
        set_peer(node_id, **fields)
    c.store.set_peer = recording
    c.start()
    assert c.wait_until(lambda: b.node_id in c.members(region), TIMEOUT)
    assert c.store.peer(b.node_id)["fingerprint"]["frames"] == 0  # (the certificate is not kept twice)
    assert member_before_record[:1] == [False]  # (b's next fingerprints find it a member, as they should)
