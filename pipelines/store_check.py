"""`rae store info` and `rae store verify`: what a store holds, and a full integrity check."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from pipelines import latent_store, storage
from pipelines.storage import StorageOptions
from pipelines.store_reader import iter_part_tables, open_store
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
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(url: str, *, stats_rtol: float = 1e-6, storage_options: StorageOptions | None = None,
                 ) -> VerifyReport:
    """Read every row and check it against the manifest: schema and shapes, row counts, unique
    (key, view), label and view ranges, no NaN/inf, and statistics recomputed from the data."""
    store = open_store(url, storage_options)
    manifest = store.manifest
    report = VerifyReport(url)
    n, c = store.latent_shape
    value_type = latent_store.LATENT_DTYPES[manifest["latent"]["dtype"]][1]
    expected_type = pa.list_(value_type, n * c)
    num_views = len(manifest["preprocessing"].get("views", ["original"]))
    num_classes = manifest.get("num_classes")
    seen: set[tuple[str, int]] = set()
    moments: MomentAccumulator | None = None
    for part, (_, table) in zip(manifest["parts"], iter_part_tables(store)):
        name = part["path"]
        latent_type = table.schema.field(latent_store.LATENT_COLUMN).type
        if latent_type != expected_type:
            report.problems.append(f"{name}: latent column is {latent_type}, manifest says {expected_type}")
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
            continue
        part_moments = MomentAccumulator()
        part_moments.update(torch.from_numpy(z.astype(np.float64)))
        moments = part_moments if moments is None else moments.merge(part_moments)
    if report.rows != manifest["rows"]:
        report.problems.append(f"{report.rows} rows in the parts, manifest says {manifest['rows']}")
    if manifest["rows"] != manifest["images"] * num_views:
        report.problems.append(f"manifest: {manifest['rows']} rows for {manifest['images']} images x {num_views} views")
    _check_rejected(store.url, manifest, report, storage_options)
    if moments is not None and not report.problems:
        _check_stats(moments, store.stats, stats_rtol, report)
    return report


def _check_rejected(url: str, manifest: dict, report: VerifyReport, storage_options: StorageOptions | None) -> None:
    fs, root = storage.resolve(url, storage_options)
    path = storage.join(root, manifest["rejected_list"])
    lines = fs.cat_file(path).decode().splitlines() if fs.exists(path) else []
    if len(lines) != manifest["rejected"]:
        report.problems.append(f"{manifest['rejected_list']}: {len(lines)} entries, "
                               f"manifest says {manifest['rejected']}")


def _check_stats(moments: MomentAccumulator, stored, rtol: float, report: VerifyReport) -> None:
    recomputed = moments.to_stats()
    if int(recomputed.count) != int(stored.count):
        report.problems.append(f"stats: count {stored.count}, data has {recomputed.count} rows")
        return
    pairs = [("var", recomputed.var, stored.var)]
    if stored.mean is not None:
        pairs.append(("mean", recomputed.mean, stored.mean))
    for name, data_value, stored_value in pairs:
        a, b = data_value.double().numpy(), stored_value.double().numpy()
        if a.shape != b.shape:
            report.problems.append(f"stats: {name} has shape {b.shape}, data gives {a.shape}")
        elif not np.allclose(a, b, rtol=rtol, atol=rtol * max(1e-12, float(np.abs(a).max()))):
            worst = float(np.abs(a - b).max())
            report.problems.append(f"stats: stored {name} differs from the data's by up to {worst:.3g}")
