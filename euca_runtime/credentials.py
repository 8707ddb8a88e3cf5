"""Access-key credentials shared by every service: secrets at rest, key lookup with a cache.

**At rest.** The clc stores each secret access key encrypted with AES-256-GCM under the
cloud's *credential key*: a 32-byte random secret in a file (mode 0600) named by the config's
``credential_key`` (``euca-runtime up`` makes ``DIR/pki/credentials.key`` next to the CA; a
deployment distributes it to every clc host like the PKI). The access key id is the
authenticated data, so a ciphertext cannot be moved to another key. Replicas, snapshots and
the change log only ever hold ciphertext; secrets are never logged.

**Lookup.** A service that authenticates a request (IAM, S3, EC2) asks the ENABLED clc over
the bus: ``node.call("clc", None, "iam.lookup_key", {"access_key": AKID})`` answers
``{"secret_key", "user", "account", "account_id", "active"}`` or None. `KeyCache` keeps
answers for `ttl` seconds (unknown keys for `negative_ttl`), so **a deleted or deactivated key
stops working on every process within `ttl` seconds** (default `DEFAULT_TTL` = 5 s), and a new
key works at once unless somebody tried it in the `negative_ttl` before it was made.

Use ``key_cache(node)`` to share one cache per process.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from euca_runtime.sigv4 import AuthError, ParsedAuth, check_signature
from euca_runtime.tls import write_private

if TYPE_CHECKING:
    from euca_runtime.node import Node

KEY_BYTES = 32
DEFAULT_TTL = 5.0
DEFAULT_NEGATIVE_TTL = 0.5
LOOKUP_TIMEOUT = 5.0

_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_SECRET_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


class CredentialKeyError(RuntimeError):
    """The credential key file is missing, unreadable or not a 32-byte key."""


def make_credential_key(path: Path | str) -> Path:
    """Create the credential key file (0600) unless it exists; returns its path."""
    p = Path(path)
    if not p.exists():
        write_private(p, secrets.token_bytes(KEY_BYTES).hex().encode() + b"\n")
    return p


def load_credential_key(path: Path | str | None) -> bytes:
    """Read a credential key file (64 hex digits); raises `CredentialKeyError`."""
    if path is None:
        raise CredentialKeyError("no credential_key is configured (needed to store access-key secrets)")
    p = Path(path)
    try:
        text = p.read_text().strip()
    except OSError as exc:
        raise CredentialKeyError(f"credential_key {p}: cannot read: {exc.strerror}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise CredentialKeyError(f"credential_key {p}: must hold {KEY_BYTES * 2} hex digits") from None
    if len(key) != KEY_BYTES:
        raise CredentialKeyError(f"credential_key {p}: must hold {KEY_BYTES * 2} hex digits")
    mode = p.stat().st_mode & 0o077
    if mode:
        raise CredentialKeyError(f"credential_key {p}: readable by group/others (mode {mode:o}); chmod 600")
    return key


class SecretBox:
    """AES-256-GCM over secrets, bound to their access key id."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "SecretBox(<key hidden>)"

    def seal(self, access_key: str, secret: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, secret.encode(), access_key.encode())

    def open(self, access_key: str, sealed: bytes) -> str:
        from cryptography.exceptions import InvalidTag

        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], access_key.encode()).decode()
        except (InvalidTag, ValueError) as exc:
            raise CredentialKeyError(
                f"the secret of {access_key} does not decrypt: wrong credential_key on this host?"
            ) from exc


def new_access_key_id() -> str:
    """``AKIA`` + 16 characters, like AWS access key ids."""
    return "AKIA" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(16))


def new_secret_key() -> str:
    """40 random characters, like AWS secret access keys."""
    return "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(40))


def new_user_id() -> str:
    """``AIDA`` + 17 characters, like AWS user ids."""
    return "AIDA" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(17))


def new_account_id() -> str:
    """A 12-digit account id."""
    return f"{secrets.randbelow(10**12):012d}"


# --------------------------------------------------------------------------- lookup cache


@dataclass(frozen=True)
class KeyInfo:
    """What the clc says about one access key."""

    access_key: str
    secret_key: str = ""
    user: str = ""
    account: str = ""
    account_id: str = ""
    active: bool = False

    def __repr__(self) -> str:  # never print the secret
        return (
            f"KeyInfo({self.access_key!r}, user={self.user!r}, account={self.account!r}, "
            f"active={self.active})"
        )


class KeyCache:
    """Access-key lookups through the bus, cached for `ttl` seconds (see the module docstring).

    `resolve(access_key)` returns the `KeyInfo` of an active key or raises `AuthError`
    (``unknown_key`` / ``inactive_key``); it raises `ServiceUnavailable` when no clc answered
    in time (the request should get a retryable 503). Concurrent lookups of one key share
    one bus call.
    """

    def __init__(
        self,
        node: Node | None,
        ttl: float = DEFAULT_TTL,
        *,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        fetch: Callable[[str], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 100_000,
    ) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._node = node
        self._fetch = fetch
        self._clock = clock
        self._max = max_entries
        self._entries: dict[str, tuple[float, KeyInfo | None]] = {}
        self._inflight: dict[str, asyncio.Future[KeyInfo | None]] = {}
        self.lookups = 0

    def invalidate(self, access_key: str | None = None) -> None:
        """Forget one key (or every key)."""
        if access_key is None:
            self._entries.clear()
        else:
            self._entries.pop(access_key, None)

    async def _lookup(self, access_key: str) -> KeyInfo | None:
        self.lookups += 1
        if self._fetch is not None:
            doc = await self._fetch(access_key)
        else:
            assert self._node is not None
            doc = await self._node.call(
                "clc", None, "iam.lookup_key", {"access_key": access_key}, timeout=LOOKUP_TIMEOUT
            )
        if not doc:
            return None
        return KeyInfo(
            access_key=access_key,
            secret_key=str(doc["secret_key"]),
            user=str(doc.get("user", "")),
            account=str(doc.get("account", "")),
            account_id=str(doc.get("account_id", "")),
            active=bool(doc.get("active")),
        )

    async def get(self, access_key: str) -> KeyInfo | None:
        """The key's info (active or not) or None if unknown; cached."""
        now = self._clock()
        hit = self._entries.get(access_key)
        if hit is not None and hit[0] > now:
            return hit[1]
        fut = self._inflight.get(access_key)
        if fut is None:
            fut = asyncio.ensure_future(self._lookup(access_key))
            self._inflight[access_key] = fut
            try:
                info = await fut
            finally:
                self._inflight.pop(access_key, None)
            if len(self._entries) >= self._max:
                self._entries.clear()
            ttl = self.ttl if info is not None else self.negative_ttl
            self._entries[access_key] = (self._clock() + ttl, info)
            return info
        return await asyncio.shield(fut)

    async def resolve(self, access_key: str) -> KeyInfo:
        """The `KeyInfo` of an active key; `AuthError` if unknown or inactive."""
        info = await self.get(access_key)
        if info is None:
            raise AuthError("unknown_key", f"no access key {access_key}")
        if not info.active:
            raise AuthError("inactive_key", f"access key {access_key} is inactive")
        return info


async def authenticate(cache: KeyCache, parsed: ParsedAuth, payload_sha256: str) -> KeyInfo:
    """Resolve `parsed.access_key` and check the signature; the key's `KeyInfo` or `AuthError`.

    Raises `ServiceUnavailable` when the clc could not be asked (answer 503, retryable).
    `payload_sha256` as for `euca_runtime.sigv4.check_signature`.
    """
    info = await cache.resolve(parsed.access_key)
    check_signature(parsed, info.secret_key, payload_sha256)
    return info


_CACHES: weakref.WeakKeyDictionary[Any, KeyCache] = weakref.WeakKeyDictionary()


def key_cache(node: Node) -> KeyCache:
    """The process-wide `KeyCache` of `node` (made on first use)."""
    cache = _CACHES.get(node)
    if cache is None:
        cache = KeyCache(node)
        _CACHES[node] = cache
    return cache


__all__ = [
    "DEFAULT_TTL",
    "CredentialKeyError",
    "KeyCache",
    "KeyInfo",
    "SecretBox",
    "authenticate",
    "key_cache",
    "load_credential_key",
    "make_credential_key",
    "new_access_key_id",
    "new_account_id",
    "new_secret_key",
    "new_user_id",
]
