"""The runtime config loader: strict validation with dotted-path errors, and roundtrips."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from euca_runtime.config import (
    COMPONENT_TYPES,
    PARTITIONED,
    Address,
    ConfigError,
    ProbeTarget,
    config_to_dict,
    dump_config,
    load_config,
    loads_config,
    parse_config,
)

EXAMPLE = """
node: node-a
listen: 127.0.0.1:7100
admin: 127.0.0.1:7180
data_dir: data
tls: {ca: pki/ca.crt, cert: pki/node-a.crt, key: pki/node-a.key}
peers:
  node-b: 127.0.0.2:7100
  node-c: "[::1]:7100"
voters: [node-a, node-b, node-c]
components:
  - {type: clc}
  - {type: sc, partition: cluster01, role: primary}
  - {type: kv, name: kv-main}
timing: {lease_duration: 3}
routes:
  - name: users
    targets: [{icmp: 192.0.2.1}, {tcp: "gw.example.org:443"}]
api: {s3: 127.0.0.1:8775}
"""


def minimal() -> dict[str, Any]:
    return {
        "node": "n1",
        "listen": "127.0.0.1:7100",
        "admin": "127.0.0.1:7180",
        "data_dir": "/var/lib/euca",
        "tls": {"ca": "/pki/ca.crt", "cert": "/pki/n1.crt", "key": "/pki/n1.key"},
        "voters": ["n1"],
    }


def test_example_loads_with_defaults(tmp_path: Path) -> None:
    (tmp_path / "runtime.yml").write_text(EXAMPLE)
    cfg = load_config(tmp_path / "runtime.yml")
    assert cfg.node == "node-a"
    assert cfg.listen == Address("127.0.0.1", 7100)
    assert cfg.data_dir == tmp_path / "data"  # relative to the config file
    assert cfg.database_url == f"sqlite:///{tmp_path / 'data' / 'euca.db'}"
    assert cfg.tls.key == tmp_path / "pki" / "node-a.key"
    assert cfg.peer_table() == {"node-b": ("127.0.0.2", 7100), "node-c": ("::1", 7100)}
    assert str(cfg.peers["node-c"]) == "[::1]:7100"
    assert [(c.type, c.partition, c.role, c.name) for c in cfg.components] == [
        ("clc", None, "auto", "node-a.clc"),
        ("sc", "cluster01", "primary", "node-a.sc.cluster01"),
        ("kv", None, "auto", "kv-main"),
    ]
    assert cfg.timing.lease_duration == 3.0 and cfg.timing.heartbeat_interval == 0.1
    assert cfg.routes[0].targets == (
        ProbeTarget("icmp", "192.0.2.1"),
        ProbeTarget("tcp", "gw.example.org", 443),
    )
    assert cfg.routes[0].threshold == 3
    assert cfg.api.s3 == Address("127.0.0.1", 8775) and cfg.api.iam is None
    opts = cfg.transport_options()
    assert opts.heartbeat_interval == 0.1 and opts.max_frame == 16 * 1024 * 1024
    assert "database_url" not in repr(cfg)
    assert loads_config(dump_config(cfg)) == cfg


def test_defaults_hold_their_own_invariants() -> None:
    t = parse_config(minimal()).timing
    assert t.heartbeat_interval == 0.1
    assert t.heartbeat_interval < t.suspect_after
    assert t.renew_interval < t.lease_duration - t.drift_margin
    assert t.lease_duration <= 2.0  # failover after a hard failure in about 2 s


def with_change(path: str, value: Any) -> dict[str, Any]:
    """``minimal()`` with the value at a dotted path set (``...`` deletes it)."""
    doc = minimal()
    *parents, last = path.split(".")
    target: Any = doc
    for p in parents:
        target = target.setdefault(p, {})
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("timing.lease_duration", "abc", "timing.lease_duration: must be a number > 0, got 'abc'"),
        ("timing.lease_duration", 0, "timing.lease_duration: must be a number > 0, got 0"),
        ("timing.lease_duration", True, "timing.lease_duration: must be a number > 0, got True"),
        ("timing.lease_duration", float("nan"), "timing.lease_duration: must be a number > 0"),
        ("timing.lease_durations", 2, "timing.lease_durations: unknown key"),
        ("timing.suspect_after", 0.05, "timing.suspect_after: must be greater than heartbeat_interval"),
        ("timing.renew_interval", 1.95, "timing.renew_interval: must be less than lease_duration - drift"),
        ("timing.drift_margin", 5, "timing.drift_margin: must be less than lease_duration"),
        ("timing", [], "timing: must be a mapping, got []"),
        ("nodes", "x", "nodes: unknown key"),
        ("node", ..., "node: required key is missing"),
        ("tls", ..., "tls: required key is missing"),
        ("tls.key", ..., "tls.key: required key is missing"),
        ("tls.key", 5, "tls.key: must be a non-empty string, got 5"),
        ("node", False, "node: must be a name"),
        ("node", "a b", "node: must be a name"),
        ("listen", "127.0.0.1", "listen: must be a 'host:port' string"),
        ("listen", 7100, "listen: must be a 'host:port' string, got 7100"),
        ("listen", "127.0.0.1:0", "listen: port must be an integer from 1 to 65535"),
        ("listen", "127.0.0.1:65536", "listen: port must be an integer from 1 to 65535"),
        ("listen", "127.0.0.1:-1", "listen: port must be an integer from 1 to 65535"),
        ("listen", "::1:7100", "listen: must be a 'host:port' string ('[v6-address]:port' for IPv6)"),
        ("listen", "bad_host!:7100", "listen: must be an IP address or a host name"),
        ("admin", "127.0.0.1:7100", "admin: same address as listen"),
        ("api.s3", "127.0.0.1:7180", "api.s3: same address as admin"),
        ("api.sqs", "127.0.0.1:9000", "api.sqs: unknown key"),
        ("voters", ["n1", "n2"], "voters: must list an odd number"),
        ("voters", [], "voters: must list an odd number"),
        ("voters", "n1", "voters: must be a list, got 'n1'"),
        ("voters", ["n1", "zz", "yy"], "voters[1]: must be this node or one of peers, got 'zz'"),
        ("peers", {"n1": "127.0.0.2:7100"}, "peers.n1: this process's own node name"),
        ("peers", {"n2": "127.0.0.2"}, "peers.n2: must be a 'host:port' string"),
        ("peers", {"n2": "127.0.0.2:99999"}, "peers.n2: port must be an integer from 1 to 65535"),
        ("peers", ["n2"], "peers: must be a mapping"),
        ("peers", False, "peers: must be a mapping"),
        ("peers", {5: "127.0.0.2:1"}, "peers: must be a name"),
        ("database_url", "just-a-file.db", "database_url: must be a database URL"),
        ("log_level", "loud", "log_level: must be one of debug, info, warning, error"),
        ("components", {"type": "clc"}, "components: must be a list"),
        ("components", [{"type": "ftp"}], "components[0].type: must be one of clc, walrus"),
        ("components", [{"partition": "c1"}], "components[0].type: required key is missing"),
        ("components", [{"type": "sc"}], "components[0].partition: required for a sc"),
        ("components", [{"type": "clc", "partition": "c1"}], "components[0].partition: a clc is cloud-wide"),
        ("components", [{"type": "clc", "role": "boss"}], "components[0].role: must be one of auto, primary"),
        ("components", [{"type": "clc", "colour": 1}], "components[0].colour: unknown key"),
        ("components", [{"type": "clc"}, {"type": "clc"}], "components[1]: duplicate component"),
        (
            "components",
            [{"type": "kv", "name": "x"}, {"type": "clc", "name": "x"}],
            "components[1].name: duplicate component name, got 'x'",
        ),
        ("routes", [{"name": "r"}], "routes[0].targets: required key is missing"),
        ("routes", [{"name": "r", "targets": []}], "routes[0].targets: must list at least one target"),
        ("routes", [{"name": "r", "targets": [{"udp": "h"}]}], "routes[0].targets[0].udp: unknown key"),
        (
            "routes",
            [{"name": "r", "targets": [{"icmp": "h", "tcp": "h:1"}]}],
            "routes[0].targets[0]: must be a mapping with exactly one of",
        ),
        (
            "routes",
            [{"name": "r", "targets": [{"tcp": "h"}]}],
            "routes[0].targets[0].tcp: must be a 'host:port'",
        ),
        (
            "routes",
            [{"name": "r", "targets": [{"icmp": "h"}], "threshold": 0}],
            "routes[0].threshold: must be",
        ),
        (
            "routes",
            [{"name": "r", "targets": [{"icmp": "h"}]}, {"name": "r", "targets": [{"icmp": "g"}]}],
            "routes[1].name: duplicate route name, got 'r'",
        ),
        ("bus.queue_size", 0, "bus.queue_size: must be an integer from 1 to 1000000, got 0"),
        ("bus.max_frame_bytes", 1.5, "bus.max_frame_bytes: must be an integer"),
    ],
)
def test_errors_name_the_bad_key(path: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_change(path, value))
    assert str(info.value).startswith(message), str(info.value)


def test_duplicate_voter() -> None:
    doc = minimal() | {"peers": {"n2": "127.0.0.2:7100"}, "voters": ["n1", "n2", "n2"]}
    with pytest.raises(ConfigError, match=r"^voters\[2\]: duplicate voter, got 'n2'"):
        parse_config(doc)


def test_top_level_and_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^\(top level\): must be a mapping, got None"):
        loads_config("")
    with pytest.raises(ConfigError, match="not valid YAML"):
        loads_config("node: [unclosed")
    with pytest.raises(ConfigError, match="line 2: duplicate key 'node'"):
        loads_config("node: a\nnode: b\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yml")
    (tmp_path / "c.yml").write_text("node: n1\n")
    with pytest.raises(ConfigError, match=r"c\.yml: listen: required key is missing"):
        load_config(tmp_path / "c.yml")


# --- hypothesis ---------------------------------------------------------------------------------

KEYS = (
    "node listen admin data_dir tls voters peers components timing routes api bus type partition name"
    " targets ca cert key icmp tcp threshold interval role lease_duration"
).split()
yamlish = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["127.0.0.1:7100", "n1", "clc", "sc", "[::1]:1", "a:b:c", "0.1", "icmp", "tcp"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(KEYS) | st.text(max_size=6) | st.integers(0, 3),
            inner,
            max_size=6,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=400)
@given(yamlish)
def test_arbitrary_documents_raise_only_config_error(doc: Any) -> None:
    try:
        parse_config(doc)
    except ConfigError:
        pass


@settings(max_examples=200)
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    try:
        loads_config(text)
    except ConfigError:
        pass


names = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
hosts = st.sampled_from(["127.0.0.1", "10.1.2.3", "::1", "fe80::1", "host.example.org", "localhost"])
ports = st.integers(1, 65535)


def addr(host: str, port: int) -> str:
    return str(Address(host, port))


@st.composite
def valid_configs(draw: st.DrawFn) -> dict[str, Any]:
    node = draw(names)
    peer_names = draw(st.lists(names.filter(lambda n: n != node), unique=True, max_size=5))
    everyone = [node, *peer_names]
    n_voters = draw(st.sampled_from([k for k in (1, 3, 5) if k <= len(everyone)]))
    voters = draw(st.permutations(everyone))[:n_voters]
    listen_port, admin_port, *api_ports = draw(st.lists(ports, min_size=5, max_size=5, unique=True))
    doc: dict[str, Any] = {
        "node": node,
        "listen": addr(draw(hosts), listen_port),
        "admin": addr(draw(hosts), admin_port),
        "data_dir": "/srv/" + draw(names),
        "tls": {"ca": "/pki/ca.crt", "cert": f"/pki/{node}.crt", "key": f"/pki/{node}.key"},
        "voters": voters,
    }
    if peer_names:
        doc["peers"] = {p: addr(draw(hosts), draw(ports)) for p in peer_names}
    if draw(st.booleans()):
        doc["database_url"] = "postgresql://euca@db/" + draw(names)
    groups = draw(
        st.lists(
            st.tuples(st.sampled_from(COMPONENT_TYPES), st.sampled_from([None, "cluster01", "c2"])),
            unique=True,
            max_size=6,
        )
    )
    components: list[dict[str, Any]] = []
    for ctype, part in groups:
        if ctype in PARTITIONED and part is None:
            part = "cluster09"
        if ctype in {"clc", "walrus", "arbitrator"}:
            part = None
        item: dict[str, Any] = {"type": ctype, "role": draw(st.sampled_from(["auto", "primary", "backup"]))}
        if part is not None:
            item["partition"] = part
        if (ctype, part) not in {(c["type"], c.get("partition")) for c in components}:
            components.append(item)
    doc["components"] = components
    lease = draw(st.floats(0.5, 10))
    drift = draw(st.floats(0.01, 0.2)) * lease
    hb = draw(st.floats(0.01, 1))
    doc["timing"] = {
        "heartbeat_interval": hb,
        "suspect_after": hb * draw(st.floats(1.5, 20)),
        "lease_duration": lease,
        "renew_interval": (lease - drift) * draw(st.floats(0.1, 0.9)),
        "drift_margin": drift,
    }
    route_names = draw(st.lists(names, unique=True, max_size=3))
    doc["routes"] = [
        {
            "name": r,
            "targets": draw(
                st.lists(
                    st.sampled_from([{"icmp": "192.0.2.1"}, {"tcp": "192.0.2.2:443"}, {"tcp": "[::1]:80"}]),
                    min_size=1,
                    max_size=3,
                    unique_by=str,
                )
            ),
            "threshold": draw(st.integers(1, 10)),
            "interval": draw(st.floats(0.1, 10)),
        }
        for r in route_names
    ]
    doc["api"] = {
        k: addr("127.0.0.1", p)
        for k, p in zip(["iam", "ec2", "s3"], api_ports, strict=False)
        if draw(st.booleans())
    }
    doc["log_level"] = draw(st.sampled_from(["debug", "info", "warning", "error"]))
    return doc


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(valid_configs())
def test_valid_configs_roundtrip(doc: dict[str, Any]) -> None:
    original = copy.deepcopy(doc)
    cfg = parse_config(doc)
    assert doc == original  # the input is not modified
    assert parse_config(config_to_dict(cfg)) == cfg
    assert loads_config(dump_config(cfg)) == cfg
    assert loads_config(yaml.safe_dump(doc)) == cfg


@st.composite
def mutated_configs(draw: st.DrawFn) -> Any:
    """A valid config with one place broken: replaced, deleted or given an extra key."""
    doc = draw(valid_configs())
    spots: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                spots.append((node, k))
                walk(v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                spots.append((node, i))
                walk(v)

    walk(doc)
    container, key = draw(st.sampled_from(spots))
    action = draw(st.sampled_from(["replace", "delete", "extra"]))
    if action == "replace":
        container[key] = draw(yamlish)
    elif action == "delete":
        del container[key]
    elif isinstance(container, dict):
        container[draw(st.text(max_size=5) | st.integers())] = draw(yamlish)
    return doc


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_configs())
def test_broken_valid_configs_raise_only_config_error(doc: Any) -> None:
    try:
        parse_config(doc)
    except ConfigError:
        pass
