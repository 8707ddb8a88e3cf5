"""Online voter-set changes in a running process (I3: a non-HA cloud becomes HA online).

The protocol is in `euca_runtime.lease` (versioned voter configurations, joint consensus);
this module is the process side of it:

* **The bootstrap voter set.** The first start of a node records its configuration's
  ``voters`` in ``<data_dir>/voters.json``: a brand-new group starts from that set (version
  (0, 0)). The ``voters`` list of the configuration file is, from then on, the *target*.
* **Reload** (`reload`, what ``SIGHUP`` and ``POST /v1/reload`` do): the configuration file is
  read again; ``peers`` and ``voters`` (and ``join``) take effect at once: new peers are dialled,
  the process becomes a voter if it is now one, and every hosted instance's lease client gets
  the new target, so the lease holder of each group moves the group's voters there while it
  keeps serving (no restart). Any other changed key is reported as ``ignored`` (it needs a
  restart).
* **The cloud-level configuration** (`cloud_config_loop`): voters of nodes started with
  ``join: true`` refuse bootstrap configurations until they record the cloud-level voter
  configuration that names them. The node of the clc primary (or, without a clc group, the
  first node holding a lease) sends it once every replicated group of the topology has an
  ENABLED instance whose voter configuration is exactly the target, and a target voter still
  reports join mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from euca_runtime.component import RequestError
from euca_runtime.config import ConfigError, RuntimeConfig, config_to_dict, load_config
from euca_runtime.lease import CLOUD, ConfigUpdate, Send, Voter
from euca_runtime.log import get_logger

if TYPE_CHECKING:
    from euca_runtime.node import Node

log = get_logger("reconfig")

BOOTSTRAP_FILE = "voters.json"
CLOUD_CONFIG_INTERVAL = 0.5
RELOADABLE = frozenset({"peers", "voters", "join"})


def load_bootstrap(cfg: RuntimeConfig) -> tuple[str, ...]:
    """The voter set this node's groups start from (recorded at the node's first start)."""
    path = cfg.data_dir / BOOTSTRAP_FILE
    try:
        doc = json.loads(path.read_text())
        voters = tuple(str(v) for v in doc["bootstrap"])
        if voters and len(voters) % 2 == 1:
            return voters
        log.warning("unusable bootstrap voter set, using the configuration's", extra={"path": str(path)})
    except FileNotFoundError:
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"bootstrap": list(cfg.voters)}) + "\n")
        os.replace(tmp, path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("cannot read the bootstrap voter set", extra={"path": str(path), "reason": str(exc)})
    return tuple(cfg.voters)


async def reload(node: Node) -> dict[str, Any]:
    """Re-read the node's configuration file and apply peers and voters (see the module doc)."""
    path = node.config_path
    if path is None:
        raise RequestError("NoConfigFile", f"{node.name} was not started from a configuration file")
    try:
        new = await asyncio.to_thread(load_config, path)
    except ConfigError as exc:
        raise RequestError("BadConfig", str(exc)) from None
    old = node.cfg
    if new.node != old.node:
        raise RequestError("BadConfig", f"{path}: node is {new.node!r}, this process is {old.node!r}")
    before, after = config_to_dict(old), config_to_dict(new)
    changed = sorted(k for k in RELOADABLE if before.get(k) != after.get(k))
    ignored = sorted(k for k in after if k not in RELOADABLE and before.get(k) != after.get(k))
    ep = node.endpoint
    if ep is not None:
        for name, addr in new.peers.items():
            if ep.peers.get(name) != (addr.host, addr.port):
                ep.set_peer(name, addr.host, addr.port)
    node.cfg = dataclasses.replace(old, peers=new.peers, voters=new.voters, join=new.join)
    if node.voter is None and node.name in new.voters and node.core is not None:
        from euca_runtime.component import SqlVoterStorage

        node.voter = await asyncio.to_thread(
            Voter,
            node.name,
            SqlVoterStorage(node.core),
            node.lease_config,
            node.clock.monotonic(),
            joining=new.join,
        )
    for inst in node.instances.values():
        if inst.candidate is not None:
            inst.candidate.set_target(new.voters)
    log.info(
        "configuration reloaded",
        extra={"node": node.name, "voters": list(new.voters), "changed": changed, "ignored": ignored},
    )
    node.gossip_soon()
    return {
        "node": node.name,
        "voters": list(new.voters),
        "peers": sorted(new.peers),
        "changed": changed,
        "ignored": ignored,
    }


def _enabled_by_group(node: Node) -> dict[str, Mapping[str, Any]]:
    """The ENABLED instance status of every replicated group (highest epoch), fresh views only."""
    docs: list[Mapping[str, Any]] = [i.status() for i in node.instances.values()]
    for peer, view in node.views.items():
        if node._fresh(peer):
            docs += list(view.doc.get("instances", ()))
    out: dict[str, Mapping[str, Any]] = {}
    for i in docs:
        if not i.get("replicated") or i.get("state") != "ENABLED":
            continue
        group = str(i.get("group"))
        if group not in out or int(i.get("epoch") or 0) > int(out[group].get("epoch") or 0):
            out[group] = i
    return out


def _groups(node: Node) -> set[str]:
    groups = {i.group for i in node.instances.values() if i.replicated}
    for view in node.views.values():
        groups |= {str(i.get("group")) for i in view.doc.get("instances", ()) if i.get("replicated")}
    return groups


def _joining_voters(node: Node) -> dict[str, bool]:
    out: dict[str, bool] = {}
    if node.voter is not None:
        out[node.name] = node.voter.joining
    for peer, view in node.views.items():
        if view.doc.get("voter"):
            out[peer] = bool(view.doc.get("voter_joining"))
    return out


def cloud_config_sends(node: Node) -> list[Send]:
    """The cloud-level configuration, when it is due and this node is the one to send it."""
    target = frozenset(node.cfg.voters)
    joining = _joining_voters(node)
    if not any(joining.get(v) for v in target):
        return []
    enabled = _enabled_by_group(node)
    groups = _groups(node)
    if not groups or not groups <= set(enabled):
        return []
    sender = "clc" if "clc" in enabled else min(enabled)
    local = node.by_group.get(sender)
    if local is None or local.name != enabled[sender].get("name"):
        return []
    versions = []
    for doc in enabled.values():
        cfg = doc.get("voter_config")
        if not cfg or cfg.get("joint") or doc.get("voter_config_pending"):
            return []
        if frozenset(cfg["sets"][0]) != target:
            return []
        versions.append(tuple(cfg["version"]))
    msg = ConfigUpdate(CLOUD, node.name, 0, max(versions), (tuple(sorted(target)),))
    return [Send(v, msg) for v in sorted(target)]


async def cloud_config_loop(node: Node) -> None:
    while True:
        await asyncio.sleep(CLOUD_CONFIG_INTERVAL)
        with contextlib.suppress(KeyError, TypeError, ValueError, IndexError):
            sends = cloud_config_sends(node)
            if sends:
                log.info("cloud voter configuration sent", extra={"voters": sorted(node.cfg.voters)})
                node.send(sends)


def voters_doc(node: Node) -> dict[str, Any]:
    """``GET /v1/voters`` / ``eucactl describe-voters``: every group's voter configuration."""
    enabled = _enabled_by_group(node)
    groups = []
    for group in sorted(_groups(node)):
        doc = enabled.get(group)
        groups.append(
            {
                "group": group,
                "holder": None if doc is None else doc.get("name"),
                "epoch": None if doc is None else doc.get("epoch"),
                "config": None if doc is None else doc.get("voter_config"),
                "pending": None if doc is None else doc.get("voter_config_pending"),
            }
        )
    return {
        "node": node.name,
        "target": list(node.cfg.voters),
        "voters": [{"node": n, "joining": j} for n, j in sorted(_joining_voters(node).items())],
        "groups": groups,
    }
