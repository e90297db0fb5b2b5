"""A Zarr store that keeps the metadata documents its writer read or wrote, so that the writer's many re-opens of
its group (xarray and zarr open it afresh for each region write) read no ``zarr.json`` again: on object storage
each read would be a round trip. Only one process writes a store at a time (``store/lock.py``), so what the writer
holds cannot go stale while it lives."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable

from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, LocalStore, WrapperStore

_METADATA = frozenset({"zarr.json", ".zgroup", ".zarray", ".zattrs", ".zmetadata"})


def open_store(path: str) -> Store:
    if "://" in path:
        return FsspecStore.from_url(path, read_only=False)
    return LocalStore(path)


class HeldMetadata(WrapperStore):
    """A store that keeps every metadata document it reads or writes (and which ones are missing), so that the
    writer's many re-opens of its group read nothing again. Chunks pass straight through."""

    def __init__(self, store: Store):
        super().__init__(store)
        self._held: dict[str, Buffer | None] = {}

    def _with_store(self, store: Store) -> HeldMetadata:
        held = super()._with_store(store)
        held._held = self._held
        return held

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        if byte_range is not None or key.rpartition("/")[2] not in _METADATA:
            return await self._store.get(key, prototype, byte_range)
        if key not in self._held:
            self._held[key] = await self._store.get(key, prototype)
        return self._held[key]

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def exists(self, key: str) -> bool:
        if key in self._held:
            return self._held[key] is not None
        return await self._store.exists(key)

    async def set(self, key: str, value: Buffer) -> None:
        self._held.pop(key, None)
        await self._store.set(key, value)
        if key.rpartition("/")[2] in _METADATA:
            self._held[key] = value

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        # zarr writes the parents' metadata this way before each new node
        await self._store.set_if_not_exists(key, value)
        if self._held.get(key, ...) is None:  # known to be missing: it is written now
            self._held[key] = value

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        for key, value in values:
            await self.set(key, value)

    async def delete(self, key: str) -> None:
        self._held.pop(key, None)
        await self._store.delete(key)

    async def delete_dir(self, prefix: str) -> None:
        self._forget(prefix)
        await self._store.delete_dir(prefix)

    async def clear(self) -> None:
        self._held.clear()
        await self._store.clear()

    def _forget(self, prefix: str) -> None:
        prefix = prefix.rstrip("/")
        for key in [k for k in self._held if not prefix or k == prefix or k.startswith(prefix + "/")]:
            del self._held[key]
