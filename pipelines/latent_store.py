"""The latent store: layout, manifest, identity, per-shard commits and the final statistics.

Layout under the store URL::

    manifest.json            format, latent_spec, preprocessing, latent storage, shards, counts, parts
    stats.safetensors        normalization statistics (rae.normalization.LatentStats), float64
    rejected.jsonl           one {"shard", "key", "reason"} per input that was not encoded
    parts/<shard-id>.parquet one part per source shard: key, label, view, latent
    _progress/<shard-id>.json       the commit marker of a finished shard (rows, rejected, files)
    _progress/<shard-id>.moments.npz that shard's partial moments (float64), merged in shard order

``latent`` is ``fixed_size_binary(N*C*itemsize)``: one value per row, the row-major ``(N, C)`` latent
of the store dtype, little-endian, with ``N = grid**2`` tokens (format version 3; version 2 stored
``fixed_size_list<float16>[N*C]``, whose Parquet decode ran at 0.16x the raw read rate, and stays
readable: readers branch on the column's Arrow type). Readable by plain pyarrow (``np.frombuffer``)
and reshaped from the manifest's ``latent_spec`` (a
:class:`rae.latent_spec.LatentSpec`: the encoder, its weights and input size, grid and channels)
alone. The spec is written once, here; every export made from the store copies it verbatim.

A shard counts as done only when its marker exists; the marker is written after the part and the
moments, each written atomically, so a killed job leaves either a finished shard or nothing that is
read. Readers use the parts listed in the manifest, never a directory listing. One encode job
writes a store at a time (nothing enforces it: there is no writer lock), so an encode may clear the
temporary files a killed one left (:func:`remove_temporaries`).

Keys are unique across the store: :func:`finalize` keeps a key's first occurrence, in shard order,
and rejects every later one (with its shard and the shard that holds the key), so a store made from
shards that repeat an image holds it once, and a resumed encode rejects the same occurrences.

Committing a shard needs numpy, pyarrow and fsspec only (its moments are computed in numpy): the
commit tasks are separate worker processes, which then do not import torch. Torch is imported by
the functions that merge or read the statistics.
"""
from __future__ import annotations

import io
import json
import posixpath
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.shards import ShardInfo
from pipelines.storage import StorageOptions
from rae.latent_spec import STATS_FILE, LatentSpec

if TYPE_CHECKING:
    from rae.normalization import LatentStats, MomentAccumulator

FORMAT = "rae-latent-store"
FORMAT_VERSION = 3  # 3: latent is one fixed_size_binary value per row (2: a fixed_size_list of values)
READABLE_VERSIONS = (2, 3)  # 2: the latent space is one `latent_spec` (1 had `encoder` and `latent.shape`)
MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl"
PARTS_DIR = "parts"
PROGRESS_DIR = "_progress"
LATENT_COLUMN = "latent"
LATENT_DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}
TARGET_ROW_GROUP_BYTES = 128 * 2**20


class StoreMismatchError(ValueError):
    """The store at a URL was made from other shards, another encoder or other preprocessing."""


def shard_id(index: int, shard: ShardInfo) -> str:
    stem = re.sub(r"\.(tar|tar\.gz|tgz)$", "", shard.name)
    return f"{index:05d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}"


def new_manifest(*, latent_spec: LatentSpec, preprocessing: dict, latent_dtype: str,
                 shards: list[ShardInfo], class_names: list[str] | None, software: dict) -> dict:
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent dtype {latent_dtype!r} is not supported; use one of {sorted(LATENT_DTYPES)}")
    if latent_spec.stats != STATS_FILE:
        raise ValueError(f"a store keeps its statistics in {STATS_FILE}; the latent spec names {latent_spec.stats!r}")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "status": "in_progress",
        "latent_spec": latent_spec.to_dict(),
        "preprocessing": preprocessing,
        "latent": {"column": LATENT_COLUMN, "dtype": latent_dtype,
                   "layout": "fixed_size_binary of N*C little-endian values, row-major (N tokens, C channels)"},
        "shards": [{"url": s.url, "name": s.name, "size": s.size, "id": shard_id(i, s)} for i, s in enumerate(shards)],
        "classes": class_names,
        "num_classes": len(class_names) if class_names else None,
        "software": software,
    }


def latent_spec(manifest: dict, url: str) -> LatentSpec:
    """The store's latent spec; a store of another format version is refused with what to do."""
    check_format(manifest, url)
    return LatentSpec.from_dict(manifest["latent_spec"], f"store {url} ({MANIFEST})")


def check_format(manifest: dict, url: str) -> None:
    """Refuse a manifest that is not a latent store's, or one written in a format version not readable here."""
    if manifest.get("format") != FORMAT:
        raise StoreMismatchError(f"{url} holds a {MANIFEST} that is not a {FORMAT} "
                                 f"(format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise StoreMismatchError(
            f"store {url} has format version {version!r}; this version of rae reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} "
            f"(the latent space recorded as one latent_spec). Re-encode the images with `rae encode` into a "
            f"new --store URL")


def identity(manifest: dict) -> dict:
    """What makes two stores the same: latent spec, preprocessing, latent dtype, shard names and sizes (the
    format version only changes how the rows are laid out: a complete store of an older one still serves)."""
    return {
        "latent_spec": manifest["latent_spec"],
        "preprocessing": manifest["preprocessing"],
        "latent": {"dtype": manifest["latent"]["dtype"]},
        "shards": [f"{s['name']} ({s['size']} bytes)" for s in manifest["shards"]],
    }


def differences(have: Any, want: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON-like values, one line per differing field."""
    if isinstance(have, dict) and isinstance(want, dict):
        lines = []
        for key in sorted(set(have) | set(want)):
            lines += differences(have.get(key), want.get(key), f"{prefix}.{key}" if prefix else key)
        return lines
    if have == want:
        return []
    if isinstance(have, list) and isinstance(want, list) and max(len(have), len(want)) > 8:
        have_set, want_set = set(map(str, have)), set(map(str, want))
        extra, missing = sorted(have_set - want_set), sorted(want_set - have_set)
        return [f"{prefix}: store has {extra[:3]}{'...' if len(extra) > 3 else ''} not asked for, "
                f"this run asks for {missing[:3]}{'...' if len(missing) > 3 else ''} not in the store"]
    return [f"{prefix}: store has {have!r}, this run asks for {want!r}"]


def check_compatible(existing: dict, wanted: dict, url: str) -> None:
    check_format(existing, url)
    if existing["format_version"] != FORMAT_VERSION and existing.get("status") != "complete":
        raise StoreMismatchError(
            f"store {url} is an unfinished encode in format version {existing['format_version']}; this rae writes "
            f"version {FORMAT_VERSION} and will not mix the two in one store. Finish it with the rae that "
            f"started it, or encode into a new --store URL")
    diff = differences(identity(existing), identity(wanted))
    if diff:
        raise StoreMismatchError(f"store {url} was made differently; refusing to mix:\n  " + "\n  ".join(diff)
                                 + "\nUse another --store URL, or the store's settings.")


def read_manifest(url: str, storage_options: StorageOptions | None = None) -> dict | None:
    """The store's manifest, None where there is none; a manifest that is not a JSON object is
    refused, naming the file."""
    fs, root = storage.resolve(url, storage_options)
    path = storage.join(root, MANIFEST)
    if not storage.exists(fs, path):
        return None
    try:
        manifest = storage.read_json(fs, path)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{storage.to_url(fs, path)} is not valid JSON ({err}): the store's manifest is damaged. "
                         f"Restore the file, or re-encode into a new --store URL") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{storage.to_url(fs, path)} holds a JSON {type(manifest).__name__}, not an object: the "
                         f"store's manifest is damaged. Restore the file, or re-encode into a new --store URL")
    return manifest


def require_manifest(url: str, storage_options: StorageOptions | None = None) -> dict:
    manifest = read_manifest(url, storage_options)
    if manifest is None:
        raise FileNotFoundError(f"no latent store at {url} (no {MANIFEST}); create one with `rae encode`")
    return manifest


def write_manifest(url: str, manifest: dict, storage_options: StorageOptions | None = None) -> None:
    fs, root = storage.resolve(url, storage_options)
    storage.write_json(fs, storage.join(root, MANIFEST), manifest)


# ---------------------------------------------------------------- parts

def latents_to_table(keys: list[str], labels: list[int], views: list[int], latents: np.ndarray) -> pa.Table:
    """Rows of a part; ``latents`` is (R, N, C) in a store dtype, each row one little-endian binary value."""
    rows = np.ascontiguousarray(latents, dtype=latents.dtype.newbyteorder("<"))
    width = int(np.prod(rows.shape[1:])) * rows.dtype.itemsize
    latent = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(rows), [None, pa.py_buffer(rows)])
    return pa.table({
        "key": pa.array(keys, pa.string()),
        "label": pa.array(labels, pa.int64()),
        "view": pa.array(views, pa.int8()),
        LATENT_COLUMN: latent,
    })


def latent_values(chunk: pa.Array, values_per_row: int) -> pa.Array:
    """One chunk of the latent column as a flat Arrow array of its values (R * N * C), without a copy:
    a version 3 ``fixed_size_binary`` row's bytes viewed as the store dtype (its width tells which),
    a version 2 ``fixed_size_list`` flattened."""
    if not pa.types.is_fixed_size_binary(chunk.type):
        return chunk.flatten()
    width = chunk.type.byte_width
    value_type = {2: pa.float16(), 4: pa.float32()}.get(width // values_per_row if values_per_row else 0)
    if value_type is None or width != values_per_row * value_type.byte_width:
        raise ValueError(f"a latent column of {chunk.type} does not hold rows of {values_per_row} float16 or "
                         f"float32 values; the store's parts do not match its manifest: re-encode it")
    data = chunk.buffers()[1].slice(chunk.offset * width, len(chunk) * width)
    return pa.Array.from_buffers(value_type, len(chunk) * values_per_row, [None, data])


def table_latents(table: pa.Table | pa.RecordBatch, shape: tuple[int, int] | list[int]) -> np.ndarray:
    """The latent column of ``table`` as an (R, N, C) array (no copy when the column is one chunk)."""
    column = table.column(LATENT_COLUMN)
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    values = [latent_values(chunk, shape[0] * shape[1]).to_numpy(zero_copy_only=False) for chunk in chunks]
    flat = values[0] if len(values) == 1 else np.concatenate(values) if values else np.zeros(0, np.float16)
    return flat.reshape(-1, *shape)


def write_shard(store_url: str, manifest: dict, index: int, *, keys: list[str], labels: list[int],
                latents: np.ndarray, rejected: list[dict], storage_options: StorageOptions | None = None,
                encoded_on: dict | None = None) -> dict:
    """Commit one shard: its Parquet part, its partial moments, then its marker. Returns the marker.

    ``latents`` is (n, V, N, C) for n images and V views. Images whose latent holds NaN or inf
    (an encoder overflow) are not written; they are added to ``rejected``. ``encoded_on`` (node,
    node type, device) is recorded in the marker and the finished manifest's part entry.
    """
    fs, root = storage.resolve(store_url, storage_options)
    shard = manifest["shards"][index]
    sid = shard["id"]
    finite = np.isfinite(latents.reshape(len(keys), -1)).all(axis=1) if len(keys) else np.zeros(0, bool)
    rejected = list(rejected) + [{"shard": shard["url"], "key": k, "reason": "non-finite latent (NaN or inf)"}
                                 for k, ok in zip(keys, finite) if not ok]
    keep = np.flatnonzero(finite)
    views = latents.shape[1] if latents.ndim == 4 else 1
    kept = latents[keep].reshape(-1, *latents.shape[-2:])
    marker = {"shard": shard["url"], "id": sid, "images": int(len(keep)), "rows": int(len(kept)),
              "rejected": rejected, "part": None, "moments": None, "encoded_on": encoded_on}
    if len(kept):
        table = latents_to_table([keys[i] for i in keep for _ in range(views)],
                                 [labels[i] for i in keep for _ in range(views)],
                                 [v for _ in keep for v in range(views)], kept)
        marker["part"] = f"{PARTS_DIR}/{sid}.parquet"
        marker["moments"] = f"{PROGRESS_DIR}/{sid}.moments.npz"
        _write_part(fs, root, marker, table, kept)
    storage.write_json(fs, storage.join(root, PROGRESS_DIR, f"{sid}.json"), marker)
    return marker


def _write_part(fs, root: str, marker: dict, table: pa.Table, latents: np.ndarray) -> None:
    """The part and the moments a marker names: ``table``'s rows, whose latents are ``latents`` (R, N, C)."""
    row_bytes = max(1, latents[0].nbytes)
    with storage.open_atomic(fs, storage.join(root, marker["part"])) as handle:
        # No dictionary or compression on the latents: float16 values all fit a dictionary, and
        # decoding through it made reads 2.5x slower for a 6% smaller file (benchmarks/bench_store_read).
        pq.write_table(table, handle, row_group_size=max(1, TARGET_ROW_GROUP_BYTES // row_bytes),
                       use_dictionary=["key"], compression={"key": "snappy", "label": "snappy",
                                                            "view": "snappy", LATENT_COLUMN: "none"})
    buffer = io.BytesIO()
    np.savez(buffer, **moment_state(latents))
    storage.write_bytes(fs, storage.join(root, marker["moments"]), buffer.getvalue())


def moment_state(latents: np.ndarray) -> dict[str, np.ndarray]:
    """Float64 count, mean and sum of squared deviations of (R, N, C) latents, R >= 1: the state
    ``rae.normalization.MomentAccumulator.from_state`` reads, computed in numpy (no torch in a commit)."""
    x = latents.astype(np.float64)
    mean = x.mean(0)
    return {"count": np.asarray(len(x)), "mean": mean, "m2": ((x - mean) ** 2).sum(0)}


def _load_moments(fs, path: str) -> MomentAccumulator:
    from rae.normalization import MomentAccumulator

    with fs.open(path, "rb") as handle, np.load(io.BytesIO(handle.read())) as npz:
        state = {key: npz[key] for key in npz.files}
    for key, value in state.items():
        if value.ndim == 0:
            state[key] = value.item()
    return MomentAccumulator.from_state(state)


def done_markers(store_url: str, manifest: dict, storage_options: StorageOptions | None = None) -> dict[int, dict]:
    """Markers of the shards already committed, by shard index."""
    fs, root = storage.resolve(store_url, storage_options)
    progress = storage.join(root, PROGRESS_DIR)
    fs.invalidate_cache(progress)
    present = {p.rsplit("/", 1)[-1] for p in fs.ls(progress, detail=False)} if fs.exists(progress) else set()
    markers = {}
    for index, shard in enumerate(manifest["shards"]):
        if f"{shard['id']}.json" in present:
            markers[index] = storage.read_json(fs, storage.join(progress, f"{shard['id']}.json"))
    return markers


def remove_temporaries(store_url: str, storage_options: StorageOptions | None = None) -> list[str]:
    """Delete the ``*.tmp-*`` files a killed writer left in the store's ``parts/`` and ``_progress/``
    (only a local disk has them: ``storage.open_atomic``); returns their paths. Run before an encode
    writes: one encode job writes a store at a time, so no live writer owns one of them."""
    fs, root = storage.resolve(store_url, storage_options)
    if not storage.is_local_disk(fs):
        return []
    removed = []
    for folder in (PARTS_DIR, PROGRESS_DIR):
        path = storage.join(root, folder)
        if not fs.isdir(path):
            continue
        for name in fs.ls(path, detail=False):
            if ".tmp-" in posixpath.basename(name):
                fs.rm_file(name)
                removed.append(name)
    return removed


def finalize(store_url: str, manifest: dict, storage_options: StorageOptions | None = None) -> dict:
    """Reject the later occurrences of keys repeated across shards, merge every shard's moments (in
    shard order, so a resumed job gives the same bits), write the statistics, the rejected list and
    the completed manifest, with the range of the labels stored."""
    fs, root = storage.resolve(store_url, storage_options)
    markers = done_markers(store_url, manifest, storage_options)
    missing = [s["name"] for i, s in enumerate(manifest["shards"]) if i not in markers]
    if missing:
        raise RuntimeError(f"store {store_url}: cannot finalize, shards not encoded yet: {missing[:5]}")
    shape = latent_spec(manifest, store_url).shape
    total: MomentAccumulator | None = None
    parts, rejected = [], []
    stored_from: dict[str, str] = {}  # key -> the shard it is stored from
    labels: set[int] = set()
    for index in range(len(manifest["shards"])):
        if markers[index]["part"] is not None:
            markers[index] = _keep_first_occurrences(fs, root, markers[index], shape, stored_from, labels)
        marker = markers[index]
        rejected += marker["rejected"]
        if marker["part"] is None:
            continue
        parts.append({"path": marker["part"], "rows": marker["rows"], "shard": marker["shard"],
                      "encoded_on": marker.get("encoded_on")})
        moments = _load_moments(fs, storage.join(root, marker["moments"]))
        if total is None:
            total = moments
        else:
            total.merge(moments)
    if total is None:
        raise ValueError(f"store {store_url}: no image in {len(manifest['shards'])} shard(s) could be encoded; "
                         f"see the {len(rejected)} rejected inputs, e.g. {rejected[:3]}")
    stats = total.to_stats()
    storage.write_bytes(fs, storage.join(root, STATS_FILE), _stats_bytes(stats))
    storage.write_bytes(fs, storage.join(root, REJECTED), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejected).encode())
    done = dict(manifest)
    done.update({
        "status": "complete",
        "parts": parts,
        "rows": sum(p["rows"] for p in parts),
        "images": sum(m["images"] for m in markers.values()),
        "rejected": len(rejected),
        "labels": {"min": min(labels), "max": max(labels), "distinct": len(labels)},
        "stats": {"count": int(stats.count), "eps": stats.eps, "has_mean": stats.mean is not None},
        "rejected_list": REJECTED,
    })
    write_manifest(store_url, done, storage_options)
    return done


def _keep_first_occurrences(fs, root: str, marker: dict, shape: tuple[int, int], stored_from: dict[str, str],
                            labels: set[int]) -> dict:
    """The shard's marker once the keys an earlier shard stored are rejected from its part.

    The rows kept go to a new part and moments, then the marker names them (its rewrite is the
    commit point): a finalize killed half-way leaves the old marker and part, and the rerun rejects
    the same keys again. ``stored_from`` and ``labels`` gain the part's keys and labels.
    """
    path = storage.join(root, marker["part"])
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle, columns=["key", "label"])
    keys = table.column("key").to_pylist()
    repeated = np.array([key in stored_from for key in keys], bool)
    if repeated.any():
        marker = _drop_rows(fs, root, marker, repeated, shape, stored_from)
        table = table.filter(pa.array(~repeated))
        keys = table.column("key").to_pylist()
    for key in keys:
        stored_from.setdefault(key, marker["shard"])
    labels.update(int(label) for label in np.unique(table.column("label").to_numpy()))
    return marker


def _drop_rows(fs, root: str, marker: dict, drop: np.ndarray, shape: tuple[int, int],
               stored_from: dict[str, str]) -> dict:
    """Commit the shard again without the rows ``drop`` marks (keys stored from an earlier shard),
    then delete the part and moments it replaces."""
    with fs.open(storage.join(root, marker["part"]), "rb") as handle:
        table = pq.read_table(handle)
    dropped = list(dict.fromkeys(table.column("key").filter(pa.array(drop)).to_pylist()))
    kept = table.filter(pa.array(~drop))
    sid, before = marker["id"], marker
    marker = dict(marker, rows=kept.num_rows, images=marker["images"] - len(dropped), part=None, moments=None,
                  rejected=marker["rejected"] + [
                      {"shard": marker["shard"], "key": key,
                       "reason": f"duplicate key: already stored from shard {stored_from[key]}"} for key in dropped])
    if kept.num_rows:
        marker["part"] = f"{PARTS_DIR}/{sid}.unique.parquet"
        marker["moments"] = f"{PROGRESS_DIR}/{sid}.unique.moments.npz"
        _write_part(fs, root, marker, kept, table_latents(kept, shape))
    storage.write_json(fs, storage.join(root, PROGRESS_DIR, f"{sid}.json"), marker)
    for name in ("part", "moments"):
        if before[name] != marker[name]:
            fs.rm_file(storage.join(root, before[name]))
    return marker


def _stats_bytes(stats: LatentStats) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / STATS_FILE
        stats.save(path)
        return path.read_bytes()


def load_stats(store_url: str, manifest: dict, storage_options: StorageOptions | None = None) -> LatentStats:
    from rae.normalization import LatentStats

    fs, root = storage.resolve(store_url, storage_options)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / STATS_FILE
        path.write_bytes(fs.cat_file(storage.join(root, latent_spec(manifest, store_url).stats)))
        return LatentStats.load(path)
