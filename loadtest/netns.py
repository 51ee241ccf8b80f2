"""The cluster harness's network: a bridge, and one network namespace per node.

Linux only, as root, with iproute2's ``ip``. Every run gets a private /24 of
``10.201.0.0/16`` that no interface of the machine uses yet, and names of its own
(``dsc<id>br`` the bridge, ``dsc<id>n<i>`` node *i*'s namespace, ``dsc<id>v<i>`` the
bridge end of its veth pair), so parallel runs never collide:

    root namespace                                 namespace dsc<id>n1
    bridge dsc<id>br 10.201.X.1/24  --veth--  eth0 10.201.X.11/24  (node 1)
      HAProxy, Redis, PostgreSQL    --veth--  ...  10.201.X.12/24  (node 2, its own ns)

The bridge's address is where the nodes reach Redis and PostgreSQL and where HAProxy
reaches the nodes from; nothing of it is routed anywhere else. Every namespace and
device is handed to the reaper (``loadtest._netreaper``) as it is made, so they go
away with the harness however it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import secrets
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Network", "NetworkError", "allocate"]

POOL = ipaddress.ip_network("10.201.0.0/16")
_LOCK = Path(tempfile.gettempdir()) / "dropserver-cluster.lock"


class NetworkError(RuntimeError):
    """A namespace or device could not be made (not root, no ``ip``, ...)."""


def ip(*args: str) -> str:
    """Run ``ip ARGS``; its stdout, or :class:`NetworkError` with its stderr."""
    try:
        out = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise NetworkError("the `ip` command (iproute2) is not installed") from None
    if out.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {out.stderr.strip() or out.returncode}")
    return out.stdout


def _used_networks() -> set[ipaddress.IPv4Network]:
    used = set()
    for line in ip("-4", "-o", "addr", "show").splitlines():
        parts = line.split()
        if "inet" in parts:
            iface = ipaddress.ip_interface(parts[parts.index("inet") + 1])
            used.add(iface.network)
    return used


@contextlib.contextmanager
def _allocation_lock() -> Iterator[None]:
    with open(_LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class Network:
    """A bridge and the nodes' namespaces. :func:`allocate` makes one."""

    id: str
    subnet: ipaddress.IPv4Network
    register: Callable[[str, str], None] = lambda kind, name: None  # tell the reaper
    namespaces: dict[int, str] = field(default_factory=dict)

    @property
    def bridge(self) -> str:
        return f"dsc{self.id}br"

    @property
    def hub_ip(self) -> str:
        """The bridge's address: Redis, PostgreSQL and HAProxy's side."""
        return str(self.subnet.network_address + 1)

    def node_ip(self, index: int) -> str:
        return str(self.subnet.network_address + 10 + index)

    def netns(self, index: int) -> str:
        return f"dsc{self.id}n{index}"

    def resources(self) -> list[tuple[str, str]]:
        """What :func:`loadtest._netreaper.remove` deletes: namespaces, then the bridge."""
        return [("netns", ns) for ns in self.namespaces.values()] + [("link", self.bridge)]

    # -- making it ----------------------------------------------------------------------
    def _create_bridge(self) -> None:
        self.register("link", self.bridge)
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.hub_ip}/{self.subnet.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add_node(self, index: int) -> str:
        """Namespace ``dsc<id>n<index>`` with loopback and ``eth0`` on the bridge at
        :meth:`node_ip`; returns the namespace's name."""
        ns, outer, inner = self.netns(index), f"dsc{self.id}v{index}", f"dsc{self.id}p{index}"
        self.register("netns", ns)
        self.namespaces[index] = ns
        ip("netns", "add", ns)
        ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        ip("link", "set", inner, "netns", ns)
        ip("link", "set", outer, "master", self.bridge, "up")
        ip("-n", ns, "link", "set", inner, "name", "eth0")
        ip("-n", ns, "addr", "add", f"{self.node_ip(index)}/{self.subnet.prefixlen}",
           "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def exec_prefix(self, index: int) -> list[str]:
        """Command prefix that runs a program inside node ``index``'s namespace."""
        return ["ip", "netns", "exec", self.netns(index)]


def allocate(register: Callable[[str, str], None] = lambda kind, name: None) -> Network:
    """A new bridge on a /24 of :data:`POOL` that no interface uses, with a fresh id."""
    if os.geteuid() != 0:
        raise NetworkError("the cluster harness makes network namespaces: run it as root")
    with _allocation_lock():
        used = _used_networks()
        free = [net for net in POOL.subnets(new_prefix=24)
                if not any(net.overlaps(u) for u in used)]
        if not free:
            raise NetworkError(f"no free /24 left in {POOL}")
        net = Network(id=secrets.token_hex(3)[:5], subnet=free[secrets.randbelow(len(free))],
                      register=register)
        net._create_bridge()  # under the lock: the next run sees its address
    return net
