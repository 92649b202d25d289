"""`rae store info` and `rae store verify`: what a store holds, and a full integrity check."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines import latent_store, storage
from pipelines.storage import StorageOptions
from rae.normalization import MomentAccumulator


def store_info(url: str, storage_options: StorageOptions | None = None) -> dict:
    """A summary of the manifest (works on an unfinished store too)."""
    manifest = latent_store.require_manifest(url, storage_options)
    info = {
        "store": url,
        "status": manifest.get("status"),
        "format_version": manifest.get("format_version"),
        "latent_spec": manifest.get("latent_spec"),
        "preprocessing": manifest.get("preprocessing"),
        "latent": manifest.get("latent"),
        "shards": len(manifest.get("shards", [])),
        "num_classes": manifest.get("num_classes"),
        "labels": manifest.get("labels"),  # min, max and distinct labels stored (a complete store)
        "software": manifest.get("software"),
    }
    if manifest.get("status") == "complete":
        info.update({k: manifest[k] for k in ("rows", "images", "rejected")})
        info["parts"] = len(manifest["parts"])
    else:
        info["shards_done"] = len(latent_store.done_markers(url, manifest, storage_options))
    return info


@dataclass
class VerifyReport:
    store: str
    rows: int = 0
    problems: list[str] = field(default_factory=list)  # each "<file in the store>: <what is wrong>"

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(url: str, *, stats_rtol: float = 1e-6, storage_options: StorageOptions | None = None,
                 ) -> VerifyReport:
    """Read every row and check it against the manifest: schema and shapes, row counts, unique
    (key, view), label and view ranges, no NaN/inf, and statistics recomputed from the data.

    Every problem is reported, each naming the file it is in: a part that cannot be read is one
    problem and the check goes on with the others (the statistics are then not compared). A
    manifest that cannot be read at all raises (there is nothing to check against).
    """
    manifest = latent_store.require_manifest(url, storage_options)
    report = VerifyReport(url)
    n, c = latent_store.latent_spec(manifest, url).shape
    if manifest.get("status") != "complete":
        report.problems.append(f"{latent_store.MANIFEST}: the encode has not finished (status "
                               f"{manifest.get('status')!r}); rerun `rae encode` with the same arguments")
        return report
    fs, root = storage.resolve(url, storage_options)
    value_type = latent_store.LATENT_DTYPES[manifest["latent"]["dtype"]][1]
    expected_type = (pa.list_(value_type, n * c) if manifest["format_version"] == 2
                     else pa.binary(n * c * value_type.byte_width))
    num_views = len(manifest["preprocessing"].get("views", ["original"]))
    num_classes = manifest.get("num_classes")
    seen: set[tuple[str, int]] = set()
    moments: MomentAccumulator | None = None
    every_row_read = True
    for part in manifest["parts"]:
        name = part["path"]
        table = _read_part(fs, storage.join(root, name), name, report)
        if table is None:
            every_row_read = False
            continue
        latent_type = table.schema.field(latent_store.LATENT_COLUMN).type
        if latent_type != expected_type:
            report.problems.append(f"{name}: latent column is {latent_type}, manifest says {expected_type}")
            every_row_read = False
            continue
        if table.num_rows != part["rows"]:
            report.problems.append(f"{name}: {table.num_rows} rows, manifest says {part['rows']}")
        report.rows += table.num_rows
        keys = table.column("key").to_pylist()
        views = table.column("view").to_numpy()
        labels = table.column("label").to_numpy()
        duplicates = [(k, int(v)) for k, v in zip(keys, views) if (k, int(v)) in seen or seen.add((k, int(v)))]
        if duplicates:
            report.problems.append(f"{name}: {len(duplicates)} duplicate (key, view) rows, e.g. {duplicates[0]}")
        if len(views) and (views.min() < 0 or views.max() >= num_views):
            report.problems.append(f"{name}: view outside [0, {num_views})")
        if len(labels) and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
            report.problems.append(f"{name}: label outside [0, {num_classes})")
        z = latent_store.table_latents(table, (n, c))
        bad = int((~np.isfinite(z.reshape(len(z), -1)).all(axis=1)).sum())
        if bad:
            report.problems.append(f"{name}: {bad} rows with NaN or inf latents")
            every_row_read = False
            continue
        part_moments = MomentAccumulator()
        part_moments.update(torch.from_numpy(z.astype(np.float64)))
        moments = part_moments if moments is None else moments.merge(part_moments)
    if every_row_read and report.rows != manifest["rows"]:
        report.problems.append(f"{latent_store.MANIFEST}: {report.rows} rows in the parts, manifest says "
                               f"{manifest['rows']}")
    if manifest["rows"] != manifest["images"] * num_views:
        report.problems.append(f"{latent_store.MANIFEST}: {manifest['rows']} rows for {manifest['images']} images "
                               f"x {num_views} views")
    _check_rejected(fs, root, manifest, report)
    stats_name = latent_store.latent_spec(manifest, url).stats
    stats = _read_stats(url, manifest, stats_name, storage_options, report)
    if moments is not None and stats is not None and every_row_read:
        _check_stats(moments, stats, stats_rtol, stats_name, report)
    return report


def _read_part(fs, path: str, name: str, report: VerifyReport) -> pa.Table | None:
    """The part's rows, or None with the problem recorded (missing, truncated, not Parquet, columns missing)."""
    try:
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
    except FileNotFoundError:
        report.problems.append(f"{name}: missing")
        return None
    except (OSError, pa.ArrowException) as err:
        # pyarrow names a file it was handed open '<Buffer>': the problem names the part instead
        reason = str(err).replace("Could not open Parquet input source '<Buffer>': ", "").replace("'<Buffer>'", "it")
        report.problems.append(f"{name}: not a readable Parquet file (truncated or damaged): {reason}")
        return None
    absent = sorted({"key", "label", "view", latent_store.LATENT_COLUMN} - set(table.column_names))
    if absent:
        report.problems.append(f"{name}: no column {', '.join(absent)} (columns: {', '.join(table.column_names)})")
        return None
    return table


def _read_stats(url: str, manifest: dict, name: str, storage_options: StorageOptions | None, report: VerifyReport):
    """The statistics stored in file ``name``, or None with the problem recorded."""
    try:
        return latent_store.load_stats(url, manifest, storage_options)
    except FileNotFoundError:
        report.problems.append(f"{name}: missing")
    except Exception as err:  # safetensors and torch raise their own types for a damaged file
        report.problems.append(f"{name}: not readable statistics ({type(err).__name__}: {err})")
    return None


def _check_rejected(fs, root: str, manifest: dict, report: VerifyReport) -> None:
    name = manifest["rejected_list"]
    path = storage.join(root, name)
    try:
        lines = fs.cat_file(path).decode().splitlines() if fs.exists(path) else []
    except (OSError, UnicodeDecodeError) as err:
        report.problems.append(f"{name}: not readable ({err})")
        return
    if len(lines) != manifest["rejected"]:
        report.problems.append(f"{name}: {len(lines)} entries, manifest says {manifest['rejected']}")


def _check_stats(moments: MomentAccumulator, stored, rtol: float, name: str, report: VerifyReport) -> None:
    """The statistics in file ``name`` against those recomputed from every row."""
    recomputed = moments.to_stats()
    if int(recomputed.count) != int(stored.count):
        report.problems.append(f"{name}: count {stored.count}, data has {recomputed.count} rows")
        return
    pairs = [("var", recomputed.var, stored.var)]
    if stored.mean is not None:
        pairs.append(("mean", recomputed.mean, stored.mean))
    for field_name, data_value, stored_value in pairs:
        a, b = data_value.double().numpy(), stored_value.double().numpy()
        if a.shape != b.shape:
            report.problems.append(f"{name}: {field_name} has shape {b.shape}, data gives {a.shape}")
        elif not np.allclose(a, b, rtol=rtol, atol=rtol * max(1e-12, float(np.abs(a).max()))):
            worst = float(np.abs(a - b).max())
            report.problems.append(f"{name}: stored {field_name} differs from the data's by up to {worst:.3g}")
