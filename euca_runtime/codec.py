"""The one codec of the pure protocol messages (`euca_runtime.lease`, `euca_runtime.replication`).

A message is a frozen dataclass; on the wire it is a plain dict tagged with its class name
(``{"type": "LeaseRequest", ...}``), msgpack- and JSON-able. Tuples travel as lists and are
turned back into tuples (nested ones too) on decode, so a decoded message compares equal to
the one that was encoded. Fields that need more than that (change records, snapshots) are
given `encoders` / `decoders` by the module that owns them. Fields named in `omit_default`
(ones added after a release) are left out while they hold their default, so a process of the
previous version, whose decoder does not know them, still reads the message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, frozenset | set):
        return sorted(value)
    return value


def _tuples(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


class Codec:
    """Encoder/decoder for one family of message classes."""

    def __init__(
        self,
        family: str,
        classes: Iterable[type],
        *,
        encoders: Mapping[str, Callable[[Any], Any]] | None = None,
        decoders: Mapping[str, Callable[[Any], Any]] | None = None,
        omit_default: Iterable[str] = (),
    ) -> None:
        self.family = family
        self.classes: tuple[type, ...] = tuple(classes)
        self._by_name = {cls.__name__: cls for cls in self.classes}
        self._encoders = dict(encoders or {})
        self._decoders = dict(decoders or {})
        self._omit_default = frozenset(omit_default)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def encode(self, msg: Any) -> dict[str, Any]:
        if type(msg) not in self.classes:
            raise TypeError(f"not a {self.family} message: {type(msg).__name__}")
        doc: dict[str, Any] = {"type": type(msg).__name__}
        for name, f in msg.__dataclass_fields__.items():
            value = getattr(msg, name)
            if name in self._omit_default and value == f.default:
                continue
            enc = self._encoders.get(name)
            doc[name] = enc(value) if enc is not None else _plain(value)
        return doc

    def decode(self, doc: Mapping[str, Any]) -> Any:
        cls = self._by_name.get(str(doc.get("type")))
        if cls is None:
            raise ValueError(f"unknown {self.family} message type {doc.get('type')!r}")
        kwargs: dict[str, Any] = {}
        try:
            for k, v in doc.items():
                if k == "type":
                    continue
                dec = self._decoders.get(k)
                kwargs[k] = dec(v) if dec is not None else _tuples(v)
            return cls(**kwargs)
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"bad {cls.__name__}: {exc}") from exc
