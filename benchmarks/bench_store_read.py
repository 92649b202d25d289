"""Store read: latent batches/s from the Parquet latent store into torch, against reading the same
bytes raw (every part file read whole, no decoding). Paths measured, side by side, warm page cache:

- raw bytes: ``fs.cat_file`` of every part (the ceiling);
- pyarrow: ``pq.read_table`` + reshape to (R, N, C) float16 (decoding Parquet, no Ray) of the store
  (format 3: the latent one ``fixed_size_binary`` value per row, viewed without a copy); the same rows
  rewritten with the latent as ``binary`` and ``large_binary`` (the other one-value-per-row types), and as
  format 2 stored it (a ``fixed_size_list`` of float16, whose per-value decode set the pace);
- read_latents: the whole store as numpy, stored dtype, and normalized to float32;
- latent_dataset + iter_torch_batches, the training path: before (``normalize=True``: float32 batches
  normalized on the CPU in Ray Data) and now (``normalize=False`` + ``latent_collate_fn``: the float16
  rows as stored, tensors made from the Arrow buffers without a copy), the latter as host batches and
  with the step's normalization applied (``LatentStats.normalizer``; on the CPU here, the training
  device, where a GPU run pays it on the GPU); steady rates, the start of each execution apart;
- store_batches, the DiT's training path now (``pipelines.store_batches.StoreBatches``: each worker
  reads its share with pyarrow, a prefetch thread, no Ray Data): one rank's epoch of float16 batches
  as they reach the step, in the share's order and through the training default's local shuffle
  buffer (``shuffle_rows`` rows), and normalized as the step does on its device; whole epochs, their
  start included. The shuffled path memory-maps its parts; it is also measured with them read into
  memory (``map_parts=False``), side by side.

    python -m benchmarks.bench_store_read [--quick]
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.common import finish, PeakMemory, Recorder, alternate, make_latent_store, parse_args, start_ray
from pipelines import latent_store, storage
from pipelines.store_batches import StoreBatches, store_rows
from pipelines.store_reader import latent_collate_fn, latent_dataset, open_store, read_latents


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    quick = args.quick
    config = {"rows": 128 if quick else 2048, "encoder": "dinov2-s-offline" if quick else "dinov2-b-reg4",
              "input_size": 56 if quick else 224, "tokens": 16 if quick else 256, "channels": 384 if quick else 768,
              "parts": 2 if quick else 4, "batch_size": 16 if quick else 64, "latent_dtype": "float16",
              "repeats": 1 if quick else 3, "shuffle_rows": 32 if quick else 512, "page_cache": "warm (a first untimed raw read)",
              "ray_paths": "steady rate from the first batch to the last; the execution's start apart"}
    rec = Recorder("store_read", args, config)
    work = Path(tempfile.mkdtemp(prefix="rae-bench-store-"))
    started_ray = start_ray()
    try:
        url = make_latent_store(f"file://{work}/store", rows=config["rows"], encoder=config["encoder"],
                                input_size=config["input_size"], parts=config["parts"])
        store = open_store(url)
        shape = store.latent_shape
        assert shape == (config["tokens"], config["channels"]), shape
        batches = config["rows"] // config["batch_size"]
        row_bytes = shape[0] * shape[1] * 2
        peaks: dict[str, float] = {}
        startups: list[float] = []

        def raw() -> float:
            start = time.perf_counter()
            total = 0
            for part in store.parts:
                fs, path = storage.resolve(part)
                total += len(fs.cat_file(path))
            elapsed = time.perf_counter() - start
            rec.record["config"]["part_bytes_total"] = total
            return (total / row_bytes) / config["batch_size"] / elapsed  # latent bytes as batches

        rewritten: dict[str, list[str]] = {"binary": [], "large_binary": [], "list": []}
        for index, part in enumerate(store.parts):  # the same rows, the latent column of another type
            fs, path = storage.resolve(part)
            with fs.open(path, "rb") as handle:
                table = pq.read_table(handle)
            for kind, paths in rewritten.items():
                paths.append(str(work / f"{kind}-{index}.parquet"))
                pq.write_table(with_latent_column(table, shape, kind), paths[-1], use_dictionary=["key"],
                               compression={"key": "snappy", "label": "snappy", "view": "snappy",
                                            latent_store.LATENT_COLUMN: "none"},
                               row_group_size=max(1, latent_store.TARGET_ROW_GROUP_BYTES // row_bytes))  # as the store

        def arrow(parts: list[str], to_latents) -> float:
            start = time.perf_counter()
            for part in parts:
                fs, path = storage.resolve(part)
                with fs.open(path, "rb") as handle:
                    to_latents(pq.read_table(handle, columns=[latent_store.LATENT_COLUMN]), shape)
            return batches / (time.perf_counter() - start)

        def whole(normalize: bool) -> float:
            start = time.perf_counter()
            with PeakMemory(tree=False) as memory:
                out = read_latents(url, normalize=normalize)
            peaks[f"read_latents_normalize_{normalize}"] = memory.peak_mib
            assert len(out["latent"]) == config["rows"]
            return batches / (time.perf_counter() - start)

        def ray_torch(normalize: bool) -> float:
            """Steady batches/s, from the first batch to the last: an epoch's execution starts once
            (recorded apart, as ``ray_execution_start_s``) and then streams."""
            ds = latent_dataset(url, normalize=normalize, shuffle_files=False)
            start = time.perf_counter()
            seen, first = 0, None
            with PeakMemory() as memory:
                for batch in ds.iter_torch_batches(batch_size=config["batch_size"], drop_last=True):
                    if first is None:
                        first = time.perf_counter()
                        startups.append(first - start)
                    seen += len(batch["latent"])
            peaks[f"latent_dataset_normalize_{normalize}"] = memory.peak_mib
            assert seen == batches * config["batch_size"], seen
            return (batches - 1) / (time.perf_counter() - first)

        normalizer = store.stats.normalizer("cpu")

        def ray_float16(normalize_on_device: bool) -> float:
            """The training path now: float16 as stored, to host tensors, then (as the DiT step does,
            on its device) normalized; steady batches/s as in ``ray_torch``."""
            ds = latent_dataset(url, normalize=False, shuffle_files=False)
            start = time.perf_counter()
            seen, first = 0, None
            with PeakMemory() as memory:
                for batch in ds.iter_torch_batches(batch_size=config["batch_size"], drop_last=True,
                                                   collate_fn=latent_collate_fn(shape)):
                    if first is None:
                        first = time.perf_counter()
                        startups.append(first - start)
                    assert batch["latent"].dtype == torch.float16, batch["latent"].dtype
                    if normalize_on_device:
                        normalizer(batch["latent"])
                    seen += len(batch["latent"])
            peaks[f"latent_dataset_float16_normalize_on_device_{normalize_on_device}"] = memory.peak_mib
            assert seen == batches * config["batch_size"], seen
            return (batches - 1) / (time.perf_counter() - first)

        rows = store_rows(store)
        epochs = iter(range(10**6))

        def local(shuffle_rows: int, normalize_on_device: bool = False, map_parts: bool = True) -> float:
            """One rank (of one) reading a whole epoch, a new row-group order each call."""
            source = StoreBatches(rows, rank=0, world=1, seed=0, shuffle_buffer=shuffle_rows, map_parts=map_parts)
            start = time.perf_counter()
            seen = 0
            with PeakMemory(tree=False) as memory:
                for batch in source(next(epochs), config["batch_size"]):
                    assert batch["latent"].dtype == torch.float16, batch["latent"].dtype
                    if normalize_on_device:
                        normalizer(batch["latent"])
                    seen += len(batch["latent"])
            peaks[f"store_batches_shuffle_{shuffle_rows}_normalize_{normalize_on_device}_map_{map_parts}"] = memory.peak_mib
            assert seen == batches * config["batch_size"], seen
            return batches / (time.perf_counter() - start)

        raw()
        rates = alternate({"raw_bytes": raw,
                           "pyarrow_read_table": lambda: arrow(store.parts, latent_store.table_latents),
                           "pyarrow_read_table_binary_latent_column":
                               lambda: arrow(rewritten["binary"], binary_latents),
                           "pyarrow_read_table_large_binary_latent_column":
                               lambda: arrow(rewritten["large_binary"], binary_latents),
                           "pyarrow_read_table_format_2_list_latent_column":
                               lambda: arrow(rewritten["list"], latent_store.table_latents),
                           "read_latents_float16": lambda: whole(False),
                           "read_latents_normalized_float32": lambda: whole(True),
                           "latent_dataset_iter_torch_batches_normalized": lambda: ray_torch(True),
                           "latent_dataset_float16_host_batches": lambda: ray_float16(False),
                           "latent_dataset_float16_normalized_on_device_cpu": lambda: ray_float16(True),
                           "store_batches_float16_host_batches": lambda: local(0),
                           "store_batches_float16_shuffled_host_batches": lambda: local(config["shuffle_rows"]),
                           "store_batches_float16_shuffled_host_batches_parts_read_into_memory":
                               lambda: local(config["shuffle_rows"], map_parts=False),
                           "store_batches_float16_shuffled_normalized_on_device_cpu":
                               lambda: local(config["shuffle_rows"], normalize_on_device=True)},
                          config["repeats"])
        rec.add("batches_per_s", rates)
        ceiling = rates["raw_bytes"]["median"]
        rec.add("fraction_of_raw", {k: v["median"] / ceiling for k, v in rates.items()})
        rec.add("latent_mb_per_s", {k: v["median"] * config["batch_size"] * row_bytes / 1e6 for k, v in rates.items()})
        rec.add("peak_host_pss_mib", peaks)
        rec.add("ray_execution_start_s", {"median": float(np.median(startups)), "all": startups})
        old, new = "latent_dataset_iter_torch_batches_normalized", "latent_dataset_float16_normalized_on_device_cpu"
        rec.add("training_path_speedup", rates[new]["median"] / rates[old]["median"])
        rec.add("goal_store_to_gpu_ready_batches_fraction_of_raw",  # the DiT's path, with its shuffle buffer
                rates["store_batches_float16_shuffled_host_batches"]["median"] / ceiling)
        rec.add("store_batches_speedup_over_latent_dataset",
                rates["store_batches_float16_shuffled_host_batches"]["median"]
                / rates["latent_dataset_float16_host_batches"]["median"])
        rec.add("memory_mapped_parts_speedup",
                rates["store_batches_float16_shuffled_host_batches"]["median"]
                / rates["store_batches_float16_shuffled_host_batches_parts_read_into_memory"]["median"])
        if not torch.cuda.is_available():
            rec.skip("normalize_on_gpu", "no GPU in this run: the step's normalization measured on the CPU")
    finally:
        finish(work, started_ray)
    rec.write()


def with_latent_column(table: pa.Table, shape: tuple[int, int], kind: str) -> pa.Table:
    """``table`` with its latent column as ``binary`` or ``large_binary`` (one value per row, the same
    bytes), or as format 2's ``list`` (a fixed-size list of float16)."""
    values = np.ascontiguousarray(latent_store.table_latents(table, shape))
    if kind == "list":
        column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), shape[0] * shape[1])
    else:
        arrow_type, offset_type = {"binary": (pa.binary(), np.int32), "large_binary": (pa.large_binary(), np.int64)}[kind]
        offsets = pa.py_buffer(np.arange(len(table) + 1, dtype=offset_type) * values[0].nbytes)
        column = pa.Array.from_buffers(arrow_type, len(table), [None, offsets, pa.py_buffer(values)])
    index = table.schema.get_field_index(latent_store.LATENT_COLUMN)
    return table.set_column(index, latent_store.LATENT_COLUMN, column)


def binary_latents(table: pa.Table, shape: tuple[int, int]) -> np.ndarray:
    """The (R, N, C) float16 view of a binary latent column (no copy when it is one chunk)."""
    column = table.column(latent_store.LATENT_COLUMN)
    chunk = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    offsets = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
    start = int(np.frombuffer(chunk.buffers()[1], offsets)[chunk.offset])
    return np.frombuffer(chunk.buffers()[2], np.float16)[start // 2:].reshape(-1, *shape)[:len(chunk)]


if __name__ == "__main__":
    main()
