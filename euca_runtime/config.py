"""The configuration of one runtime process: ``euca-runtime serve --config FILE``.

Example (every key shown; the optional ones with their defaults)::

    node: node-a                      # this process's node name (= its certificate CN)
    listen: 10.0.0.11:7100            # bus listener (mutual TLS), "host:port"
    admin: 10.0.0.11:7180             # admin HTTP: eucactl and Prometheus /metrics
    data_dir: /var/lib/euca-runtime   # relative paths are relative to the config file
    database_url: null                # default: sqlite:///<data_dir>/euca.db
    tls: {ca: pki/ca.crt, cert: pki/node-a.crt, key: pki/node-a.key}
    credential_key: pki/credentials.key  # the cloud's secret (32 random bytes, 0600) that
                                      # encrypts access-key secrets at rest; needed by clc hosts
    peers:                            # the other processes, by node name
      node-b: 10.0.0.12:7100
      node-c: 10.0.0.13:7100
    voters: [node-a, node-b, node-c]  # odd count; each is this node or a peer (see below)
    join: false                       # true: this node is added to a running cloud (see below)
    components:                       # what this process hosts
      - {type: clc}
      - {type: sc, partition: cluster01, role: primary}   # role: auto | primary | backup
      - {type: kv, name: kv-main}     # name default: <node>.<type>[.<partition>]
      - {type: nc, partition: cluster01, options: {cores: 8}}  # options: docs/cluster.md
    timing:                           # seconds
      heartbeat_interval: 0.1
      suspect_after: 1.0
      lease_duration: 1.0
      renew_interval: 0.25
      drift_margin: 0.05
    routes:                           # arbitrator routes (docs/arbitrator.md)
      - name: users
        targets: [{icmp: 192.0.2.1}, {tcp: "192.0.2.2:443"}]
        nodes: [node-a]               # the nodes whose users come over this route (default none:
                                      # the route is only watched and reported)
        threshold: 3                  # consecutive failed rounds before the route is down
        recover: 3                    # consecutive good rounds before a DOWN route is UP again
        interval: 1.0                 # seconds between probe rounds
        timeout: 1.0                  # one probe's timeout (default: min(interval, 1.0))
        failback: manual              # or {after: 60}: move the primary back after 60 s UP
    api: {iam: 10.0.0.11:8773, ec2: 10.0.0.11:8774, s3: 10.0.0.11:8775,   # each optional
          kv: 10.0.0.11:8776}
    vips:                             # service VIPs (euca_runtime.vip): held while ENABLED
      - {group: walrus, address: 10.0.0.100/24}   # interface: default the listen address's
    bus: {max_frame_bytes: 16777216, queue_size: 1024, connect_timeout: 2.0,
          idle_timeout: 5.0, idempotency_ttl: 120.0, idempotency_entries: 10000}
    log_level: info

``voters`` bootstraps a brand-new cloud: the first start of a node records it (in
``<data_dir>/voters.json``) as the voter set its groups start from. Afterwards it is the
*target*: change it (on every node), then reload (``SIGHUP`` or ``POST /v1/reload``), and the
lease holder of every group moves the group's voters there online (joint consensus, see
`euca_runtime.lease`). ``peers`` and ``voters`` are reloadable; other keys need a restart.
``join: true`` marks a node started to join a running cloud: its voter refuses bootstrap
configurations and its instances learn each group's voters from the voters, never from this
file, until the cloud-level voter configuration naming it is recorded.

Validation is strict: unknown keys, wrong types, missing required keys, bad values and
inconsistent combinations all raise :class:`ConfigError` with the dotted path of the
offending key, e.g. ``timing.lease_duration: must be a number > 0, got 'abc'``.
"""

from __future__ import annotations

import ipaddress
import math
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from euca_runtime.vip import VipConfigError, VipSpec, parse_vips

if TYPE_CHECKING:
    from euca_runtime.transport import TransportOptions

COMPONENT_TYPES = ("clc", "walrus", "sc", "cc", "nc", "arbitrator", "kv")
PARTITIONED = frozenset({"sc", "cc", "nc"})  # one per cluster: partition required
CLOUD_SCOPED = frozenset({"clc", "walrus", "arbitrator"})  # partition forbidden; kv: optional
ROLES = ("auto", "primary", "backup")
LOG_LEVELS = ("debug", "info", "warning", "error")
API_NAMES = ("iam", "ec2", "s3", "kv")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"{_LABEL}(\.{_LABEL})*")


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the dotted path of the bad key."""


# --- the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """A TCP address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TlsPaths:
    """The cluster CA certificate, this node's certificate and its private key."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class ComponentSpec:
    """One component instance hosted by this process."""

    type: str
    name: str
    partition: str | None = None
    role: str = "auto"  # a hint: "primary" = preferred primary, "backup" = never preferred
    options: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """Type-specific settings (``nc``: capacity and driver, ``cc``: poll interval; see
    docs/cluster.md), validated at load by `euca_runtime.cluster.options`."""


@dataclass(frozen=True)
class Timing:
    """Failure-detection and lease timing, in seconds."""

    heartbeat_interval: float = 0.1
    suspect_after: float = 1.0
    lease_duration: float = 1.0  # kill -9 of a holder: failover p50 < 1 s even without a death certificate
    renew_interval: float = 0.25
    drift_margin: float = 0.05  # >= 2 * 1% drift * duration, with room to spare


@dataclass(frozen=True)
class ProbeTarget:
    """An arbitrator probe: ICMP echo to ``host`` or a TCP connect to ``host:port``."""

    kind: str  # "icmp" | "tcp"
    host: str
    port: int | None = None

    def __str__(self) -> str:
        return f"icmp {self.host}" if self.kind == "icmp" else f"tcp {Address(self.host, self.port or 0)}"


@dataclass(frozen=True)
class Route:
    """A user-facing route watched by an arbitrator."""

    name: str
    targets: tuple[ProbeTarget, ...]
    threshold: int = 3
    interval: float = 1.0
    nodes: tuple[str, ...] = ()
    """The runtime nodes whose users come over this route: their replicated instances give up
    their leases while it is DOWN."""
    recover: int = 3
    """Consecutive good rounds before a DOWN route counts as UP again (hysteresis)."""
    timeout: float | None = None
    """One probe's timeout; None: min(interval, 1.0)."""
    failback_after: float | None = None
    """None: manual failback (operator only); else seconds of the route UP before the primary
    it evicted takes the lease back."""

    @property
    def probe_timeout(self) -> float:
        return self.timeout if self.timeout is not None else min(self.interval, 1.0)


@dataclass(frozen=True)
class ApiListeners:
    """Where the user APIs listen (each optional)."""

    iam: Address | None = None
    ec2: Address | None = None
    s3: Address | None = None
    kv: Address | None = None  # the internal kv service's HTTP API (tests, benchmarks)


@dataclass(frozen=True)
class BusSettings:
    """Transport tunables (see :class:`euca_runtime.transport.TransportOptions`)."""

    max_frame_bytes: int = 16 * 1024 * 1024
    queue_size: int = 1024
    connect_timeout: float = 2.0
    idle_timeout: float = 5.0
    idempotency_ttl: float = 120.0
    idempotency_entries: int = 10_000


@dataclass(frozen=True)
class RuntimeConfig:
    """The whole validated configuration of one runtime process."""

    node: str
    listen: Address
    admin: Address
    data_dir: Path
    database_url: str = field(repr=False)  # may carry a password
    tls: TlsPaths
    voters: tuple[str, ...]
    peers: Mapping[str, Address] = field(default_factory=lambda: types.MappingProxyType({}))
    components: tuple[ComponentSpec, ...] = ()
    timing: Timing = field(default_factory=Timing)
    routes: tuple[Route, ...] = ()
    api: ApiListeners = field(default_factory=ApiListeners)
    shared_api: ApiListeners = field(default_factory=ApiListeners)
    """Addresses every process serving an API listens on *together* (SO_REUSEPORT), so one
    address reaches whichever of them is alive: a local cloud's single endpoint per API (on
    hosts, a service VIP plays that part)."""
    bus: BusSettings = field(default_factory=BusSettings)
    log_level: str = "info"
    join: bool = False
    credential_key: Path | None = None
    """The cloud-wide secret file that encrypts IAM secret keys at rest (every clc host has it)."""
    vips: tuple[VipSpec, ...] = ()
    """Service VIPs this node holds while its instance of the group is ENABLED (`euca_runtime.vip`)."""

    def transport_options(self) -> TransportOptions:
        """The :class:`~euca_runtime.transport.TransportOptions` this config asks for."""
        from euca_runtime.transport import TransportOptions

        return TransportOptions(
            heartbeat_interval=self.timing.heartbeat_interval,
            suspect_after=self.timing.suspect_after,
            idle_timeout=self.bus.idle_timeout,
            connect_timeout=self.bus.connect_timeout,
            max_frame=self.bus.max_frame_bytes,
            queue_size=self.bus.queue_size,
            idem_ttl=self.bus.idempotency_ttl,
            idem_max_entries=self.bus.idempotency_entries,
        )

    def peer_table(self) -> dict[str, tuple[str, int]]:
        """Peers as the transport's ``{name: (host, port)}`` table."""
        return {name: (a.host, a.port) for name, a in self.peers.items()}


# --- validation helpers ---------------------------------------------------------------------


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(path: str, message: str, *got: Any) -> NoReturn:
    raise ConfigError(f"{path}: {message}" + (f", got {_show(got[0])}" if got else ""))


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _mapping(value: Any, path: str, required: Sequence[str], optional: Sequence[str]) -> dict[str, Any]:
    """A mapping with exactly the allowed keys; returns it as a dict."""
    if not isinstance(value, Mapping):
        _fail(path or "(top level)", "must be a mapping", value)
    for key in value:
        if not isinstance(key, str):
            _fail(path or "(top level)", "keys must be strings", key)
        if key not in required and key not in optional:
            allowed = ", ".join(sorted([*required, *optional]))
            _fail(_join(path, key), f"unknown key (allowed: {allowed})")
    for key in required:
        if key not in value:
            _fail(_join(path, key), "required key is missing")
    return dict(value)


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(path, "must be a non-empty string", value)
    return value


def _name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        _fail(path, "must be a name (letters, digits, '.', '_', '-'; at most 63 characters)", value)
    return value


def _choice(value: Any, path: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        _fail(path, f"must be one of {', '.join(choices)}", value)
    return value


def _number(value: Any, path: str) -> float:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        _fail(path, "must be a number > 0", value)
    if value > 1e9:
        _fail(path, "must be at most 1e9", value)
    return float(value)


def _int(value: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        _fail(path, f"must be an integer from {lo} to {hi}", value)
    return value


def _host(value: Any, path: str) -> str:
    host = _str(value, path)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_RE.fullmatch(host) or len(host) > 253:
            _fail(path, "must be an IP address or a host name", value)
    return host


def _address(value: Any, path: str) -> Address:
    """A ``host:port`` string (IPv6 as ``[addr]:port``)."""
    if not isinstance(value, str):
        _fail(path, "must be a 'host:port' string", value)
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep or ":" not in host:
            _fail(path, "must be a 'host:port' string ('[v6-address]:port' for IPv6)", value)
    else:
        host, sep, port = value.rpartition(":")
        if not sep or ":" in host:
            _fail(path, "must be a 'host:port' string ('[v6-address]:port' for IPv6)", value)
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        _fail(path, "port must be an integer from 1 to 65535", value)
    return Address(_host(host, path), int(port))


def _path(value: Any, path: str, base: Path | None) -> Path:
    text = _str(value, path)
    if "\x00" in text:
        _fail(path, "must be a file system path", value)
    p = Path(text)
    return base / p if base is not None and not p.is_absolute() else p


def _opt(d: Mapping[str, Any], key: str, default: Any) -> Any:
    """``d[key]``, or ``default`` when the key is absent or null (an empty YAML section)."""
    value = d.get(key)
    return default if value is None else value


def _list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        _fail(path, "must be a list", value)
    return list(value)


# --- sections -------------------------------------------------------------------------------


def _tls(value: Any, base: Path | None) -> TlsPaths:
    d = _mapping(value, "tls", ("ca", "cert", "key"), ())
    return TlsPaths(*(_path(d[k], f"tls.{k}", base) for k in ("ca", "cert", "key")))


def _peers(value: Any, node: str) -> types.MappingProxyType[str, Address]:
    if not isinstance(value, Mapping):
        _fail("peers", "must be a mapping of node name to 'host:port'", value)
    out: dict[str, Address] = {}
    for name, addr in value.items():
        path = _join("peers", name) if isinstance(name, str) else "peers"
        _name(name, path)
        if name == node:
            _fail(path, "this process's own node name cannot be one of its peers")
        out[name] = _address(addr, path)
    return types.MappingProxyType(out)


def _voters(value: Any, node: str, peers: Mapping[str, Address]) -> tuple[str, ...]:
    items = _list(value, "voters")
    if not items or len(items) % 2 == 0:
        _fail("voters", "must list an odd number of node names (1, 3, 5, ...)", value)
    seen: set[str] = set()
    for i, voter in enumerate(items):
        _name(voter, f"voters[{i}]")
        if voter in seen:
            _fail(f"voters[{i}]", "duplicate voter", voter)
        if voter != node and voter not in peers:
            _fail(f"voters[{i}]", "must be this node or one of peers", voter)
        seen.add(voter)
    return tuple(items)


def _components(value: Any, node: str) -> tuple[ComponentSpec, ...]:
    out: list[ComponentSpec] = []
    groups: set[tuple[str, str | None]] = set()
    names: set[str] = set()
    for i, item in enumerate(_list(value, "components")):
        path = f"components[{i}]"
        d = _mapping(item, path, ("type",), ("partition", "role", "name", "options"))
        ctype = _choice(d["type"], f"{path}.type", COMPONENT_TYPES)
        partition = d.get("partition")
        if partition is not None:
            partition = _name(partition, f"{path}.partition")
            if ctype in CLOUD_SCOPED:
                _fail(f"{path}.partition", f"a {ctype} is cloud-wide and takes no partition", partition)
        elif ctype in PARTITIONED:
            _fail(f"{path}.partition", f"required for a {ctype} (the cluster it serves)")
        role = _choice(d.get("role", "auto"), f"{path}.role", ROLES)
        default_name = f"{node}.{ctype}" + (f".{partition}" if partition else "")
        name = _name(d["name"], f"{path}.name") if "name" in d else default_name
        # NCs are independent (called by name): a process may host several (a simulated cluster).
        if (ctype, partition) in groups and ctype != "nc":
            where = f" for partition {partition}" if partition else ""
            _fail(path, f"duplicate component: a second {ctype}{where} in this process")
        if name in names:
            _fail(f"{path}.name", "duplicate component name", name)
        groups.add((ctype, partition))
        names.add(name)
        options: dict[str, Any] = {}
        if "options" in d:
            from euca_runtime.cluster.options import check_options

            try:
                options = check_options(ctype, d["options"])
            except ValueError as exc:
                _fail(f"{path}.options", str(exc))
        out.append(ComponentSpec(type=ctype, name=name, partition=partition, role=role, options=options))
    # External CC services (one per cluster): every loopback address one of them uses is its own.
    taken: dict[str, str] = {}
    for i, spec in enumerate(out):
        for key in ("gateway", "service_address"):
            where = f"components[{i}].options.{key}"
            addr = spec.options.get(key) if spec.type == "cc" else None
            if addr is None:
                continue
            if addr in taken:
                _fail(where, f"already used by {taken[addr]}", addr)
            taken[addr] = where
    return tuple(out)


def _timing(value: Any) -> Timing:
    keys = ("heartbeat_interval", "suspect_after", "lease_duration", "renew_interval", "drift_margin")
    d = _mapping(value, "timing", (), keys)
    defaults = Timing()
    t = Timing(**{k: _number(d[k], f"timing.{k}") if k in d else getattr(defaults, k) for k in keys})
    if t.suspect_after <= t.heartbeat_interval:
        _fail("timing.suspect_after", f"must be greater than heartbeat_interval ({t.heartbeat_interval})")
    if t.drift_margin >= t.lease_duration:
        _fail("timing.drift_margin", f"must be less than lease_duration ({t.lease_duration})")
    if t.renew_interval >= t.lease_duration - t.drift_margin:
        limit = t.lease_duration - t.drift_margin
        _fail("timing.renew_interval", f"must be less than lease_duration - drift_margin ({limit:g})")
    return t


def _target(value: Any, path: str) -> ProbeTarget:
    if not isinstance(value, Mapping) or len(value) != 1:
        _fail(path, "must be a mapping with exactly one of icmp: HOST or tcp: 'HOST:PORT'", value)
    d = _mapping(value, path, (), ("icmp", "tcp"))
    if "icmp" in d:
        return ProbeTarget("icmp", _host(d["icmp"], f"{path}.icmp"))
    addr = _address(d["tcp"], f"{path}.tcp")
    return ProbeTarget("tcp", addr.host, addr.port)


def _failback(value: Any, path: str) -> float | None:
    if value == "manual":
        return None
    if isinstance(value, Mapping):
        d = _mapping(value, path, ("after",), ())
        after = d["after"]
        if isinstance(after, int | float) and not isinstance(after, bool) and after == 0:
            return 0.0
        return _number(after, f"{path}.after")
    _fail(path, "must be 'manual' or {after: SECONDS}", value)


def _route_nodes(value: Any, path: str, node: str, peers: Mapping[str, Address]) -> tuple[str, ...]:
    items = _list(value, path)
    seen: set[str] = set()
    for j, name in enumerate(items):
        _name(name, f"{path}[{j}]")
        if name in seen:
            _fail(f"{path}[{j}]", "duplicate node", name)
        if name != node and name not in peers:
            _fail(f"{path}[{j}]", "must be this node or one of peers", name)
        seen.add(name)
    return tuple(items)


def _routes(value: Any, node: str = "", peers: Mapping[str, Address] | None = None) -> tuple[Route, ...]:
    out: list[Route] = []
    names: set[str] = set()
    optional = ("threshold", "interval", "nodes", "recover", "timeout", "failback")
    for i, item in enumerate(_list(value, "routes")):
        path = f"routes[{i}]"
        d = _mapping(item, path, ("name", "targets"), optional)
        name = _name(d["name"], f"{path}.name")
        if name in names:
            _fail(f"{path}.name", "duplicate route name", name)
        names.add(name)
        targets = _list(d["targets"], f"{path}.targets")
        if not targets:
            _fail(f"{path}.targets", "must list at least one target")
        parsed = tuple(_target(t, f"{path}.targets[{j}]") for j, t in enumerate(targets))
        if len(set(parsed)) != len(parsed):
            _fail(f"{path}.targets", "lists the same target twice")
        threshold = _int(d.get("threshold", 3), f"{path}.threshold", 1, 1000)
        interval = _number(d.get("interval", 1.0), f"{path}.interval")
        recover = _int(d.get("recover", 3), f"{path}.recover", 1, 1000)
        nodes = _route_nodes(_opt(d, "nodes", []), f"{path}.nodes", node, peers or {})
        timeout = None
        if d.get("timeout") is not None:
            timeout = _number(d["timeout"], f"{path}.timeout")
            if timeout > interval:
                _fail(f"{path}.timeout", f"must be at most interval ({interval:g})", d["timeout"])
        failback = _failback(_opt(d, "failback", "manual"), f"{path}.failback")
        out.append(
            Route(
                name=name,
                targets=parsed,
                threshold=threshold,
                interval=interval,
                nodes=nodes,
                recover=recover,
                timeout=timeout,
                failback_after=failback,
            )
        )
    return tuple(out)


def _api(value: Any, key: str = "api") -> ApiListeners:
    d = _mapping(value, key, (), API_NAMES)
    return ApiListeners(**{k: _address(v, f"{key}.{k}") for k, v in d.items() if v is not None})


def _bus(value: Any) -> BusSettings:
    d = _mapping(value, "bus", (), tuple(BusSettings.__dataclass_fields__))
    b = BusSettings()
    return BusSettings(
        max_frame_bytes=_int(d.get("max_frame_bytes", b.max_frame_bytes), "bus.max_frame_bytes", 1024, 2**30),
        queue_size=_int(d.get("queue_size", b.queue_size), "bus.queue_size", 1, 1_000_000),
        connect_timeout=_number(d.get("connect_timeout", b.connect_timeout), "bus.connect_timeout"),
        idle_timeout=_number(d.get("idle_timeout", b.idle_timeout), "bus.idle_timeout"),
        idempotency_ttl=_number(d.get("idempotency_ttl", b.idempotency_ttl), "bus.idempotency_ttl"),
        idempotency_entries=_int(
            d.get("idempotency_entries", b.idempotency_entries), "bus.idempotency_entries", 1, 10_000_000
        ),
    )


# --- entry points ---------------------------------------------------------------------------

_REQUIRED = ("node", "listen", "admin", "data_dir", "tls", "voters")
_OPTIONAL = (
    "database_url",
    "peers",
    "components",
    "timing",
    "routes",
    "api",
    "bus",
    "log_level",
    "credential_key",
    "join",
    "shared_api",
    "vips",
)


def parse_config(data: Any, base_dir: Path | None = None) -> RuntimeConfig:
    """Validate an already-parsed document (e.g. from YAML) into a :class:`RuntimeConfig`.

    Relative paths are resolved against ``base_dir`` when given.
    """
    d = _mapping(data, "", _REQUIRED, _OPTIONAL)
    node = _name(d["node"], "node")
    listen = _address(d["listen"], "listen")
    admin = _address(d["admin"], "admin")
    data_dir = _path(d["data_dir"], "data_dir", base_dir)
    db = d.get("database_url")
    if db is None:
        database_url = f"sqlite:///{data_dir / 'euca.db'}"
    else:
        database_url = _str(db, "database_url")
        if "://" not in database_url:
            _fail("database_url", "must be a database URL such as postgresql://... or sqlite:///...", db)
    tls = _tls(d["tls"], base_dir)
    peers = _peers(_opt(d, "peers", {}), node)
    voters = _voters(d["voters"], node, peers)
    components = _components(_opt(d, "components", []), node)
    timing = _timing(_opt(d, "timing", {}))
    routes = _routes(_opt(d, "routes", []), node, peers)
    api = _api(_opt(d, "api", {}))
    shared_api = _api(_opt(d, "shared_api", {}), "shared_api")
    bus = _bus(_opt(d, "bus", {}))
    log_level = _choice(_opt(d, "log_level", "info"), "log_level", LOG_LEVELS)
    join = _opt(d, "join", False)
    if not isinstance(join, bool):
        _fail("join", "must be true or false", join)
    raw_key = d.get("credential_key")
    credential_key = None if raw_key is None else _path(raw_key, "credential_key", base_dir)
    try:
        vips = parse_vips(d.get("vips"))
    except VipConfigError as exc:
        raise ConfigError(str(exc)) from None

    listeners = [("listen", listen), ("admin", admin)]
    listeners += [(f"api.{k}", getattr(api, k)) for k in API_NAMES if getattr(api, k) is not None]
    listeners += [
        (f"shared_api.{k}", getattr(shared_api, k)) for k in API_NAMES if getattr(shared_api, k) is not None
    ]
    seen: dict[tuple[str, int], str] = {}
    for key, addr in listeners:
        if (addr.host, addr.port) in seen:
            _fail(key, f"same address as {seen[(addr.host, addr.port)]}", str(addr))
        seen[(addr.host, addr.port)] = key

    return RuntimeConfig(
        node=node,
        listen=listen,
        admin=admin,
        data_dir=data_dir,
        database_url=database_url,
        tls=tls,
        voters=voters,
        peers=peers,
        components=components,
        timing=timing,
        routes=routes,
        api=api,
        shared_api=shared_api,
        bus=bus,
        log_level=log_level,
        join=join,
        credential_key=credential_key,
        vips=vips,
    )


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable: construct_mapping below reports it
            continue
        if duplicate:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {_show(key)}")
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def loads_config(text: str, base_dir: Path | None = None, source: str = "<config>") -> RuntimeConfig:
    """Parse YAML text and validate it."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    return parse_config(data, base_dir)


def load_config(path: Path | str) -> RuntimeConfig:
    """Read and validate the YAML file at ``path`` (relative paths inside are relative to it)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from None
    try:
        return loads_config(text, base_dir=p.resolve().parent, source=str(p))
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def config_to_dict(cfg: RuntimeConfig) -> dict[str, Any]:
    """The plain-data form of ``cfg``: :func:`parse_config` of it gives ``cfg`` back."""

    def target(t: ProbeTarget) -> dict[str, str]:
        return {"icmp": t.host} if t.kind == "icmp" else {"tcp": str(Address(t.host, t.port or 0))}

    out = {
        "node": cfg.node,
        "listen": str(cfg.listen),
        "admin": str(cfg.admin),
        "data_dir": str(cfg.data_dir),
        "database_url": cfg.database_url,
        "tls": {"ca": str(cfg.tls.ca), "cert": str(cfg.tls.cert), "key": str(cfg.tls.key)},
        "peers": {name: str(addr) for name, addr in cfg.peers.items()},
        "voters": list(cfg.voters),
        "components": [
            {"type": c.type, "name": c.name, "role": c.role}
            | ({"partition": c.partition} if c.partition is not None else {})
            | ({"options": dict(c.options)} if c.options else {})
            for c in cfg.components
        ],
        "timing": {k: getattr(cfg.timing, k) for k in Timing.__dataclass_fields__},
        "routes": [
            {
                "name": r.name,
                "targets": [target(t) for t in r.targets],
                "threshold": r.threshold,
                "interval": r.interval,
                "nodes": list(r.nodes),
                "recover": r.recover,
                "failback": "manual" if r.failback_after is None else {"after": r.failback_after},
            }
            | ({"timeout": r.timeout} if r.timeout is not None else {})
            for r in cfg.routes
        ],
        "api": {k: str(getattr(cfg.api, k)) for k in API_NAMES if getattr(cfg.api, k) is not None},
        "shared_api": {
            k: str(getattr(cfg.shared_api, k)) for k in API_NAMES if getattr(cfg.shared_api, k) is not None
        },
        "bus": {k: getattr(cfg.bus, k) for k in BusSettings.__dataclass_fields__},
        "log_level": cfg.log_level,
        "join": cfg.join,
    } | ({"credential_key": str(cfg.credential_key)} if cfg.credential_key is not None else {})
    if cfg.vips:
        out["vips"] = [
            {"group": v.group, "address": str(v.address)}
            | ({"interface": v.interface} if v.interface else {})
            for v in cfg.vips
        ]
    return out


def dump_config(cfg: RuntimeConfig) -> str:
    """``cfg`` as YAML text that :func:`loads_config` reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
