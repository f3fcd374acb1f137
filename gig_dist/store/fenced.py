"""Zarr stores whose every write first passes the run's :class:`~gig_dist.store.lease.Fence`.

A run's writes all go through Zarr, so wrapping its store is the one place where a driver that
lost its lease (and its workers) is stopped before any byte: chunks, metadata, the manifest and
deletes alike. Reads pass unchecked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from zarr.abc.store import Store
from zarr.core.buffer import Buffer
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from gig_dist.store.lease import Fence
from gig_dist.store.location import filesystem


def open_zarr_store(url: str, read_only: bool) -> Store:
    """The Zarr store of a local path or an fsspec URL, as ``zarr.open_group(url)`` would make it."""
    if "://" in url:
        filesystem(url)  # a missing package is one line naming its extra
        return FsspecStore.from_url(url, read_only=read_only)
    return LocalStore(url, read_only=read_only)


class FencedStore(WrapperStore[Store]):
    def __init__(self, store: Store, fence: Fence) -> None:
        super().__init__(store)
        self.fence = fence

    def _with_store(self, store: Store) -> FencedStore:
        return type(self)(store, self.fence)

    async def _guard(self) -> None:
        if self.fence.fresh():
            return
        await asyncio.to_thread(self.fence.guard)  # a listing: off the event loop

    async def set(self, key: str, value: Buffer) -> None:
        await self._guard()
        await self._store.set(key, value)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        await self._guard()
        await self._store.set_if_not_exists(key, value)

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        await self._guard()
        await self._store._set_many(values)

    async def delete(self, key: str) -> None:
        await self._guard()
        await self._store.delete(key)

    async def delete_dir(self, prefix: str) -> None:
        await self._guard()
        await self._store.delete_dir(prefix)

    async def clear(self) -> None:
        await self._guard()
        await self._store.clear()

    async def getsize(self, key: str) -> int:
        return await self._store.getsize(key)

    async def getsize_prefix(self, prefix: str) -> int:
        return await self._store.getsize_prefix(prefix)
