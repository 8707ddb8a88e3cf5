"""The identity service of the clc: accounts, users and access keys, and the IAM Query API.

Two halves:

- `Identity`: the logic, run by the ENABLED clc instance behind its bus methods
  (``iam.lookup_key``, ``iam.admin_credentials``, ``iam.action``). State lives in the clc's
  replicated tables (`euca_runtime.services.clc`); every change is one replicated write,
  acknowledged only once every in-sync backup applied it. Check-then-write sequences (does
  the user exist? does it still have keys?) run under a per-user lock on the primary, so two
  concurrent requests about one user are serialised; a new primary starts from the
  replicated state, and a deposed one cannot write (fencing), so two requests that reach
  the two sides of a partition can never both take effect: the side without the lease
  answers 503 ``ServiceUnavailable`` (retryable) once its deadline passes.
- `make_api_app(node)`: the IAM Query API (``POST /`` form-encoded ``Action=...&Version=2010-05-08``,
  or a presigned ``GET``), on every process that hosts a clc instance (config ``api.iam``).
  Each request's SigV4 signature is checked on the process that received it (key lookups go
  to the clc over the bus, cached: `euca_runtime.credentials.KeyCache`), then the action is
  forwarded to the ENABLED clc, held and retried across a failover until its deadline.

Idempotent retries: the receiving process gives each request a RequestId that travels with
it; CreateUser, CreateAccessKey, DeleteUser and DeleteAccessKey record it in the same
replicated write as their change (``clc_request``, `euca_runtime.store.requests`), so a retry
of a request whose write committed just before a failover answers as the first attempt did
(the same user, the same key and secret, success) instead of EntityAlreadyExists, a second
key or NoSuchEntity, and changes nothing, even if what it made was deleted meanwhile.

Permissions (no IAM policies yet): the ``admin`` user of an account may do everything in its
account; any other user may only read itself and manage its own access keys.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape

from aiohttp import web

from euca_runtime.component import ComponentHandler, RequestError, RequestInfo, ServiceUnavailable
from euca_runtime.credentials import (
    CredentialKeyError,
    SecretBox,
    load_credential_key,
    new_access_key_id,
    new_account_id,
    new_secret_key,
    new_user_id,
)
from euca_runtime.log import get_logger
from euca_runtime.services.query_api import QueryApi, Refusal, make_query_app

if TYPE_CHECKING:
    from euca_runtime.node import Node
    from euca_runtime.services.clc import Clc

log = get_logger("iam")

ADMIN_ACCOUNT = "eucalyptus"
ADMIN_USER = "admin"
API_VERSION = "2010-05-08"
XMLNS = "https://iam.amazonaws.com/doc/2010-05-08/"
MAX_KEYS_PER_USER = 2
DEFAULT_MAX_ITEMS = 100
MAX_BODY = 64 * 1024
DEFAULT_TIMEOUT = 10.0

_NAME_RE = re.compile(r"[\w+=,.@-]+")
_PATH_RE = re.compile(r"/|/[\x21-\x7e]+/")
_PATH_PREFIX_RE = re.compile(r"/[\x21-\x7f]*")
_KEY_ID_RE = re.compile(r"[\w]{16,128}")

ACTIONS = (
    "CreateUser",
    "GetUser",
    "ListUsers",
    "DeleteUser",
    "CreateAccessKey",
    "ListAccessKeys",
    "DeleteAccessKey",
    "UpdateAccessKey",
)

STATUS = {
    "ValidationError": 400,
    "InvalidInput": 400,
    "InvalidAction": 400,
    "MissingParameter": 400,
    "MissingAction": 400,
    "InvalidParameterValue": 400,
    "NoSuchEntity": 404,
    "EntityAlreadyExists": 409,
    "DeleteConflict": 409,
    "LimitExceeded": 409,
    "AccessDenied": 403,
}


def _validation(value: Any, field: str, constraint: str) -> RequestError:
    return RequestError(
        "ValidationError",
        f"1 validation error detected: Value '{value}' at '{field}' "
        f"failed to satisfy constraint: {constraint}",
    )


def check_name(value: Any, field: str = "userName") -> str:
    """An IAM user name (1-64 of ``[\\w+=,.@-]``); raises ValidationError."""
    if not isinstance(value, str) or not value:
        raise RequestError(
            "ValidationError", f"1 validation error detected: Value null at '{field}' must not be null"
        )
    if len(value) > 64:
        raise _validation(value, field, "Member must have length less than or equal to 64")
    if not _NAME_RE.fullmatch(value) or not value.isascii():
        raise _validation(value, field, r"Member must satisfy regular expression pattern: [\w+=,.@-]+")
    return value


def check_path(value: Any, field: str = "path") -> str:
    if value is None or value == "":
        return "/"
    if not isinstance(value, str) or len(value) > 512 or not _PATH_RE.fullmatch(value):
        raise _validation(
            value,
            field,
            r"Member must satisfy regular expression pattern: (\u002F)|(\u002F[\u0021-\u007F]+\u002F)",
        )
    return value


def check_path_prefix(value: Any, field: str = "pathPrefix") -> str:
    """A ListUsers PathPrefix: ``/`` then any printable ASCII (IAM's pattern; no trailing ``/``
    needed, ``/team`` matches ``/team/`` and ``/teams/``). Absent or empty: ``/``."""
    if value is None or value == "":
        return "/"
    if not isinstance(value, str) or len(value) > 512 or not _PATH_PREFIX_RE.fullmatch(value):
        raise _validation(
            value, field, r"Member must satisfy regular expression pattern: \u002F[\u0021-\u007F]*"
        )
    return value


def _max_items(value: Any) -> int:
    if value in (None, ""):
        return DEFAULT_MAX_ITEMS
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise _validation(value, "maxItems", "Member must be a number") from None
    if not 1 <= n <= 1000:
        raise _validation(value, "maxItems", "Member must have value between 1 and 1000")
    return n


def _encode_marker(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode()


def _decode_marker(value: Any) -> str | None:
    if value in (None, ""):
        return None
    try:
        return base64.b64decode(str(value).encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise RequestError(
            "ValidationError", "Invalid Marker (use the Marker of the previous page)"
        ) from None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Identity:
    """The IAM logic of one clc instance (its handlers run on the ENABLED one only)."""

    def __init__(self, clc: Clc) -> None:
        self.clc = clc
        self.ctx = clc.ctx
        self._box: SecretBox | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._bootstrap: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ plumbing

    def box(self) -> SecretBox:
        if self._box is None:
            node = getattr(self.ctx, "node", None)
            path = node.cfg.credential_key if node is not None else None
            try:
                self._box = SecretBox(load_credential_key(path))
            except CredentialKeyError as exc:
                raise RequestError("InternalFailure", str(exc)) from None
        return self._box

    def _cache(self) -> Any:
        cache = self.ctx.cache
        if cache is None:
            raise ServiceUnavailable("the clc has no store", "NotReady")
        return cache

    def _lock(self, account: str, name_key: str) -> asyncio.Lock:
        key = f"{account}/{name_key}"
        lock = self._locks.get(key)
        if lock is None:
            if len(self._locks) > 10_000:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def account(self, name: str) -> Mapping[str, Any] | None:
        return self._cache().get("iam_account", name)  # type: ignore[no-any-return]

    def user(self, account: str, name: str) -> Mapping[str, Any] | None:
        return self._cache().get("iam_user", (account, name.lower()))  # type: ignore[no-any-return]

    def keys_of(self, account: str, name_key: str) -> list[Mapping[str, Any]]:
        rows = [
            r
            for r in self._cache().items("iam_access_key")
            if r["account"] == account and r["user_key"] == name_key
        ]
        return sorted(rows, key=lambda r: (r["created_ts"], r["access_key"]))

    # ------------------------------------------------------------------ first boot

    def on_enabled(self, epoch: int) -> None:
        if self._bootstrap is None or self._bootstrap.done():
            self._bootstrap = asyncio.get_running_loop().create_task(
                self._ensure_admin(), name="iam-bootstrap"
            )

    def on_disabled(self) -> None:
        if self._bootstrap is not None:
            self._bootstrap.cancel()

    async def _ensure_admin(self) -> None:
        """Make the ``eucalyptus`` account, its ``admin`` user and one key, once (replicated)."""
        from euca_runtime.services.clc import row_put_op

        while True:
            try:
                if self.account(ADMIN_ACCOUNT) is not None:
                    return
                box = self.box()
                now = time.time()
                access_key, secret = new_access_key_id(), new_secret_key()
                ops = [
                    row_put_op(
                        "iam_account",
                        {"name": ADMIN_ACCOUNT, "account_id": new_account_id(), "created_ts": now},
                    ),
                    row_put_op(
                        "iam_user",
                        {
                            "account": ADMIN_ACCOUNT,
                            "name_key": ADMIN_USER,
                            "name": ADMIN_USER,
                            "user_id": new_user_id(),
                            "path": "/",
                            "created_ts": now,
                        },
                    ),
                    row_put_op(
                        "iam_access_key",
                        {
                            "access_key": access_key,
                            "account": ADMIN_ACCOUNT,
                            "user_key": ADMIN_USER,
                            "secret": box.seal(access_key, secret),
                            "status": "Active",
                            "created_ts": now,
                        },
                    ),
                ]
                async with self._lock(ADMIN_ACCOUNT, ADMIN_USER):
                    if self.account(ADMIN_ACCOUNT) is not None:
                        return
                    res = await self.ctx.write(ops)
                log.info(
                    "admin account created",
                    extra={"account": ADMIN_ACCOUNT, "access_key": access_key, "epoch": res.epoch},
                )
                return
            except RequestError as exc:  # no credential key: log and retry slowly
                log.error("cannot create the admin account", extra={"reason": exc.message})
                await asyncio.sleep(5.0)
            except ServiceUnavailable:
                await asyncio.sleep(0.2)

    # ------------------------------------------------------------------ bus methods

    def handlers(self) -> Mapping[str, ComponentHandler]:
        return {
            "iam.lookup_key": self.lookup_key,
            "iam.admin_credentials": self.admin_credentials,
            "iam.action": self.action,
        }

    async def lookup_key(self, body: Any, request: RequestInfo) -> dict[str, Any] | None:
        """``{access_key}`` -> ``{secret_key, user, account, account_id, active}`` or None."""
        await self.clc._fault_point()
        access_key = body.get("access_key") if isinstance(body, Mapping) else None
        if not isinstance(access_key, str) or not access_key:
            raise RequestError("BadRequest", "lookup_key needs an access_key")
        row = self._cache().get("iam_access_key", access_key)
        if row is None:
            return None
        user = self._cache().get("iam_user", (row["account"], row["user_key"]))
        account = self.account(row["account"])
        return {
            "secret_key": self.box().open(access_key, row["secret"]),
            "user": user["name"] if user is not None else row["user_key"],
            "account": row["account"],
            "account_id": account["account_id"] if account is not None else "",
            "active": row["status"] == "Active" and user is not None,
        }

    async def admin_credentials(self, body: Any, request: RequestInfo) -> dict[str, Any]:
        """The first active key of ``eucalyptus/admin`` (for ``euca-runtime up``'s eucarc)."""
        await self.clc._fault_point()
        keys = [k for k in self.keys_of(ADMIN_ACCOUNT, ADMIN_USER) if k["status"] == "Active"]
        if not keys:
            raise ServiceUnavailable("the admin account is not created yet", "NotReady")
        k = keys[0]
        return {
            "account": ADMIN_ACCOUNT,
            "user": ADMIN_USER,
            "access_key": k["access_key"],
            "secret_key": self.box().open(k["access_key"], k["secret"]),
        }

    async def action(self, body: Any, request: RequestInfo) -> dict[str, Any]:
        """``{action, params, caller: {account, user}, request_id}`` -> the action's result."""
        await self.clc._fault_point()
        if not isinstance(body, Mapping):
            raise RequestError("InvalidInput", "malformed iam.action call")
        action = body.get("action")
        params = body.get("params") or {}
        caller = body.get("caller") or {}
        request_id = str(body.get("request_id") or uuid.uuid4())
        fn = getattr(self, f"_do_{action}", None) if action in ACTIONS else None
        if fn is None:
            raise RequestError(
                "InvalidAction", f"Could not find operation {action} for version {API_VERSION}"
            )
        account = str(caller.get("account") or "")
        if self.account(account) is None:
            raise RequestError("AccessDenied", f"account {account!r} does not exist")
        result: dict[str, Any] = await fn(account, str(caller.get("user") or ""), params, request_id)
        return result

    # ------------------------------------------------------------------ helpers for actions

    def _user_doc(self, account: str, row: Mapping[str, Any]) -> dict[str, Any]:
        acct = self.account(account)
        account_id = acct["account_id"] if acct is not None else ""
        return {
            "Path": row["path"],
            "UserName": row["name"],
            "UserId": row["user_id"],
            "Arn": f"arn:aws:iam::{account_id}:user{row['path']}{row['name']}",
            "CreateDate": _iso(row["created_ts"]),
        }

    def _key_doc(self, row: Mapping[str, Any], user_name: str) -> dict[str, Any]:
        return {
            "UserName": user_name,
            "AccessKeyId": row["access_key"],
            "Status": row["status"],
            "CreateDate": _iso(row["created_ts"]),
        }

    def _first_key_doc(self, done: Mapping[str, Any]) -> dict[str, Any]:
        """The AccessKey a CreateAccessKey answered, from its done row: ``result`` is
        ``{access_key, user, secret}`` with the secret sealed as in ``iam_access_key``."""
        first = json.loads(str(done["result"]))
        sealed = base64.b64decode(first["secret"])
        row = {"access_key": first["access_key"], "status": "Active", "created_ts": done["created_ts"]}
        doc = self._key_doc(row, first["user"])
        doc["SecretAccessKey"] = self.box().open(first["access_key"], sealed)
        return doc

    def _authorize(self, account: str, caller: str, action: str, target: str) -> None:
        if caller == ADMIN_USER or caller.lower() == target.lower():
            return
        acct = self.account(account)
        account_id = acct["account_id"] if acct is not None else ""
        raise RequestError(
            "AccessDenied",
            f"User: arn:aws:iam::{account_id}:user/{caller} is not authorized to perform: iam:{action} "
            f"on resource: user {target}",
        )

    def _target(
        self, account: str, caller: str, action: str, params: Mapping[str, Any], *, required: bool
    ) -> str:
        name = params.get("UserName")
        if name in (None, "") and not required:
            name = caller
        name = check_name(name)
        self._authorize(account, caller, action, name)
        return name

    def _done_row(self, request_id: str, action: str | None = None) -> Mapping[str, Any] | None:
        """The done row of the request with this id, if it already took effect
        (`euca_runtime.store.requests`); with `action`, only if it was that action (the row's
        ``action`` is `action` or ``<action> <detail>``)."""
        from euca_runtime.services.clc import CLC_REQUESTS

        return CLC_REQUESTS.row(self._cache(), request_id, action)

    def _done_ops(
        self, request_id: str, action: str, now: float | None = None, result: str | None = None
    ) -> list[dict[str, Any]]:
        from euca_runtime.services.clc import CLC_REQUESTS

        when = time.time() if now is None else now
        return CLC_REQUESTS.ops(self._cache(), request_id, action, when, result)

    def _existing_user(self, account: str, name: str) -> Mapping[str, Any]:
        row = self.user(account, name)
        if row is None:
            raise RequestError("NoSuchEntity", f"The user with name {name} cannot be found.")
        return row

    # ------------------------------------------------------------------ actions

    async def _do_CreateUser(
        self, account: str, caller: str, params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        from euca_runtime.services.clc import row_put_op

        name = check_name(params.get("UserName"))
        path = check_path(params.get("Path"))
        self._authorize(account, caller, "CreateUser", "")
        async with self._lock(account, name.lower()):
            done = self._done_row(rid, "CreateUser")
            if done is not None:
                # Our own retry (the bus held the request across a failover or a stalled
                # write): the create took effect, and the user may have been deleted since, or
                # even created again by someone else. Answer as the first attempt did; creating
                # it again would undo that delete (the fault suite's create/delete race found
                # it), refusing it would deny a create that happened.
                user_id = done["action"].split(" ", 1)[1]
                first = {"name": name, "user_id": user_id, "path": path, "created_ts": done["created_ts"]}
                return {"User": self._user_doc(account, first)}
            existing = self.user(account, name)
            if existing is not None:
                if existing["request_id"] == rid:  # our own retry (a row from before the done row)
                    return {"User": self._user_doc(account, existing)}
                raise RequestError("EntityAlreadyExists", f"User with name {name} already exists.")
            now = time.time()
            row = {
                "account": account,
                "name_key": name.lower(),
                "name": name,
                "user_id": new_user_id(),
                "path": path,
                "created_ts": now,
                "request_id": rid,
            }
            ops = [row_put_op("iam_user", row), *self._done_ops(rid, f"CreateUser {row['user_id']}", now)]
            res = await self.ctx.write(ops)
        log.info("user created", extra={"account": account, "user": name, "epoch": res.epoch, "seq": res.seq})
        return {"User": self._user_doc(account, row)}

    async def _do_GetUser(
        self, account: str, caller: str, params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        name = self._target(account, caller, "GetUser", params, required=False)
        return {"User": self._user_doc(account, self._existing_user(account, name))}

    async def _do_ListUsers(
        self, account: str, caller: str, params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        self._authorize(account, caller, "ListUsers", "*")
        prefix = check_path_prefix(params.get("PathPrefix"))
        limit = _max_items(params.get("MaxItems"))
        after = _decode_marker(params.get("Marker"))
        rows = sorted(
            (
                r
                for r in self._cache().items("iam_user")
                if r["account"] == account and r["path"].startswith(prefix)
            ),
            key=lambda r: r["name_key"],
        )
        if after is not None:
            rows = [r for r in rows if r["name_key"] > after]
        page = rows[:limit]
        out: dict[str, Any] = {
            "Users": [self._user_doc(account, r) for r in page],
            "IsTruncated": len(rows) > limit,
        }
        if len(rows) > limit:
            out["Marker"] = _encode_marker(page[-1]["name_key"])
        return out

    async def _do_DeleteUser(
        self, account: str, caller: str, params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        from euca_runtime.services.clc import row_delete_op

        name = self._target(account, caller, "DeleteUser", params, required=True)
        if caller != ADMIN_USER:
            self._authorize(account, caller, "DeleteUser", "*")
        async with self._lock(account, name.lower()):
            if self._done_row(rid) is not None:
                return {}  # our own retry after a failover: the delete took effect
            row = self._existing_user(account, name)
            if account == ADMIN_ACCOUNT and row["name_key"] == ADMIN_USER:
                raise RequestError(
                    "DeleteConflict", "The admin user of the eucalyptus account cannot be deleted."
                )
            if self.keys_of(account, row["name_key"]):
                raise RequestError("DeleteConflict", "Cannot delete entity, must delete access keys first.")
            ops = [row_delete_op("iam_user", [account, row["name_key"]]), *self._done_ops(rid, "DeleteUser")]
            res = await self.ctx.write(ops)
        log.info("user deleted", extra={"account": account, "user": name, "epoch": res.epoch, "seq": res.seq})
        return {}

    async def _do_CreateAccessKey(
        self, account: str, caller: str, params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        from euca_runtime.services.clc import row_put_op

        name = self._target(account, caller, "CreateAccessKey", params, required=False)
        box = self.box()
        async with self._lock(account, name.lower()):
            done = self._done_row(rid, "CreateAccessKey")
            if done is not None:
                # Our own retry (the bus held the request across a failover or a stalled
                # write): the key was created, and may have been deleted since (or its user).
                # Answer as the first attempt did, with the same key id and secret; creating
                # another key would hand out a key the caller never asked for a second time
                # (and could undo a delete or hit the per-user limit).
                return {"AccessKey": self._first_key_doc(done)}
            user = self._existing_user(account, name)
            keys = self.keys_of(account, user["name_key"])
            for k in keys:
                if k["request_id"] == rid:  # our own retry (a row from before the done row)
                    doc = self._key_doc(k, user["name"])
                    doc["SecretAccessKey"] = box.open(k["access_key"], k["secret"])
                    return {"AccessKey": doc}
            if len(keys) >= MAX_KEYS_PER_USER:
                raise RequestError(
                    "LimitExceeded", f"Cannot exceed quota for AccessKeysPerUser: {MAX_KEYS_PER_USER}"
                )
            access_key, secret = new_access_key_id(), new_secret_key()
            now = time.time()
            row = {
                "access_key": access_key,
                "account": account,
                "user_key": user["name_key"],
                "secret": box.seal(access_key, secret),
                "status": "Active",
                "created_ts": now,
                "request_id": rid,
            }
            first = {
                "access_key": access_key,
                "user": user["name"],
                "secret": base64.b64encode(row["secret"]).decode(),
            }
            ops = [
                row_put_op("iam_access_key", row),
                *self._done_ops(rid, "CreateAccessKey", now, json.dumps(first, sort_keys=True)),
            ]
            res = await self.ctx.write(ops)
        log.info(
            "access key created",
            extra={
                "account": account,
                "user": name,
                "access_key": access_key,
                "epoch": res.epoch,
                "seq": res.seq,
            },
        )
        doc = self._key_doc(row, user["name"])
        doc["SecretAccessKey"] = secret
        return {"AccessKey": doc}

    async def _do_ListAccessKeys(
        self, account: str, caller: str, params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        name = self._target(account, caller, "ListAccessKeys", params, required=False)
        user = self._existing_user(account, name)
        limit = _max_items(params.get("MaxItems"))
        after = _decode_marker(params.get("Marker"))
        rows = sorted(self.keys_of(account, user["name_key"]), key=lambda r: r["access_key"])
        if after is not None:
            rows = [r for r in rows if r["access_key"] > after]
        page = rows[:limit]
        out: dict[str, Any] = {
            "UserName": user["name"],
            "AccessKeyMetadata": [self._key_doc(r, user["name"]) for r in page],
            "IsTruncated": len(rows) > limit,
        }
        if len(rows) > limit:
            out["Marker"] = _encode_marker(page[-1]["access_key"])
        return out

    def _owned_key(self, account: str, name: str, params: Mapping[str, Any]) -> Mapping[str, Any]:
        key_id = params.get("AccessKeyId")
        if not isinstance(key_id, str) or not key_id:
            raise RequestError(
                "ValidationError", "1 validation error detected: Value null at 'accessKeyId' must not be null"
            )
        if not _KEY_ID_RE.fullmatch(key_id):
            raise _validation(key_id, "accessKeyId", r"Member must satisfy regular expression pattern: [\w]+")
        user = self._existing_user(account, name)
        row = self._cache().get("iam_access_key", key_id)
        if row is None or row["account"] != account or row["user_key"] != user["name_key"]:
            raise RequestError("NoSuchEntity", f"The Access Key with id {key_id} cannot be found.")
        return row

    async def _do_DeleteAccessKey(
        self, account: str, caller: str, params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        from euca_runtime.services.clc import row_delete_op

        name = self._target(account, caller, "DeleteAccessKey", params, required=False)
        async with self._lock(account, name.lower()):
            if self._done_row(rid) is not None:
                return {}  # our own retry after a failover: the delete took effect
            row = self._owned_key(account, name, params)
            ops = [
                row_delete_op("iam_access_key", [row["access_key"]]),
                *self._done_ops(rid, "DeleteAccessKey"),
            ]
            res = await self.ctx.write(ops)
        log.info(
            "access key deleted",
            extra={"account": account, "user": name, "access_key": row["access_key"], "epoch": res.epoch},
        )
        return {}

    async def _do_UpdateAccessKey(
        self, account: str, caller: str, params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        from euca_runtime.services.clc import row_put_op

        name = self._target(account, caller, "UpdateAccessKey", params, required=False)
        status = params.get("Status")
        if status not in ("Active", "Inactive"):
            raise _validation(status, "status", "Member must satisfy enum value set: [Active, Inactive]")
        async with self._lock(account, name.lower()):
            row = self._owned_key(account, name, params)
            if row["status"] != status:
                res = await self.ctx.write([row_put_op("iam_access_key", {**row, "status": status})])
                log.info(
                    "access key updated",
                    extra={
                        "account": account,
                        "access_key": row["access_key"],
                        "status": status,
                        "epoch": res.epoch,
                    },
                )
        return {}


# --------------------------------------------------------------------------- XML


def _xml_value(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"<{name}>{'true' if value else 'false'}</{name}>"
    if isinstance(value, Mapping):
        return f"<{name}>" + "".join(_xml_value(k, v) for k, v in value.items()) + f"</{name}>"
    if isinstance(value, list):
        return f"<{name}>" + "".join(_xml_value("member", v) for v in value) + f"</{name}>"
    return f"<{name}>{escape(str(value))}</{name}>"


def render_result(action: str, result: Mapping[str, Any], request_id: str) -> str:
    """``<ActionResponse><ActionResult>...</ActionResult><ResponseMetadata>...`` as IAM answers."""
    inner = "".join(_xml_value(k, v) for k, v in result.items())
    body = f"<{action}Result>{inner}</{action}Result>" if result else ""
    return (
        f'<{action}Response xmlns="{XMLNS}">{body}'
        f"<ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata></{action}Response>"
    )


def render_error(code: str, message: str, request_id: str, *, sender: bool = True) -> str:
    """IAM's error document."""
    return (
        f'<ErrorResponse xmlns="{XMLNS}"><Error><Type>{"Sender" if sender else "Receiver"}</Type>'
        f"<Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>"
        f"<RequestId>{request_id}</RequestId></ErrorResponse>"
    )


# --------------------------------------------------------------------------- HTTP API


def _validate(action: str, params: Mapping[str, str]) -> Refusal | None:
    version = params.get("Version")
    if version != API_VERSION or action not in ACTIONS:
        return 400, "InvalidAction", f"Could not find operation {action} for version {version}"
    return None


QUERY_API = QueryApi(
    service="iam",
    render_error=lambda status, code, message, rid: render_error(code, message, rid, sender=status < 500),
    render_result=render_result,
    validate=_validate,
    caller=lambda info: {"account": info.account, "user": info.user},
    status=STATUS,
    default_status=500,
    unavailable_code="ServiceUnavailable",
    internal_code="InternalFailure",
    max_body=MAX_BODY,
)


def make_api_app(node: Node, *, timeout: float = DEFAULT_TIMEOUT) -> web.Application:
    """The IAM Query API of one process; actions are forwarded to the ENABLED clc."""
    return make_query_app(node, QUERY_API, timeout=timeout)


__all__ = [
    "ACTIONS",
    "ADMIN_ACCOUNT",
    "ADMIN_USER",
    "Identity",
    "make_api_app",
    "render_error",
    "render_result",
]
