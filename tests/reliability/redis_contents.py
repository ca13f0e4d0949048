"""Everything a Redis holds, read with a raw (bytes) client: for "unchanged" comparisons
and for checking that every stored value is plain text."""

from __future__ import annotations

from collections.abc import Iterator

import redis


def stored_values(url: str) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) for every value of every key: hash fields and values, list items,
    strings, set members, sorted-set members and stream fields."""
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            if kind == "string":
                yield key, client.get(key) or b""
            elif kind == "hash":
                for field, value in client.hgetall(key).items():
                    yield key, field
                    yield key, value
            elif kind == "list":
                for item in client.lrange(key, 0, -1):
                    yield key, item
            elif kind == "set":
                for member in client.smembers(key):
                    yield key, member
            elif kind == "zset":
                for member in client.zrange(key, 0, -1):
                    yield key, member
            elif kind == "stream":
                for _id, fields in client.xrange(key):
                    for field, value in fields.items():
                        yield key, field
                        yield key, value
            else:
                raise AssertionError(f"unexpected Redis type {kind} of {key!r}")
    finally:
        client.close()


def snapshot(url: str) -> dict[bytes, object]:
    """Every key with its whole value, comparable with ==."""
    client = redis.Redis.from_url(url)
    out: dict[bytes, object] = {}
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            if kind == "string":
                out[key] = client.get(key)
            elif kind == "hash":
                out[key] = client.hgetall(key)
            elif kind == "list":
                out[key] = client.lrange(key, 0, -1)
            elif kind == "set":
                out[key] = client.smembers(key)
            elif kind == "zset":
                out[key] = client.zrange(key, 0, -1, withscores=True)
            else:
                out[key] = kind
    finally:
        client.close()
    return out
