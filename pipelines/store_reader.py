"""Reading a latent store: plain pyarrow for tools, a Ray Dataset for tools and the benchmarks (DiT
training reads each rank's share itself: :mod:`pipelines.store_batches`).

Both read only the parts the manifest lists, and refuse a store whose encode has not finished.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipelines import latent_store, storage
from pipelines.storage import StorageOptions
from rae.latent_spec import LatentSpec
from rae.normalization import LatentStats


@dataclass
class LatentStore:
    """An opened, complete store: its manifest, statistics and the URLs of its parts."""
    url: str
    manifest: dict
    stats: LatentStats
    parts: list[str]                       # full URLs, in manifest order
    storage_options: StorageOptions | None = None

    @property
    def latent_spec(self) -> LatentSpec:
        return latent_store.latent_spec(self.manifest, self.url)

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.latent_spec.shape

    @property
    def num_rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def num_classes(self) -> int | None:
        return self.manifest.get("num_classes")


def open_store(url: str, storage_options: StorageOptions | None = None) -> LatentStore:
    manifest = latent_store.require_manifest(url, storage_options)
    latent_store.check_format(manifest, url)
    if manifest.get("status") != "complete":
        raise ValueError(f"store {url} is not complete (status {manifest.get('status')!r}); "
                         f"rerun `rae encode` with the same arguments to finish it")
    fs, root = storage.resolve(url, storage_options)
    parts = [storage.to_url(fs, storage.join(root, p["path"])) for p in manifest["parts"]]
    return LatentStore(url, manifest, latent_store.load_stats(url, manifest, storage_options), parts, storage_options)


def iter_part_tables(store: LatentStore, columns: list[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
    """(part URL, table) for every part, read with plain pyarrow through fsspec."""
    for url in store.parts:
        fs, path = storage.resolve(url, store.storage_options)
        with fs.open(path, "rb") as handle:
            yield url, pq.read_table(handle, columns=columns)


def read_latents(url: str, *, normalize: bool = False, storage_options: StorageOptions | None = None,
                 ) -> dict[str, np.ndarray]:
    """The whole store in memory, no Ray: ``key`` (R,), ``label`` (R,), ``view`` (R,), ``latent`` (R, N, C).

    Latents come back in the store dtype, or float32 normalized with the store's statistics.
    For tools and small stores; training reads with ``latent_dataset``.
    """
    store = open_store(url, storage_options)
    keys, labels, views, latents = [], [], [], []
    for _, table in iter_part_tables(store):
        keys.append(table.column("key").to_numpy(zero_copy_only=False))
        labels.append(table.column("label").to_numpy())
        views.append(table.column("view").to_numpy())
        latents.append(latent_store.table_latents(table, store.latent_shape))
    z = np.concatenate(latents)
    return {"key": np.concatenate(keys), "label": np.concatenate(labels), "view": np.concatenate(views),
            "latent": _normalized(z, store.stats) if normalize else z}


def _normalized(latents: np.ndarray, stats: LatentStats) -> np.ndarray:
    """``latents`` (B, N, C) in a store dtype, normalized with ``stats`` as float32 (`LatentStats.normalize`)."""
    return stats.normalize(torch.from_numpy(latents.astype(np.float32))).numpy()


def _to_training_batch(batch: pa.Table, *, shape: tuple[int, int], stats: LatentStats | None,
                      views: list[int] | None) -> dict[str, np.ndarray] | pa.Table:
    """Ray Data batch function on Arrow rows of a part. With ``stats``: ``latent`` float32 (B, N, C),
    normalized on the CPU, and ``label`` int64. Without: the rows as stored (``latent`` as in the
    part, ``label`` int64), only the chosen views, for :func:`latent_collate_fn`."""
    if views is not None:
        batch = batch.filter(pc.is_in(batch.column("view"), pa.array(views, pa.int8())))
    if stats is None:
        return batch.select(["label", latent_store.LATENT_COLUMN])
    z = _normalized(latent_store.table_latents(batch, shape), stats)
    return {"latent": z, "label": batch.column("label").to_numpy().astype(np.int64)}


def latent_dataset(url: str, *, normalize: bool = True, views: tuple[int, ...] | None = None,
                   shuffle_seed: int | None = 0, shuffle_files: bool = True,
                   storage_options: StorageOptions | None = None):
    """The store as a Ray Dataset of ``latent`` and ``label`` (int64).

    ``normalize=True``: ``latent`` is float32 (N, C), normalized on the CPU; for tools. ``normalize=False``
    (training): the rows as stored, ``latent`` one binary value per row (a store of format version 2:
    a float16 fixed-size list); iterate with
    ``iter_torch_batches(collate_fn=latent_collate_fn(shape))`` for float16 (B, N, C) tensors made
    without a copy, and normalize them on the training device (``LatentStats.normalizer``): half the
    bytes through Ray's object store and no CPU float pass.

    With ``shuffle_files`` the part order is reshuffled on every execution (every epoch), seeded by
    ``shuffle_seed``; add ``local_shuffle_buffer_size`` when iterating for row-level mixing.
    ``views=(0,)`` keeps only the original images of a store made with flips. Ready for
    ``TorchTrainer(datasets={"train": ...})`` and ``iter_torch_batches``.
    """
    import ray
    from ray.data.datasource import FileShuffleConfig

    store = open_store(url, storage_options)
    fs, _ = storage.resolve(url, storage_options)
    if storage.is_process_local(fs):
        raise ValueError(f"store {url}: a memory:// store lives in this process only and Ray workers cannot read "
                         f"it; use read_latents() here, or put the store on file://, s3:// or gs://")
    paths = [storage.resolve(p, storage_options)[1] for p in store.parts]
    shuffle = FileShuffleConfig(seed=shuffle_seed) if shuffle_files else None
    columns = ["label", "view", latent_store.LATENT_COLUMN]
    ds = ray.data.read_parquet(paths, filesystem=fs, shuffle=shuffle).select_columns(columns)
    if not normalize and views is None:
        return ds.select_columns(["label", latent_store.LATENT_COLUMN])
    return ds.map_batches(_to_training_batch, batch_format="pyarrow", zero_copy_batch=True, fn_kwargs={
        "shape": store.latent_shape, "stats": store.stats if normalize else None,
        "views": sorted({int(v) for v in views}) if views is not None else None})


def latent_batch(table: pa.Table, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Arrow rows as stored -> ``latent`` (B, N, C) in the store dtype and ``label`` int64, as views of
    the Arrow buffers (DLPack: no copy, and no copy of read-only memory either) when the column is one
    chunk; several chunks are joined once."""
    latents, labels = (_one_chunk(table.column(name)) for name in (latent_store.LATENT_COLUMN, "label"))
    values = latent_store.latent_values(latents, shape[0] * shape[1])
    return {"latent": torch.from_dlpack(values).view(-1, *shape), "label": torch.from_dlpack(labels)}


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def latent_collate_fn(shape: tuple[int, int]):
    """The ``collate_fn`` for ``iter_torch_batches`` over ``latent_dataset(..., normalize=False)``:
    Ray hands it Arrow batches, it returns :func:`latent_batch`'s tensors (Ray moves them to the device)."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    class LatentCollate(ArrowBatchCollateFn):
        def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
            return latent_batch(batch, shape)

    return LatentCollate()
