"""The admin HTTP API of a runtime process (what ``eucactl`` talks to) and its metrics.

Every route except ``GET /v1/ping`` needs ``Authorization: Bearer <admin token>``; the token
lives in ``<data_dir>/admin.token`` (mode 0600, written by ``euca-runtime up`` or the
deployment) and is never logged. Any process answers for the whole cloud: requests about an
instance on another process are forwarded over the bus.

Routes (JSON in, JSON out; errors are ``{"error": TYPE, "message": ...}`` with 4xx/5xx):

==========================================  ========================================================
``GET  /v1/ping``                           liveness, no authentication
``GET  /v1/services[?events=1]``            ``{"services": [...], "events": [...]}``
``POST /v1/services/{name}``                ``{"state": ENABLED|DISABLED|STOPPED}``: modify-service
``POST /v1/switchover``                     ``{"group", "to"}``
``POST /v1/register``                       ``{"name", "type"?, "partition"?, "node"?, "host"?}``
``POST /v1/deregister``                     ``{"name", "force"?}``
``POST /v1/force-promote``                  ``{"name", "accept_data_loss": true}``
``POST /v1/death-certificate``              ``{"group", "holder", "epoch", "issuer"}`` (supervisors)
``POST /v1/fault``                          ``{"name", "fault": "hang"|"error"|null}`` (tests only)
``POST /v1/reload``                         re-read this process's config file (peers, voters)
``GET  /v1/voters``                         every group's voter configuration (describe-voters)
``GET  /v1/status``                         this node's status document
``GET  /v1/iam/admin-credentials``          ``{"account", "user", "access_key", "secret_key"}`` of the
                                            ``eucalyptus/admin`` user (what ``up`` puts in eucarc)
``POST /v1/call``                           ``{"type", "partition"?, "method", "body"?, "timeout"?}``: one
                                            bus call to the group's ENABLED instance, held across a
                                            failover like any bus call (operators, tests), e.g.
                                            ``cc``/``cluster01``/``cc.describe_instances``;
                                            ``{"result": ...}``
``GET  /metrics``                           Prometheus text format
==========================================  ========================================================
"""

from __future__ import annotations

import gc
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from euca_runtime import gc_tuning
from euca_runtime.component import HA_STATES, RequestError, ServiceUnavailable
from euca_runtime.log import get_logger

if TYPE_CHECKING:
    from euca_runtime.node import Node

log = get_logger("admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _err(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": kind, "message": message}, status=status)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        doc = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "BadRequest", "message": "body must be JSON"}),
            content_type="application/json",
        ) from None
    if not isinstance(doc, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "BadRequest", "message": "body must be a JSON object"}),
            content_type="application/json",
        )
    return doc


def make_admin_app(node: Node) -> web.Application:
    """The admin application of `node` (authenticated with ``node.admin_token``)."""
    token = node.admin_token

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/v1/ping":
            return await handler(request)
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if token is None or scheme.lower() != "bearer" or not secrets.compare_digest(value.strip(), token):
            log.warning("admin call refused", extra={"path": request.path, "remote": request.remote})
            return _err(401, "Unauthorized", "a valid admin token is required (Authorization: Bearer ...)")
        try:
            return await handler(request)
        except RequestError as exc:
            return _err(409, exc.kind, exc.message)
        except ServiceUnavailable as exc:
            return _err(503, exc.kind, str(exc))

    async def ping(request: web.Request) -> web.Response:
        return web.json_response({"node": node.name, "ok": True})

    async def services(request: web.Request) -> web.Response:
        doc: dict[str, Any] = {"node": node.name, "services": node.describe()}
        if request.query.get("events") not in (None, "", "0", "false"):
            doc["events"] = await node.cluster_events()
        return web.json_response(doc)

    async def modify(request: web.Request) -> web.Response:
        body = await _body(request)
        state = str(body.get("state", "")).upper()
        result = await node.modify(
            request.match_info["name"], state, timeout=float(body.get("timeout", 15.0))
        )
        log.info("modify-service", extra={"service": request.match_info["name"], "state": state})
        return web.json_response(result)

    async def switchover(request: web.Request) -> web.Response:
        body = await _body(request)
        group, to = str(body.get("group", "")), str(body.get("to", ""))
        if not group or not to:
            return _err(400, "BadRequest", "switchover needs group and to")
        return web.json_response(await node.switchover(group, to, timeout=float(body.get("timeout", 10.0))))

    async def register(request: web.Request) -> web.Response:
        body = await _body(request)
        if not body.get("name"):
            return _err(400, "BadRequest", "register needs a name")
        return web.json_response(await node.register(body))

    async def deregister(request: web.Request) -> web.Response:
        body = await _body(request)
        if not body.get("name"):
            return _err(400, "BadRequest", "deregister needs a name")
        return web.json_response(await node.deregister(str(body["name"]), force=body.get("force") is True))

    async def force_promote(request: web.Request) -> web.Response:
        body = await _body(request)
        if body.get("accept_data_loss") is not True:
            return _err(
                400, "BadRequest", "force-promote may lose acknowledged writes: pass accept_data_loss"
            )
        return web.json_response(await node.force_promote(str(body.get("name", ""))))

    async def death_certificate(request: web.Request) -> web.Response:
        body = await _body(request)
        try:
            group, holder, epoch = str(body["group"]), str(body["holder"]), int(body["epoch"])
        except (KeyError, TypeError, ValueError):
            return _err(400, "BadRequest", "death certificate needs group, holder and epoch")
        released = await node.death_certificate(group, holder, epoch, str(body.get("issuer", "")))
        return web.json_response({"released": released, "voter": node.voter is not None})

    async def fault(request: web.Request) -> web.Response:
        body = await _body(request)
        return web.json_response(await node.fault(str(body.get("name", "")), body.get("fault")))

    async def reload(request: web.Request) -> web.Response:
        from euca_runtime import reconfig

        return web.json_response(await reconfig.reload(node))

    async def voters(request: web.Request) -> web.Response:
        from euca_runtime import reconfig

        return web.json_response(reconfig.voters_doc(node))

    async def status(request: web.Request) -> web.Response:
        return web.json_response(node.status_doc())

    async def admin_credentials(request: web.Request) -> web.Response:
        timeout = float(request.query.get("timeout", "10"))
        doc = await node.call("clc", None, "iam.admin_credentials", {}, timeout=min(max(timeout, 0.1), 60.0))
        return web.json_response(doc)

    async def call(request: web.Request) -> web.Response:
        body = await _body(request)
        type_, method = body.get("type"), body.get("method")
        partition = body.get("partition")
        if not isinstance(type_, str) or not type_ or not isinstance(method, str) or not method:
            return _err(400, "BadRequest", "call needs type and method (strings)")
        if partition is not None and not isinstance(partition, str):
            return _err(400, "BadRequest", "partition must be a string")
        try:
            timeout = min(max(float(body.get("timeout", 10.0)), 0.1), 120.0)
        except (TypeError, ValueError):
            return _err(400, "BadRequest", "timeout must be a number of seconds")
        result = await node.call(type_, partition, method, body.get("body"), timeout=timeout)
        log.info("admin call", extra={"group": f"{type_}/{partition}", "method": method})
        return web.json_response({"result": result})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=render_metrics(node), content_type="text/plain", charset="utf-8")

    app = web.Application(middlewares=[auth], client_max_size=1024 * 1024)
    app.router.add_get("/v1/ping", ping)
    app.router.add_get("/v1/services", services)
    app.router.add_post("/v1/services/{name}", modify)
    app.router.add_post("/v1/switchover", switchover)
    app.router.add_post("/v1/register", register)
    app.router.add_post("/v1/deregister", deregister)
    app.router.add_post("/v1/force-promote", force_promote)
    app.router.add_post("/v1/death-certificate", death_certificate)
    app.router.add_post("/v1/fault", fault)
    app.router.add_post("/v1/reload", reload)
    app.router.add_get("/v1/voters", voters)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/iam/admin-credentials", admin_credentials)
    app.router.add_post("/v1/call", call)
    app.router.add_get("/metrics", metrics)
    return app


# --------------------------------------------------------------------------- metrics


def _labels(**kv: Any) -> str:
    parts = []
    for k, v in kv.items():
        text = "" if v is None else str(v)
        text = text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{k}="{text}"')
    return "{" + ",".join(parts) + "}"


def render_metrics(node: Node) -> str:
    """This process's metrics in the Prometheus text exposition format."""
    out: list[str] = []
    now = node.clock.monotonic()

    def family(name: str, kind: str, help_: str) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")

    family("euca_service_state", "gauge", "1 for the state each hosted instance is in")
    for inst in node.instances.values():
        for st in HA_STATES:
            labels = _labels(name=inst.name, type=inst.type, partition=inst.partition, state=st)
            out.append(f"euca_service_state{labels} {1 if inst.state == st else 0}")
    family("euca_service_epoch", "gauge", "Epoch of each hosted instance (held, or highest seen)")
    for inst in node.instances.values():
        out.append(f"euca_service_epoch{_labels(name=inst.name, group=inst.group)} {inst.epoch}")
    family("euca_lease_remaining_seconds", "gauge", "Holder-side lease time left (0 when not holding)")
    family("euca_lease_age_seconds", "gauge", "Seconds since the held lease was last confirmed valid")
    for inst in node.instances.values():
        cand = inst.candidate
        if cand is None:
            continue
        end = cand.lease_end()
        remaining = max(0.0, end - now) if inst.is_writer(now) else 0.0
        age = (
            max(0.0, node.lease_config.duration - node.lease_config.margin - remaining) if remaining else 0.0
        )
        labels = _labels(name=inst.name, group=inst.group)
        out.append(f"euca_lease_remaining_seconds{labels} {remaining:.4f}")
        out.append(f"euca_lease_age_seconds{labels} {age:.4f}")
    family("euca_replication_lag_records", "gauge", "Change records each backup is behind this primary")
    for inst in node.instances.values():
        for member, lag in sorted(inst.lags.items()):
            if lag is not None:
                out.append(f"euca_replication_lag_records{_labels(group=inst.group, member=member)} {lag}")
    family("euca_replication_seq", "gauge", "Last change record applied by each hosted instance")
    for inst in node.instances.values():
        if inst.replicated:
            out.append(f"euca_replication_seq{_labels(name=inst.name, group=inst.group)} {inst.last_seq}")
    family("euca_gc_collections_total", "counter", "Garbage collections of this process, per generation")
    family("euca_gc_pause_seconds_total", "counter", "Seconds spent in garbage collections, per generation")
    for gen in range(3):
        out.append(f'euca_gc_collections_total{{generation="{gen}"}} {gc_tuning.PAUSES.count[gen]}')
        out.append(f'euca_gc_pause_seconds_total{{generation="{gen}"}} {gc_tuning.PAUSES.seconds[gen]:.6f}')
    family("euca_gc_pause_longest_seconds", "gauge", "The longest garbage collection of this process")
    out.append(f"euca_gc_pause_longest_seconds {gc_tuning.PAUSES.longest:.6f}")
    family(
        "euca_gc_frozen_objects", "gauge", "Objects frozen after start-up (never scanned by the collector)"
    )
    out.append(f"euca_gc_frozen_objects {gc.get_freeze_count()}")
    family("euca_elections_total", "counter", "Leases won by this process, per group")
    for group, n in sorted(node.metrics.elections.items()):
        out.append(f"euca_elections_total{_labels(group=group)} {n}")
    family("euca_failovers_total", "counter", "Leases won by this process for a group that had data before")
    for group, n in sorted(node.metrics.failovers.items()):
        out.append(f"euca_failovers_total{_labels(group=group)} {n}")
    family("euca_step_downs_total", "counter", "Leases given up by this process, per group and reason")
    for (group, reason), n in sorted(node.metrics.step_downs.items()):
        out.append(f"euca_step_downs_total{_labels(group=group, reason=reason)} {n}")
    family("euca_requests_total", "counter", "Requests served by hosted instances")
    for (group, method, outcome), n in sorted(node.metrics.requests.items()):
        out.append(f"euca_requests_total{_labels(group=group, method=method, outcome=outcome)} {n}")
    family("euca_request_latency_seconds", "histogram", "Latency of requests served by hosted instances")
    for (group, method), buckets in sorted(node.metrics.latency.items()):
        for bound, count in zip(node.metrics.BUCKETS, buckets, strict=True):
            labels = _labels(group=group, method=method, le=bound)
            out.append(f"euca_request_latency_seconds_bucket{labels} {int(count)}")
        total = node.metrics.latency_count[(group, method)]
        out.append(
            f"euca_request_latency_seconds_bucket{_labels(group=group, method=method, le='+Inf')} {total}"
        )
        out.append(
            f"euca_request_latency_seconds_sum{_labels(group=group, method=method)} "
            f"{node.metrics.latency_sum[(group, method)]:.6f}"
        )
        out.append(f"euca_request_latency_seconds_count{_labels(group=group, method=method)} {total}")
    family("euca_peer_heartbeat_age_seconds", "gauge", "Seconds since anything was heard from each peer")
    ep = node.endpoint
    if ep is not None:
        for peer, peer_st in sorted(ep.peer_status().items()):
            hb_age = peer_st.get("heartbeat_age")
            if hb_age is not None:
                out.append(f"euca_peer_heartbeat_age_seconds{_labels(peer=peer)} {hb_age:.4f}")
        family("euca_bus_events_total", "counter", "Bus transport counters")
        for key, n in sorted(ep.stats.items()):
            out.append(f"euca_bus_events_total{_labels(event=key)} {n}")
    family("euca_cache_hits_total", "counter", "Object cache reads answered from memory")
    family("euca_cache_misses_total", "counter", "Object cache reads that went to the database")
    for inst in node.instances.values():
        if inst.cache is not None:
            cstats = inst.cache.stats()
            out.append(f"euca_cache_hits_total{_labels(name=inst.name)} {cstats.hits}")
            out.append(f"euca_cache_misses_total{_labels(name=inst.name)} {cstats.misses}")
    _route_metrics(node, family, out)
    family("euca_voter", "gauge", "1 if this process is a lease voter")
    out.append(f"euca_voter{_labels(node=node.name)} {1 if node.voter is not None else 0}")
    return "\n".join(out) + "\n"


def _route_metrics(node: Node, family: Callable[[str, str, str], None], out: list[str]) -> None:
    """User routes: as the arbitrator hosted here probes them, and as this node sees them."""
    reports = node.local_route_reports() or []
    family("euca_route_up", "gauge", "This arbitrator's route state: 1 UP, 0 DOWN (absent while UNKNOWN)")
    for r in reports:
        if r["state"] in ("UP", "DOWN"):
            out.append(f"euca_route_up{_labels(route=r['name'])} {1 if r['state'] == 'UP' else 0}")
    family("euca_route_targets_lost", "gauge", "Targets of the route unreachable for threshold rounds")
    for r in reports:
        out.append(f"euca_route_targets_lost{_labels(route=r['name'])} {len(r['lost'])}")
    family("euca_route_transitions_total", "counter", "Route state changes (UP/DOWN) seen by this arbitrator")
    for r in reports:
        out.append(f"euca_route_transitions_total{_labels(route=r['name'])} {r['transitions']}")
    family("euca_route_advisories_total", "counter", "ADVISORY events: some targets of a working route lost")
    for r in reports:
        out.append(f"euca_route_advisories_total{_labels(route=r['name'])} {r['advisories']}")
    family("euca_route_rounds_total", "counter", "Probe rounds done by this arbitrator")
    for r in reports:
        out.append(f"euca_route_rounds_total{_labels(route=r['name'])} {r['rounds']}")
    family("euca_route_down", "gauge", "1 if a route that stands for this node is DOWN for it")
    for name, v in sorted(node.route_verdicts().items()):
        out.append(f"euca_route_down{_labels(route=name)} {1 if v.down else 0}")
