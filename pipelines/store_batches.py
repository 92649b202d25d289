"""One training rank's batches read straight from a latent store's Parquet parts, in the worker
process itself: pyarrow (through fsspec for remote stores), a prefetch thread, a local shuffle
buffer; no Ray Data. Each epoch of Ray Data's path started an execution from nothing and moved the
rows through the object store; this reads at close to the raw rate of the files.

The unit of reading is a Parquet row group. Their list (:func:`store_rows`, from the parts'
metadata) is read once, on the driver, and travels to the workers. Per epoch
(:class:`StoreBatches`):

1. the row groups are put in an order drawn from ``(seed, epoch)``: the same on every rank, another
   every epoch (the file-level shuffle);
2. that order is one sequence of ``n`` rows, and rank ``r`` of ``world`` takes the rows
   ``[r*n//world, (r+1)*n//world)`` of it: every row in exactly one rank's share, shares differing
   by at most one row, each rank reading only the row groups its share overlaps. A rank's share is
   cut into batches of exactly ``micro`` rows; the last ``share % micro`` rows (after the local
   shuffle: other rows each epoch) are not yielded. The training loop takes ``rows // global_batch``
   steps per epoch, which every share covers, so an epoch trains on all but ``rows % global_batch``
   rows, other ones each epoch;
3. a local shuffle buffer of ``shuffle_buffer`` rows (at least ``micro``), drawn from
   ``(seed, epoch, rank)``, mixes the rows: the share is taken in consecutive windows of whole row
   groups holding at least that many rows, each window's rows put in a random order and cut into
   batches (the rows left over join the next window). Each row is copied once, from the Arrow
   buffers into its batch; the next window is read while this one is batched, so a rank holds up
   to two windows. 0 keeps the share's order and ships zero-copy views of the Arrow buffers (a
   batch across two row groups is joined once).

Parts on a local disk are memory-mapped when the rows are shuffled: pyarrow then reads the
uncompressed latent column without copying it out of the page cache, and the one copy is the
shuffle's own (measured 1.4 to 1.6x the plain read, whose ``read`` into a new buffer is the extra
copy; benchmarks/README.md). Batches in stored order are views of the Arrow buffers, so those parts
are read into memory instead: a view of a read-only mapping would crash the process on an in-place
write. Committed parts are only ever replaced by a rename, never rewritten in place, so a mapping
stays valid while it is read.

The same ``(seed, epoch, rank, world)`` gives the same batches, which is what lets a resumed run skip
to its position in the epoch and see what the uninterrupted run saw. With ``world`` changed (an
elastic run's restart) the shares are recut from the new world.

Batches are :func:`pipelines.store_reader.latent_batch`'s: ``latent`` (B, N, C) in the store dtype
(float16), as stored, and ``label`` int64; the training step normalizes them on its device.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipelines import latent_store, storage
from pipelines.storage import StorageOptions
from pipelines.store_reader import LatentStore, latent_batch

Batch = dict[str, torch.Tensor]
PREFETCH_ROW_GROUPS = 1  # row groups read ahead of the one being batched without a shuffle (~128 MiB each)
METADATA_THREADS = 16  # parts whose footers are read at once (a remote store: one request each)


@dataclass(frozen=True)
class RowGroup:
    """One row group of a part, and the rows a run reads from it (those of the views kept)."""

    part: str  # the part's full URL
    index: int  # the row group's index in the part
    rows: int


@dataclass(frozen=True)
class StoreRows:
    """What a worker needs to read a run's rows: the store's row groups in stored order, the latent
    shape, the views kept (None: all) and the storage options. Small; built once on the driver."""

    groups: tuple[RowGroup, ...]
    shape: tuple[int, int]
    views: tuple[int, ...] | None = None
    storage_options: StorageOptions | None = None

    @property
    def num_rows(self) -> int:
        return sum(group.rows for group in self.groups)


def store_rows(store: LatentStore, views: Iterable[int] | None = None) -> StoreRows:
    """The row groups of ``store``'s parts, from their Parquet metadata; with ``views`` each counts
    only the rows of those views (their ``view`` column is read for that)."""
    fs, _ = storage.resolve(store.url, store.storage_options)
    if storage.is_process_local(fs):
        raise ValueError(f"store {store.url}: a memory:// store lives in this process only and training workers "
                         f"cannot read it; put the store on file://, s3:// or gs://")
    kept = tuple(sorted({int(v) for v in views})) if views is not None else None

    def part_groups(url: str) -> list[RowGroup]:
        with _parquet_file(url, store.storage_options) as part:
            if kept is None:
                return [RowGroup(url, i, part.metadata.row_group(i).num_rows) for i in range(part.num_row_groups)]
            return [RowGroup(url, i, int(pc.sum(_kept_mask(part.read_row_group(i, columns=["view"]), kept)).as_py()
                                         or 0)) for i in range(part.num_row_groups)]

    with ThreadPoolExecutor(max_workers=min(METADATA_THREADS, max(1, len(store.parts)))) as pool:
        groups = [group for part in pool.map(part_groups, store.parts) for group in part]
    return StoreRows(tuple(groups), store.latent_shape, kept, store.storage_options)


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of a row group (counted among the rows kept) in a rank's share."""

    group: RowGroup
    start: int
    stop: int


def epoch_share(groups: tuple[RowGroup, ...], *, seed: int, epoch: int, rank: int, world: int) -> list[Piece]:
    """Rank ``rank``'s share of epoch ``epoch``: the pieces of row groups it reads, in order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of {world} workers")
    order = np.random.default_rng([seed % 2**64, epoch, 0]).permutation(len(groups))
    total = sum(group.rows for group in groups)
    low, high = rank * total // world, (rank + 1) * total // world
    pieces, at = [], 0
    for index in order:
        group = groups[index]
        start, stop = max(low - at, 0), min(high - at, group.rows)
        if start < stop:
            pieces.append(Piece(group, start, stop))
        at += group.rows
    return pieces


class StoreBatches:
    """The :data:`jobs.train.loop.BatchSource` of one rank: ``(epoch, micro)`` -> that epoch's batches of
    exactly ``micro`` rows (see the module's docstring for the order)."""

    def __init__(self, rows: StoreRows, *, rank: int, world: int, seed: int, shuffle_buffer: int,
                 map_parts: bool = True) -> None:
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={shuffle_buffer}: expected 0 (stored order) or a number of rows")
        self.rows, self.rank, self.world, self.seed, self.shuffle_buffer = rows, rank, world, seed, shuffle_buffer
        # Local parts memory-mapped when shuffling (see the module's docstring); False reads them into memory.
        self.memory_map = map_parts and shuffle_buffer > 0

    def __call__(self, epoch: int, micro: int) -> Iterator[Batch]:
        pieces = epoch_share(self.rows.groups, seed=self.seed, epoch=epoch, rank=self.rank, world=self.world)
        window = max(self.shuffle_buffer, micro)
        group_rows = max(1, self.rows.num_rows // max(1, len(self.rows.groups)))
        ahead = -(-window // group_rows) if self.shuffle_buffer else PREFETCH_ROW_GROUPS  # the next window
        tables = _prefetched(pieces, self._read, ahead)
        try:
            if not self.shuffle_buffer:
                yield from _in_order(tables, micro, self.rows.shape)
            else:
                rng = np.random.default_rng([self.seed % 2**64, epoch, 1, self.rank])
                yield from _shuffled(_row_arrays(tables, self.rows.shape), micro, window, rng)
        finally:
            tables.close()

    def _read(self, piece: Piece) -> pa.Table:
        views = self.rows.views
        columns = ["label", latent_store.LATENT_COLUMN] + (["view"] if views is not None else [])
        try:
            with _parquet_file(piece.group.part, self.rows.storage_options,
                               memory_map=self.memory_map) as part:
                table = part.read_row_group(piece.group.index, columns=columns)
        except (OSError, pa.ArrowException) as error:
            raise OSError(f"store part {piece.group.part} (row group {piece.group.index}) could not be read: "
                          f"{error}. It changed after the run was planned, or is damaged: check the store with "
                          f"`rae store verify`") from error
        if views is not None:
            table = table.filter(_kept_mask(table, views))
        return table.slice(piece.start, piece.stop - piece.start)


@contextlib.contextmanager
def _parquet_file(url: str, storage_options: StorageOptions | None, *,
                  memory_map: bool = False) -> Iterator[pq.ParquetFile]:
    """A part opened for reading: by path on a local disk (pyarrow's own reads, or a read-only memory
    map), else through fsspec."""
    fs, path = storage.resolve(url, storage_options)
    if storage.is_local_disk(fs):
        with pq.ParquetFile(path, memory_map=memory_map) as part:
            yield part
        return
    with fs.open(path, "rb") as handle, pq.ParquetFile(handle) as part:
        yield part


def _kept_mask(table: pa.Table, views: tuple[int, ...]) -> pa.ChunkedArray:
    return pc.is_in(table.column("view"), value_set=pa.array(views, pa.int8()))


def _prefetched(pieces: list[Piece], read: Callable[[Piece], pa.Table], ahead: int) -> Iterator[pa.Table]:
    """``read(piece)`` of every piece, in order, read in a background thread up to ``ahead`` pieces
    ahead of the consumer (pyarrow releases the GIL while it reads and decodes). Closing the iterator
    stops it."""
    handoff: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def put(item: tuple[str, object]) -> None:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def work() -> None:
        try:
            for piece in pieces:
                if stop.is_set():
                    return
                put(("table", read(piece)))
            put(("done", None))
        except BaseException as error:  # handed to the consumer, raised there
            put(("error", error))

    def consume() -> Iterator[pa.Table]:
        thread = threading.Thread(target=work, name="store-batches-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = handoff.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            stop.set()

    return consume()


def _in_order(tables: Iterator[pa.Table], micro: int, shape: tuple[int, int]) -> Iterator[Batch]:
    """Batches of ``micro`` rows in the tables' order: views of the Arrow buffers, or joined once when
    a batch spans two tables; a short tail is dropped."""
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        offset = 0
        while offset < table.num_rows:
            take = min(micro - held, table.num_rows - offset)
            pending.append(table.slice(offset, take))
            held, offset = held + take, offset + take
            if held == micro:
                yield latent_batch(pending[0] if len(pending) == 1 else pa.concat_tables(pending), shape)
                pending, held = [], 0


def _row_arrays(tables: Iterator[pa.Table], shape: tuple[int, int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(latents (k, N, C) in the store dtype, labels (k,) int64) per chunk of the tables, without a copy."""
    for table in tables:
        for batch in table.to_batches():
            values = latent_store.latent_values(batch.column(latent_store.LATENT_COLUMN), shape[0] * shape[1])
            yield (values.to_numpy(zero_copy_only=False).reshape(-1, *shape),
                   batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64, copy=False))


def _windows(chunks: Iterator[tuple[np.ndarray, np.ndarray]], size: int) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """The chunks in consecutive groups of at least ``size`` rows (the last one may hold fewer)."""
    window: list[tuple[np.ndarray, np.ndarray]] = []
    held = 0
    for chunk in chunks:
        window.append(chunk)
        held += len(chunk[1])
        if held >= size:
            yield window
            window, held = [], 0
    if window:
        yield window


def _shuffled(chunks: Iterator[tuple[np.ndarray, np.ndarray]], micro: int, capacity: int,
              rng: np.random.Generator) -> Iterator[Batch]:
    """Batches of ``micro`` rows whose rows are mixed within consecutive windows of at least ``capacity``
    rows: each window's rows in a random order, cut into batches, the rows left over joining the next
    window; a short tail is dropped. Each row is copied once, from the Arrow buffers into its batch
    (grouped by the chunk it comes from inside the batch)."""
    carry: list[tuple[np.ndarray, np.ndarray]] = []
    for window in _windows(chunks, capacity):
        window = carry + window
        source = np.concatenate([np.full(len(labels), i) for i, (_, labels) in enumerate(window)])
        row = np.concatenate([np.arange(len(labels)) for _, labels in window])
        order = rng.permutation(len(row))
        cut = len(order) - len(order) % micro
        for at in range(0, cut, micro):
            yield _gather(window, source[order[at:at + micro]], row[order[at:at + micro]])
        rest = order[cut:]
        carry = [_gathered(window, source[rest], row[rest])] if len(rest) else []


def _gather(window: list[tuple[np.ndarray, np.ndarray]], source: np.ndarray, row: np.ndarray) -> Batch:
    latents, labels = _gathered(window, source, row)
    return {"latent": torch.from_numpy(latents), "label": torch.from_numpy(labels)}


def _gathered(window: list[tuple[np.ndarray, np.ndarray]], source: np.ndarray,
              row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``row[i]`` of chunks ``source[i]`` copied into new arrays, grouped by chunk."""
    by_chunk = np.argsort(source, kind="stable")
    source, row = source[by_chunk], row[by_chunk]
    first = window[int(source[0])][0]
    latents = np.empty((len(row), *first.shape[1:]), first.dtype)
    labels = np.empty(len(row), np.int64)
    bounds = np.flatnonzero(np.diff(source)) + 1
    for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(row)], strict=True):
        chunk_latents, chunk_labels = window[int(source[start])]
        np.take(chunk_latents, row[start:stop], axis=0, out=latents[start:stop], mode="clip")  # unbuffered
        np.take(chunk_labels, row[start:stop], out=labels[start:stop], mode="clip")
    return latents, labels
