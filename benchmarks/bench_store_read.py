"""Store read: latent batches/s from the Parquet latent store into torch, against reading the same
bytes raw (every part file read whole, no decoding). Paths measured, side by side, warm page cache:

- raw bytes: ``fs.cat_file`` of every part (the ceiling);
- pyarrow: ``pq.read_table`` + reshape to (R, N, C) float16 (decoding Parquet, no Ray); and the
  same parts rewritten with dictionary encoding and compression off for every column (a check that
  the store's writer, which turns them off for the latent column, leaves nothing there: float16 has
  only 65,536 values, so pyarrow's default dictionary encoding succeeds on latents and every value
  would be decoded through the dictionary on read);
- read_latents: the whole store as numpy, stored dtype, and normalized to float32;
- latent_dataset + iter_torch_batches: the training path (normalized float32 torch batches), and
  the same without normalization; steady rates, the start of each execution recorded apart.

    python -m benchmarks.bench_store_read [--quick]
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from benchmarks.common import finish, PeakMemory, Recorder, alternate, make_latent_store, parse_args, start_ray
from pipelines import latent_store, storage
from pipelines.store_reader import latent_dataset, open_store, read_latents


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    quick = args.quick
    config = {"rows": 128 if quick else 2048, "encoder": "dinov2-s-offline" if quick else "dinov2-b-reg4",
              "input_size": 56 if quick else 224, "tokens": 16 if quick else 256, "channels": 384 if quick else 768,
              "parts": 2 if quick else 4, "batch_size": 16 if quick else 64, "latent_dtype": "float16",
              "repeats": 1 if quick else 3, "page_cache": "warm (a first untimed raw read)",
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

        plain_parts = []
        for index, part in enumerate(store.parts):  # the same rows, written without dictionary/compression
            fs, path = storage.resolve(part)
            with fs.open(path, "rb") as handle:
                table = pq.read_table(handle)
            plain_parts.append(str(work / f"plain-{index}.parquet"))
            pq.write_table(table, plain_parts[-1], use_dictionary=False, compression="none",
                           row_group_size=max(1, latent_store.TARGET_ROW_GROUP_BYTES // row_bytes))  # as the store

        def arrow(parts: list[str]) -> float:
            start = time.perf_counter()
            for part in parts:
                fs, path = storage.resolve(part)
                with fs.open(path, "rb") as handle:
                    latent_store.table_latents(pq.read_table(handle, columns=[latent_store.LATENT_COLUMN]), shape)
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

        raw()
        rates = alternate({"raw_bytes": raw, "pyarrow_read_table": lambda: arrow(store.parts),
                           "pyarrow_read_table_no_dictionary_no_compression": lambda: arrow(plain_parts),
                           "read_latents_float16": lambda: whole(False),
                           "read_latents_normalized_float32": lambda: whole(True),
                           "latent_dataset_iter_torch_batches_normalized": lambda: ray_torch(True),
                           "latent_dataset_iter_torch_batches_raw": lambda: ray_torch(False)},
                          config["repeats"])
        rec.add("batches_per_s", rates)
        ceiling = rates["raw_bytes"]["median"]
        rec.add("fraction_of_raw", {k: v["median"] / ceiling for k, v in rates.items()})
        rec.add("latent_mb_per_s", {k: v["median"] * config["batch_size"] * row_bytes / 1e6 for k, v in rates.items()})
        rec.add("peak_host_pss_mib", peaks)
        rec.add("ray_execution_start_s", {"median": float(np.median(startups)), "all": startups})
    finally:
        finish(work, started_ray)
    rec.write()


if __name__ == "__main__":
    main()
