"""Webdataset tar shards: make them from an image folder, list them, read them safely, extract them.

A shard is a tar of samples; a sample is the run of consecutive members sharing a key
(``n01440764/n01440764_10026.jpg`` + ``n01440764/n01440764_10026.cls``), the webdataset convention.
``classes.json`` beside the shards maps label -> class name.

Reading is our own (``tarfile`` in streaming mode over an fsspec file) rather than webdataset's or Ray's
readers, because every member must be checked and every problem recorded with its shard and key:
paths that escape the archive, links and devices, oversized members, duplicate keys, and a tar cut
short (reported by name, keeping the samples read before the cut).
"""
from __future__ import annotations

import io
import posixpath
import random
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import braceexpand
from tqdm.auto import tqdm

from pipelines import storage
from pipelines.storage import StorageOptions

CLASSES_FILE = "classes.json"
LABEL_EXTENSION = "cls"
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm"})
DEFAULT_MAX_MEMBER_BYTES = 64 * 2**20

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset: key = path up to the basename's first dot


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its full URL, a short name, and its size in bytes (part of a store's identity)."""
    url: str
    name: str
    size: int


@dataclass(frozen=True)
class Sample:
    key: str
    members: dict[str, bytes]  # lower-case extension -> bytes


@dataclass(frozen=True)
class Rejection:
    key: str
    reason: str


# ---------------------------------------------------------------- reading

def split_key(name: str) -> tuple[str, str] | None:
    """``"a/b.c.jpg"`` -> ``("a/b", "c.jpg")``; None for a name without an extension."""
    match = _KEY_RE.match(name[2:] if name.startswith("./") else name)
    return (match.group(1), match.group(2).lower()) if match else None


def unsafe_path_reason(name: str) -> str | None:
    """Why a member path could escape the archive if extracted (absolute or ``..``), else None."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return f"unsafe path {name!r}: absolute"
    if ".." in re.split(r"[/\\]", name):
        return f"unsafe path {name!r}: contains '..'"
    return None


def iter_tar_samples(fileobj: IO[bytes], *, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                     ) -> Iterator[Sample | Rejection]:
    """Samples of a tar stream in archive order, and a ``Rejection`` for every member not used.

    A truncated archive ends the iteration with a rejection whose reason starts ``truncated tar``;
    the sample being read when the data ran out is dropped (it may be incomplete) and recorded.
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    seen: set[str] = set()
    read_any = False
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                read_any = True
                name = member.name
                reason = unsafe_path_reason(name)
                if reason is None and member.isdir():
                    continue  # directory entries carry no data
                if reason is None and not member.isreg():
                    reason = f"not a regular file ({_member_kind(member)})"
                parts = split_key(name) if reason is None else None
                if reason is None and parts is None:
                    reason = f"member {name!r} has no extension"
                if reason is None and member.size > max_member_bytes:
                    reason = f"member {name!r} is {member.size} bytes (limit {max_member_bytes})"
                if reason is not None:
                    yield Rejection(name, reason)
                    continue
                member_key, ext = parts
                if member_key != key:
                    if key is not None:
                        yield Sample(key, members)
                    key, members = member_key, {}
                    if member_key in seen:
                        key = None
                        yield Rejection(member_key, "duplicate key (its members are not contiguous)")
                        continue
                    seen.add(member_key)
                if key is None:
                    continue  # the rest of a duplicate group
                extracted = tar.extractfile(member)
                members[ext] = extracted.read() if extracted is not None else b""
    except (tarfile.TarError, EOFError, OSError) as err:
        if not read_any:
            yield Rejection("", f"not a readable tar archive: {err}")
        else:
            where = f" inside sample {key!r}" if key is not None else ""
            yield Rejection(key or "", f"truncated tar: {err}{where}")
        return
    if key is not None:
        yield Sample(key, members)


def _member_kind(member: tarfile.TarInfo) -> str:
    for test, kind in ((member.issym, "symlink"), (member.islnk, "hard link"), (member.ischr, "character device"),
                       (member.isblk, "block device"), (member.isfifo, "fifo")):
        if test():
            return kind
    return "special member"


def parse_label(members: dict[str, bytes], num_classes: int | None) -> int | str:
    """The sample's integer label, or the reason it has none."""
    raw = members.get(LABEL_EXTENSION)
    if raw is None:
        return f"missing label (no .{LABEL_EXTENSION} member)"
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return f"invalid label {raw[:20]!r} (expected an integer)"
    if label < 0 or (num_classes is not None and label >= num_classes):
        return f"label {label} out of range [0, {num_classes})"
    return label


def image_member(members: dict[str, bytes]) -> tuple[str, bytes] | str:
    """The sample's image (extension, bytes), or the reason it has none."""
    found = sorted(ext for ext in members if ext in IMAGE_EXTENSIONS)
    if not found:
        others = ", ".join("." + ext for ext in sorted(members)) or "nothing"
        return f"no image member (found {others})"
    if len(found) > 1:
        return f"several image members ({', '.join(found)})"
    return found[0], members[found[0]]


# ---------------------------------------------------------------- listing

def list_shards(url: str, storage_options: StorageOptions | None = None) -> list[ShardInfo]:
    """Shards named by ``url``: a folder (its ``*.tar``), a glob, a brace pattern or one file; sorted."""
    fs, _ = storage.resolve(url, storage_options)
    paths: list[str] = []
    for pattern in braceexpand.braceexpand(url):
        _, path = storage.resolve(pattern, storage_options)
        if any(ch in path for ch in "*?["):
            paths.extend(fs.glob(path))
            continue
        # fs.info, not fs.isdir/exists: those answer False for storage that cannot be asked at all (an
        # unreachable S3 endpoint), which would read as missing shards.
        fs.invalidate_cache(path)
        try:
            is_folder = fs.info(path)["type"] == "directory"
        except FileNotFoundError:
            raise FileNotFoundError(f"shards {pattern!r}: no such file or folder") from None
        if is_folder:
            paths.extend(p for p in fs.find(path) if p.endswith((".tar", ".tar.gz", ".tgz")))
        else:
            paths.append(path)
    if not paths:
        raise FileNotFoundError(f"shards {url!r}: no .tar files found")
    shards = []
    for path in sorted(set(paths)):
        info = fs.info(path)
        shards.append(ShardInfo(storage.to_url(fs, path), posixpath.basename(path), int(info["size"])))
    return shards


def read_class_names(shards: list[ShardInfo], storage_options: StorageOptions | None = None) -> list[str] | None:
    """The class names from ``classes.json`` beside the first shard, or None when there is none."""
    fs, path = storage.resolve(shards[0].url, storage_options)
    index = storage.join(posixpath.dirname(path), CLASSES_FILE)
    if not storage.exists(fs, index):
        return None
    names = storage.read_json(fs, index).get("classes")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{storage.to_url(fs, index)}: expected {{'classes': [name, ...]}}")
    return names


# ---------------------------------------------------------------- making

@dataclass
class MakeReport:
    shards: list[str]
    images: int
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # files under SRC that are not images


def make_shards(src: str, dest: str, *, max_count: int = 1000, max_bytes: int = 2**30, shuffle_seed: int | None = 0,
                prefix: str = "shard", storage_options: StorageOptions | None = None,
                progress: bool = True) -> MakeReport:
    """Pack an image folder (one subfolder per class) into webdataset tar shards at ``dest``.

    Keys are ``<class>/<file stem>`` (dots in stems become ``_``), stable across runs. Images keep
    their original bytes. With ``shuffle_seed`` the samples are spread over shards in a seeded order,
    so every shard holds many classes; ``None`` keeps folder order.
    """
    if max_count < 1 or max_bytes < 1:
        raise ValueError(f"max_count and max_bytes must be positive, got {max_count} and {max_bytes}")
    src_fs, src_path = storage.resolve(src, storage_options)
    if not src_fs.isdir(src_path):
        raise FileNotFoundError(f"image folder {src!r} does not exist")
    classes = sorted(posixpath.basename(p["name"].rstrip("/")) for p in src_fs.ls(src_path, detail=True)
                     if p["type"] == "directory")
    if not classes:
        raise ValueError(f"image folder {src!r} has no class subfolders (expected SRC/<class>/<image>)")
    items, skipped, keys = [], [], set()
    for label, name in enumerate(classes):
        class_dir = storage.join(src_path, name)
        for path in sorted(src_fs.find(class_dir)):
            rel = posixpath.relpath(path, class_dir)
            stem, dot, ext = posixpath.basename(rel).rpartition(".")
            if not dot or ext.lower() not in IMAGE_EXTENSIONS:
                skipped.append(storage.to_url(src_fs, path))
                continue
            key = posixpath.join(name, posixpath.dirname(rel), stem.replace(".", "_"))
            if key in keys:
                raise ValueError(f"two images in {src!r} map to the key {key!r}; rename one of them")
            keys.add(key)
            items.append((key, ext.lower(), label, path))
    if not items:
        raise ValueError(f"image folder {src!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)

    dest_fs, dest_path = storage.resolve(dest, storage_options)
    if dest_fs.exists(dest_path) and any(p.endswith(".tar") for p in dest_fs.find(dest_path)):
        raise FileExistsError(f"{dest!r} already holds shards; choose an empty destination")
    dest_fs.makedirs(dest_path, exist_ok=True)
    written: list[str] = []
    bar = tqdm(total=len(items), unit="img", desc="shards", disable=not progress)
    start = 0
    while start < len(items):
        shard_path = storage.join(dest_path, f"{prefix}-{len(written):06d}.tar")
        size, count = 0, 0
        with storage.open_atomic(dest_fs, shard_path) as handle, tarfile.open(fileobj=handle, mode="w|") as tar:
            while start + count < len(items) and count < max_count and (count == 0 or size < max_bytes):
                key, ext, label, path = items[start + count]
                data = src_fs.cat_file(path)
                _add_member(tar, f"{key}.{ext}", data)
                _add_member(tar, f"{key}.{LABEL_EXTENSION}", str(label).encode())
                size += len(data)
                count += 1
                bar.update(1)
        written.append(storage.to_url(dest_fs, shard_path))
        start += count
    bar.close()
    storage.write_json(dest_fs, storage.join(dest_path, CLASSES_FILE),
                       {"classes": classes, "images": len(items), "shards": [posixpath.basename(s) for s in written]})
    return MakeReport(written, len(items), classes, skipped)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: identical inputs, identical shards
    tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------- extracting

@dataclass
class ExtractReport:
    images: int
    rejected: list[dict] = field(default_factory=list)  # {"shard", "key", "reason"}


def extract_shards(shards_url: str, dest: str, *, storage_options: StorageOptions | None = None,
                   progress: bool = True) -> ExtractReport:
    """The reverse of ``make_shards``: write every sample's image to ``dest/<class>/<stem>.<ext>``.

    Class folders take their names from ``classes.json`` when the shards have one, else the label.
    Members that are unsafe, unlabelled or not images are not written and are listed in the report.
    """
    shards = list_shards(shards_url, storage_options)
    classes = read_class_names(shards, storage_options)
    dest_fs, dest_path = storage.resolve(dest, storage_options)
    report = ExtractReport(0)
    for shard in tqdm(shards, unit="shard", desc="extract", disable=not progress):
        fs, path = storage.resolve(shard.url, storage_options)
        with fs.open(path, "rb") as handle:
            for item in iter_tar_samples(handle):
                if isinstance(item, Rejection):
                    report.rejected.append({"shard": shard.url, "key": item.key, "reason": item.reason})
                    continue
                label = parse_label(item.members, len(classes) if classes else None)
                image = image_member(item.members)
                reason = label if isinstance(label, str) else image if isinstance(image, str) else None
                if reason is not None:
                    report.rejected.append({"shard": shard.url, "key": item.key, "reason": reason})
                    continue
                folder = classes[label] if classes else str(label)
                target = storage.join(dest_path, folder, f"{posixpath.basename(item.key)}.{image[0]}")
                if dest_fs.exists(target):
                    raise FileExistsError(f"{storage.to_url(dest_fs, target)} exists; extract into an empty folder")
                storage.write_bytes(dest_fs, target, image[1])
                report.images += 1
    return report


def shard_bytes_reader(shard: ShardInfo, data: bytes | None, storage_options: StorageOptions | None) -> IO[bytes]:
    """A readable file for a shard: its bytes when the driver shipped them, else the shard's URL."""
    if data is not None:
        return io.BytesIO(data)
    fs, path = storage.resolve(shard.url, storage_options)
    return fs.open(path, "rb", block_size=8 * 2**20)
