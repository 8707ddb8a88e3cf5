"""The CC's view of its cluster and its placement rule: pure functions, no I/O, no clock.

The view is soft state: `rebuild` makes a new one from the answers of one poll (every NC's
``nc.describe``) and the previous view, and nothing of it is ever persisted. An NC that did
not answer keeps the instances the previous view knew on it, each reported ``lost`` (never
silently dropped); an NC that left the cluster's membership (deregistered) is forgotten.

Placement (`place`): each requested instance, in order, goes to the NC that is ``up``, has
room for its type (cores, memory, disk), and has the most free cores, then the most free
memory, then the smallest name: simple and deterministic. Room is taken as it is given, so
one call spreads its instances. A request that does not fit anywhere fails the whole call
(`InsufficientCapacity`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

UP = "up"
LOST = "lost"
RESOURCES = ("cores", "memory_mib", "disk_gib")


class InsufficientCapacity(Exception):
    """No NC has room for the request (EC2's ``InsufficientInstanceCapacity``)."""


@dataclass(frozen=True)
class NodeView:
    """One NC as the last poll saw it."""

    name: str
    state: str
    cores: int = 0
    memory_mib: int = 0
    disk_gib: int = 0
    runtime_node: str | None = None
    instances: tuple[Mapping[str, Any], ...] = ()
    reason: str = ""

    def used(self) -> dict[str, int]:
        live = [i for i in self.instances if i.get("state") != "terminated"]
        return {k: sum(int(i.get(k) or 0) for i in live) for k in RESOURCES}

    def free(self) -> dict[str, int]:
        used = self.used()
        return {k: getattr(self, k) - used[k] for k in RESOURCES}

    def live_count(self) -> int:
        return sum(1 for i in self.instances if i.get("state") != "terminated")

    def describe(self) -> dict[str, Any]:
        """The ``cc.describe_nodes`` entry."""
        free = self.free()
        return {
            "node": self.name,
            "runtime_node": self.runtime_node,
            "state": self.state,
            "cores": self.cores,
            "memory_mib": self.memory_mib,
            "disk_gib": self.disk_gib,
            "free_cores": free["cores"],
            "free_memory_mib": free["memory_mib"],
            "free_disk_gib": free["disk_gib"],
            "instances": self.live_count(),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ClusterView:
    """Every NC of the cluster and the instances on it, as of one poll."""

    nodes: Mapping[str, NodeView] = field(default_factory=dict)
    generation: int = 0

    def instances(self) -> dict[str, dict[str, Any]]:
        """instance id -> instance dict with ``node`` (an NC ``lost``: its instances ``lost``).

        Should an id appear on two NCs (it must not: the NCs fence deposed CCs), the live copy
        wins, then the smaller NC name, so the answer is deterministic.
        """
        out: dict[str, dict[str, Any]] = {}
        for name in sorted(self.nodes):
            node = self.nodes[name]
            for inst in node.instances:
                doc = dict(inst)
                doc["node"] = name
                if node.state == LOST and doc.get("state") != "terminated":
                    doc["state"] = LOST
                iid = str(doc.get("instance_id"))
                prev = out.get(iid)
                if prev is None or (prev.get("state") == "terminated" and doc.get("state") != "terminated"):
                    out[iid] = doc
        return out

    def find(self, instance_id: str) -> dict[str, Any] | None:
        return self.instances().get(instance_id)

    def with_instance(self, node: str, inst: Mapping[str, Any]) -> ClusterView:
        """This view with `inst` (an NC's answer to run/terminate/attach/detach) put on `node`."""
        nv = self.nodes.get(node)
        if nv is None:
            return self
        others = tuple(i for i in nv.instances if i.get("instance_id") != inst.get("instance_id"))
        nodes = dict(self.nodes)
        nodes[node] = replace(nv, instances=(*others, dict(inst)))
        return ClusterView(nodes, self.generation)


def rebuild(
    previous: ClusterView | None,
    members: Iterable[str],
    answers: Mapping[str, Mapping[str, Any] | BaseException | str],
) -> ClusterView:
    """The view after one poll: `answers` maps each NC polled to its ``nc.describe`` answer or
    to why it did not answer (an exception or a message)."""
    prev_nodes = previous.nodes if previous is not None else {}
    nodes: dict[str, NodeView] = {}
    for name in sorted(set(members)):
        ans = answers.get(name, "not polled")
        if isinstance(ans, Mapping):
            nodes[name] = NodeView(
                name=name,
                state=UP,
                cores=int(ans.get("cores") or 0),
                memory_mib=int(ans.get("memory_mib") or 0),
                disk_gib=int(ans.get("disk_gib") or 0),
                runtime_node=ans.get("runtime_node"),
                instances=tuple(dict(i) for i in ans.get("instances") or ()),
            )
        else:
            old = prev_nodes.get(name)
            reason = str(ans) or type(ans).__name__
            if old is None:
                nodes[name] = NodeView(name=name, state=LOST, reason=reason)
            else:
                nodes[name] = replace(old, state=LOST, reason=reason)
    gen = (previous.generation if previous is not None else 0) + 1
    return ClusterView(nodes, gen)


def place(view: ClusterView, requests: Sequence[Mapping[str, Any]]) -> list[str]:
    """The NC of each request (``{"cores", "memory_mib", "disk_gib"}``), in order (see above)."""
    free = {name: n.free() for name, n in view.nodes.items() if n.state == UP}
    out: list[str] = []
    for i, req in enumerate(requests):
        need = {k: int(req[k]) for k in RESOURCES}
        fits = [name for name, f in free.items() if all(f[k] >= need[k] for k in RESOURCES)]
        if not fits:
            total = {k: sum(f[k] for f in free.values()) for k in RESOURCES}
            raise InsufficientCapacity(
                f"no node has room for instance {i + 1} of {len(requests)} "
                f"({need['cores']} cores, {need['memory_mib']} MiB, {need['disk_gib']} GiB; "
                f"{len(free)} nodes up, {total['cores']} cores free in all)"
            )
        best = min(fits, key=lambda n: (-free[n]["cores"], -free[n]["memory_mib"], n))
        for k in RESOURCES:
            free[best][k] -= need[k]
        out.append(best)
    return out
