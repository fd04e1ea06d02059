"""`edgeswarm provision`: everything one board needs, in one directory, made on the swarm
admin's machine.

    DIR/
      home/               the node's home, installed as /var/lib/edgeswarm: config.toml,
                          node.key (its private key, made here) and admission.cert
      wheelhouse/         edgeswarm and every dependency as wheels for the board's platform,
                          and the pip that installs them: the board needs no network
      edgeswarm.service   the systemd unit (dedicated user, hardened, watchdog)
      install.sh          run as root on the board; safe to run again
      firstrun.sh         for the Raspberry Pi OS boot partition (runs install.sh at first boot)
      user-data           the same for cloud-init images (Ubuntu, Raspberry Pi OS from 2025)
      README.txt          what to do with it

The directory holds the node's private key: it is made readable by its owner only, and
should be deleted once the board is flashed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from edgeswarm.shared import roster
from edgeswarm.shared.identity import Identity

from .config import CONFIG_FILE, Config

PREFIX = "/opt/edgeswarm"  # the board's virtual environment
STATE = "/var/lib/edgeswarm"  # the node's home on the board
BOOT = "/boot/firmware/edgeswarm"  # where the bundle is copied on the boot partition
CERTIFICATE_FILE = "admission.cert"
# pip platform tags per board architecture: glibc 2.17 to 2.36 covers Raspberry Pi OS
# bookworm (2.36) and Ubuntu 22.04 (2.35); the wheels of 32-bit ARM are not all on PyPI.
PLATFORMS = {arch: [f"manylinux_2_{v}_{arch}" for v in (17, 28, 31, 34, 35, 36)] + [f"manylinux2014_{arch}",
                                                                                   f"linux_{arch}"]
             for arch in ("aarch64", "x86_64")}


class ProvisionError(Exception):
    """The bundle could not be made (no wheels for the platform, no edgeswarm to pack, ...)."""


def _source_tree() -> Path | None:
    """The project's source tree when edgeswarm runs from one (an editable install)."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "edgeswarm"' in pyproject.read_text(encoding="utf-8"):
        return root
    return None


def _pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if "ERROR" in line] or proc.stderr.splitlines()[-3:]
        raise ProvisionError(f"pip {args[0]} failed: {' '.join(lines).strip()}")


def _installed_pins() -> list[str]:
    """name==version of the distributions in this environment: the board gets what runs here."""
    pins = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() not in ("edgeswarm", "pip", "setuptools", "wheel"):
            pins[name.lower()] = f"{name}=={dist.version}"
    return sorted(pins.values())


def wheelhouse(out: Path, *, wheel: Path | None = None, platform: str = "host", python: str = "3.11") -> list[str]:
    """Fill `out` with edgeswarm's wheel (`wheel`, else built from the source tree), its
    dependencies' wheels for `platform` ("host", "aarch64" or "x86_64") and CPython
    `python`, pinned to the versions this environment runs, and pip's own wheel."""
    out.mkdir(parents=True, exist_ok=True)
    if wheel is not None:
        if wheel.suffix != ".whl" or not wheel.is_file():
            raise ProvisionError(f"{wheel} is not a wheel file")
        shutil.copy2(wheel, out)
    elif (source := _source_tree()) is not None:
        with tempfile.TemporaryDirectory() as tmp:  # (a build writes into the tree it builds: not the source's)
            tree = Path(tmp) / "edgeswarm"
            shutil.copytree(source, tree, ignore=shutil.ignore_patterns(
                ".*", "build", "dist", "*.egg-info", "__pycache__", "tests", "bench"))
            _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(tree))
    else:
        raise ProvisionError("edgeswarm is installed from a wheel here: give that wheel with --wheel")
    ours = sorted(out.glob("edgeswarm-*.whl"))
    if not ours:
        raise ProvisionError("no edgeswarm wheel was made")
    target = []
    if platform != "host":
        if platform not in PLATFORMS:
            raise ProvisionError(f"unknown platform {platform!r}: host, {', '.join(PLATFORMS)}")
        major_minor = python.replace(".", "")
        target = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
                  "--abi", f"cp{major_minor}", "--abi", "abi3", "--abi", "none",
                  *(a for tag in PLATFORMS[platform] for a in ("--platform", tag))]
    constraints = out / "constraints.txt"
    constraints.write_text("\n".join(_installed_pins()) + "\n", encoding="utf-8")
    try:
        _pip("download", "--quiet", "--dest", str(out), "--constraint", str(constraints), *target,
             str(ours[-1]), f"pip=={metadata.version('pip')}")
    finally:
        constraints.unlink()
    return sorted(p.name for p in out.glob("*.whl"))


def unit(*, auto_port: int | None = None, prefix: str = PREFIX, state: str = STATE) -> str:
    """The systemd unit: its own user, a read-only system, state in /var/lib/edgeswarm
    (StateDirectory), restarted on failure and by the watchdog when the node stops pinging."""
    low_port = auto_port is not None and auto_port < 1024
    return "\n".join([
        "[Unit]",
        "Description=edgeswarm node",
        f"Documentation=file://{prefix}/README.txt",
        "Wants=network-online.target time-sync.target",
        "After=network-online.target time-sync.target",
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={prefix}/bin/edgeswarm --home {state} run",
        "User=edgeswarm",
        "Group=edgeswarm",
        "StateDirectory=edgeswarm",
        "StateDirectoryMode=0700",
        "UMask=0077",
        "Restart=always",
        "RestartSec=5",
        "WatchdogSec=60",
        "TimeoutStartSec=120",
        "TimeoutStopSec=30",
        "MemoryHigh=96M",
        "MemoryMax=160M",
        "Environment=PYTHONDONTWRITEBYTECODE=1",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        f"CapabilityBoundingSet={'CAP_NET_BIND_SERVICE' if low_port else ''}",
        *(["AmbientCapabilities=CAP_NET_BIND_SERVICE"] if low_port else []),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


INSTALL = """#!/bin/sh
# Installs this edgeswarm bundle on the board. Run as root; safe to run again.
# EDGESWARM_PREFIX and EDGESWARM_STATE move the install (default {prefix} and {state});
# EDGESWARM_SYSTEM=no installs the software and the home only (no user, no systemd).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
prefix=${{EDGESWARM_PREFIX:-{prefix}}}
state=${{EDGESWARM_STATE:-{state}}}
system=${{EDGESWARM_SYSTEM:-yes}}

# The software: a virtual environment filled from the wheelhouse alone (no network).
# (--without-pip: Debian's python3 has no ensurepip without python3-venv; pip runs from its wheel.)
[ -x "$prefix/bin/python" ] || python3 -m venv --without-pip "$prefix"
pip_wheel=$(ls "$here"/wheelhouse/pip-*.whl | head -n 1)
"$prefix/bin/python" "$pip_wheel/pip" --disable-pip-version-check install --quiet --no-index \\
    --find-links "$here/wheelhouse" --upgrade edgeswarm
cp "$here/README.txt" "$prefix/README.txt"

# The node's home: copied once. A board that already has one keeps it (its key, its store).
if [ ! -e "$state/node.key" ]; then
  mkdir -p "$state"
  chmod 0700 "$state"
  cp "$here"/home/* "$state"/
  chmod 0600 "$state/node.key"
fi

if [ "$system" = yes ]; then
  getent passwd edgeswarm >/dev/null || useradd --system --home-dir "$state" --shell /usr/sbin/nologin edgeswarm
  chown -R edgeswarm:edgeswarm "$state"
  install -m 0644 "$here/edgeswarm.service" /etc/systemd/system/edgeswarm.service
  systemctl daemon-reload
  systemctl enable --now edgeswarm.service
fi
echo "edgeswarm node {node_id} installed in $prefix, home $state"
"""

FIRSTRUN = """#!/bin/sh
# Raspberry Pi OS: copy this bundle to the boot partition as {boot}/ and run this script
# once at first boot (systemd.run={boot}/firstrun.sh in cmdline.txt, or from your own
# firstrun.sh). It installs the node and leaves a log on the boot partition.
set -eu
sh {boot}/install.sh > {boot}/install.log 2>&1
# The node's key is installed: remove the copy on the (world-readable) boot partition.
rm -f {boot}/home/node.key
sed -i 's| systemd.run=[^ ]*||g; s| systemd.run_success_action=[^ ]*||g' /boot/firmware/cmdline.txt 2>/dev/null || true
"""

USER_DATA = """#cloud-config
# cloud-init: install the edgeswarm bundle copied to the boot partition as {boot}/
runcmd:
  - [sh, -c, "sh {boot}/install.sh > {boot}/install.log 2>&1 && rm -f {boot}/home/node.key"]
"""

README = """edgeswarm bundle for node {node_id}
made {made} for {platform} (CPython {python}); regions {regions}; brokers {brokers}{auto}

This directory holds the node's PRIVATE KEY (home/node.key). Copy it to one board only,
and delete it once the board is flashed.

On the board (any Debian-family Linux with Python {python}, as root):
    sh install.sh
It installs edgeswarm from wheelhouse/ into {prefix} (no network needed), the node's
home into {state}, creates the user edgeswarm and starts edgeswarm.service.

From a freshly flashed SD card: copy this directory to the boot partition as edgeswarm/
(the partition is mounted at /boot/firmware on the board), then either
  - cloud-init images: use user-data as the image's user-data (or append its runcmd), or
  - Raspberry Pi OS: append to the single line of cmdline.txt
        systemd.run={boot}/firstrun.sh systemd.run_success_action=reboot
The install leaves its log as install.log beside it.

Then: systemctl status edgeswarm; journalctl -u edgeswarm;
      sudo -u edgeswarm {prefix}/bin/edgeswarm --home {state} status
"""


def write_bundle(out: Path, *, regions: list[str], brokers: list[str], admin: Identity | None = None,
                 days: float = 365.0, members: list[str] | None = None, quorum: int = 0, auto: bool = False,
                 auto_port: int = 1883, auto_address: str = "", wheel: Path | None = None,
                 platform: str = "host", python: str = "3.11", with_wheels: bool = True) -> Identity:
    """Write the bundle for one new node into `out` (which must not exist); returns the
    node's identity."""
    if out.exists():
        raise ProvisionError(f"{out} already exists")
    if not regions:
        raise ProvisionError("a node follows at least one region (--region)")
    if not brokers:
        raise ProvisionError("give the swarm's broker(s) (--broker mqtt://host:port)")
    home = out / "home"
    # (the configuration is checked before anything is written)
    config = Config(home=home, regions=regions, broker_urls=brokers, members=members or [], quorum=quorum,
                    protocol="3.1.1" if auto else "auto", broker_auto=auto, auto_port=auto_port,
                    auto_address=auto_address, swarm_admin=admin.public_key.hex() if admin else "",
                    certificate=CERTIFICATE_FILE if admin else "")
    home.mkdir(parents=True, mode=0o700)
    out.chmod(0o700)
    identity = Identity.load_or_create(config.key_path)
    if admin is not None:
        now = int(time.time() * 1000)
        (home / CERTIFICATE_FILE).write_bytes(roster.issue(admin, identity.public_key, regions,
                                                           now + int(days * 86_400_000), now))
    (home / CONFIG_FILE).write_text(config.to_toml(), encoding="utf-8")
    if with_wheels:
        wheelhouse(out / "wheelhouse", wheel=wheel, platform=platform, python=python)
    (out / "edgeswarm.service").write_text(unit(auto_port=auto_port if auto else None), encoding="utf-8")
    fill = {"prefix": PREFIX, "state": STATE, "boot": BOOT, "node_id": identity.node_id}
    for name, text in (("install.sh", INSTALL), ("firstrun.sh", FIRSTRUN), ("user-data", USER_DATA)):
        (out / name).write_text(text.format(**fill), encoding="utf-8")
    for name in ("install.sh", "firstrun.sh"):
        (out / name).chmod(0o755)
    (out / "README.txt").write_text(README.format(
        **fill, made=time.strftime("%Y-%m-%d"), platform=platform, python=python, regions=", ".join(regions),
        brokers=", ".join(brokers), auto="; any node may host the bus (broker.auto)" if auto else ""), encoding="utf-8")
    (out / "bundle.json").write_text(json.dumps({"node": identity.node_id, "public_key": identity.public_key.hex(),
                                                 "regions": regions, "brokers": brokers, "platform": platform,
                                                 "python": python}, indent=1) + "\n", encoding="utf-8")
    return identity


def check_unit(path: Path) -> str | None:
    """What `systemd-analyze verify` finds wrong with the unit, warnings included (it only
    warns about a bad value): None when it has nothing to say, or is not installed. Its
    ExecStart must exist where this runs."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return None
    proc = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True,
                          env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    said = [line for line in (proc.stderr + proc.stdout).splitlines() if path.name in line]
    if proc.returncode != 0 and not said:
        said = (proc.stderr + proc.stdout).strip().splitlines() or [f"exit status {proc.returncode}"]
    return "\n".join(said) or None
