"""Hosts made of Linux network namespaces, for the multi-host harness (needs root: `ip netns`).

A bridge on this machine holds the first address of a free /24; each host is a namespace
joined to the bridge by a veth pair, with its own address on it. Services this machine runs on
the bridge's address (the database's pooler, the fake upstream, a webhook receiver) are what
the hosts reach; from here every host is reachable at its address, as on a small LAN.

Every name holds the creating process's id (`gwmh<pid in hex>...`), so a later run removes
what a run killed with SIGKILL left behind (`sweep`), and never touches anything else.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
from dataclasses import dataclass

PREFIX = "gwmh"
# Where the /24 is looked for: a private range the machine's own routes do not touch.
_SPACE = "10.213.0.0/16"
# bridge `br`, host namespace `n<i>`, its veth ends `h<i>` (on the bridge) and `p<i>` (inside)
_NAME = re.compile(rf"^{PREFIX}([0-9a-f]+)(br|[nhp][0-9]+)$")


class NetworkError(Exception):
    """An `ip` command failed; the message names the command and what it printed."""


def ip(*args: str, check: bool = True) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15, check=False)
    if check and result.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result.stdout


@dataclass(frozen=True)
class Host:
    """One namespace: its name and its address on the bridge."""

    name: str
    address: str

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host (`ip netns exec` replaces itself with the command: same pid)."""
        return ["ip", "netns", "exec", self.name, *argv]


def _tag(pid: int) -> str:
    return f"{PREFIX}{pid:x}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(name: str) -> int | None:
    """The pid a harness name was made by, or None for a name that is not one of ours."""
    match = _NAME.match(name)
    return None if match is None else int(match.group(1), 16)


def _free_subnet() -> ipaddress.IPv4Network:
    used: list[ipaddress.IPv4Network] = []
    for entry in json.loads(ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        destination = entry.get("dst", "")
        if destination and destination != "default":
            try:
                used.append(ipaddress.IPv4Network(destination, strict=False))
            except ValueError:
                continue
    for entry in json.loads(ip("-j", "-4", "addr", "show") or "[]"):
        for address in entry.get("addr_info", []):
            used.append(ipaddress.IPv4Network(f"{address['local']}/{address['prefixlen']}", strict=False))
    subnets = list(ipaddress.IPv4Network(_SPACE).subnets(new_prefix=24))
    start = os.getpid() % len(subnets)
    for index in range(len(subnets)):
        subnet = subnets[(start + index) % len(subnets)]
        if not any(subnet.overlaps(other) for other in used):
            return subnet
    raise NetworkError(f"no free /24 in {_SPACE} for the bridge")


class Network:
    """A bridge and `count` namespaces on it; `create()` then `destroy()` (also after a partial create)."""

    def __init__(self, count: int) -> None:
        tag = _tag(os.getpid())
        self.bridge = f"{tag}br"
        self._names = [f"{tag}n{index}" for index in range(1, count + 1)]
        self._veths = [f"{tag}h{index}" for index in range(1, count + 1)]
        self._inner = [f"{tag}p{index}" for index in range(1, count + 1)]
        self.address = ""
        self.hosts: list[Host] = []

    def create(self) -> None:
        subnet = _free_subnet()
        addresses = list(subnet.hosts())
        self.address = str(addresses[0])
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.address}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for index, (name, veth, inner) in enumerate(zip(self._names, self._veths, self._inner, strict=True)):
            address = str(addresses[10 + index])
            ip("netns", "add", name)
            ip("link", "add", veth, "type", "veth", "peer", "name", inner, "netns", name)
            ip("link", "set", veth, "master", self.bridge, "up")
            ip("-n", name, "addr", "add", f"{address}/24", "dev", inner)
            ip("-n", name, "link", "set", inner, "up")
            ip("-n", name, "link", "set", "lo", "up")
            self.hosts.append(Host(name, address))

    def destroy(self) -> list[str]:
        """Remove every namespace, veth and the bridge this Network may have made; the problems met."""
        problems: list[str] = []
        existing = set(ip("netns", "list", check=False).split())
        for name in self._names:
            if name in existing:
                try:
                    ip("netns", "del", name)  # takes its veth end, and so the pair, with it
                except NetworkError as exc:
                    problems.append(str(exc))
        for link in [*self._veths, self.bridge]:
            if ip("link", "show", link, check=False):
                try:
                    ip("link", "del", link)
                except NetworkError as exc:
                    problems.append(str(exc))
        return problems


def sweep() -> list[str]:
    """Remove namespaces and links that a harness no longer running left behind; what was removed."""
    removed: list[str] = []
    for name in ip("netns", "list", check=False).split():
        owner = _owner(name)
        if owner is not None and not _pid_alive(owner):
            ip("netns", "del", name, check=False)
            removed.append(f"namespace {name}")
    for entry in json.loads(ip("-j", "link", "show", check=False) or "[]"):
        name = entry.get("ifname", "")
        owner = _owner(name)
        if owner is not None and not _pid_alive(owner):
            ip("link", "del", name, check=False)
            removed.append(f"link {name}")
    return removed
