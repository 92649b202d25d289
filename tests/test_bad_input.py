"""Bad input in shards: each case is converted correctly or rejected with its shard, key and reason."""
import errno
import io
import os
import struct
import tarfile
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from ray_lines import without_ray_lines

from pipelines.image_decode import DecodeLimits, center_crop_arr, decode_image, decode_shard
from pipelines.shards import ShardInfo

SIZE = 32
LIMITS = DecodeLimits(min_side=8, max_pixels=1_000_000)


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def rgb_jpeg(seed: int = 0, size: tuple[int, int] = (40, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(rng.integers(0, 255, (*size, 3), dtype=np.uint8), "JPEG")


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = len(data), kind, link
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_tar(path, members) -> ShardInfo:
    with tarfile.open(path, "w") as tar:
        for member in members:
            add(tar, *member)
    return ShardInfo(str(path), path.name, path.stat().st_size)


CATEGORIES = ("not an image", "corrupt or truncated image", "no image member", "unsafe path", "not a regular file",
              "missing label", "invalid label", "image too small", "image too large", "duplicate key", "truncated tar",
              "not a readable tar archive")


def reasons(decoded) -> Counter:
    """Rejections counted by the category their reason starts with (the reason itself when none fits)."""
    return Counter(next((c for c in CATEGORIES if r["reason"].startswith(c)), r["reason"]) for r in decoded.rejected)


@pytest.fixture()
def bad_shard(tmp_path) -> ShardInfo:
    huge = encode(np.zeros((1200, 1000), np.uint8), "PNG")  # 1.2 MP, a few KB: a small decompression bomb
    return write_tar(tmp_path / "bad.tar", [
        ("good.jpg", rgb_jpeg()), ("good.cls", b"1"),
        ("corrupt.jpg", b"\xff\xd8 this is not a jpeg"), ("corrupt.cls", b"0"),
        ("truncated.jpg", rgb_jpeg(1)[:300]), ("truncated.cls", b"0"),
        ("notes.txt", b"hello"), ("notes.cls", b"0"),
        ("../escape.jpg", rgb_jpeg(2)), ("../escape.cls", b"0"),
        ("/abs/olute.jpg", rgb_jpeg(3)), ("/abs/olute.cls", b"0"),
        ("link.jpg", b"", tarfile.SYMTYPE, "/etc/passwd"),
        ("nolabel.jpg", rgb_jpeg(4)),
        ("badlabel.jpg", rgb_jpeg(5)), ("badlabel.cls", b"cat"),
        ("tiny.png", encode(np.zeros((4, 4, 3), np.uint8), "PNG")), ("tiny.cls", b"0"),
        ("huge.png", huge), ("huge.cls", b"0"),
        ("good.json", b"{}"),  # the key 'good' again, not contiguous
    ])


def test_bad_members_are_rejected_with_shard_key_and_reason(bad_shard):
    decoded = decode_shard(bad_shard, image_size=SIZE, limits=LIMITS)

    assert decoded.keys == ["good"] and decoded.labels == [1]
    assert decoded.images.shape == (1, SIZE, SIZE, 3) and decoded.images.dtype == np.uint8
    assert reasons(decoded) == Counter({
        "not an image": 1, "corrupt or truncated image": 1, "no image member": 1, "unsafe path": 4,
        "not a regular file": 1, "missing label": 1, "invalid label": 1, "image too small": 1, "image too large": 1,
        "duplicate key": 1,
    })
    assert {r["shard"] for r in decoded.rejected} == {bad_shard.url}
    by_key = {r["key"]: r["reason"] for r in decoded.rejected}
    assert by_key["corrupt"] == "not an image (unrecognised data)"
    assert by_key["link.jpg"] == "not a regular file (symlink)"
    assert by_key["nolabel"].startswith("missing label")
    assert by_key["good"].startswith("duplicate key")


def one_bit_png(width: int, height: int) -> bytes:
    """A real black 1-bit PNG of any size, written row by row: 20000x20000 is ~50 KB and never in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte "none", then the packed bits
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [20000, 9500])  # above PIL's own error (178 M) and warning (89 M) limits
def test_a_decompression_bomb_is_rejected_by_the_tools_limit_with_its_reason(tmp_path, side):
    bomb = one_bit_png(side, side)
    assert len(bomb) < 200_000
    shard = write_tar(tmp_path / "bomb.tar", [("bomb.png", bomb), ("bomb.cls", b"0"),
                                              ("after.jpg", rgb_jpeg()), ("after.cls", b"3")])

    decoded = decode_shard(shard, image_size=SIZE, limits=DecodeLimits())  # the tool's default: 64 M pixels

    assert decoded.rejected == [{"shard": shard.url, "key": "bomb",
                                 "reason": f"image too large: {side}x{side} pixels (limit 64000000)"}]
    assert decoded.keys == ["after"] and decoded.labels == [3]
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's own limit is back in force for everything else


def test_label_out_of_range_is_rejected_when_the_class_count_is_known(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [("a.jpg", rgb_jpeg()), ("a.cls", b"7")])
    decoded = decode_shard(shard, image_size=SIZE, limits=LIMITS, num_classes=5)
    assert decoded.keys == [] and decoded.rejected[0]["reason"] == "label 7 out of range [0, 5)"


def test_truncated_tar_keeps_complete_samples_and_names_the_shard(tmp_path):
    members = [m for i in range(3) for m in ((f"s{i}.jpg", rgb_jpeg(i, (60, 60))), (f"s{i}.cls", b"0"))]
    full = write_tar(tmp_path / "full.tar", members)
    with tarfile.open(full.url) as tar:
        s2 = tar.getmember("s2.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes((tmp_path / "full.tar").read_bytes()[: s2.offset_data + s2.size // 2])

    decoded = decode_shard(ShardInfo(str(cut), cut.name, cut.stat().st_size), image_size=SIZE, limits=LIMITS)

    assert decoded.keys == ["s0", "s1"]
    assert reasons(decoded) == Counter({"truncated tar": 1})
    assert decoded.rejected[0]["shard"] == str(cut) and decoded.rejected[0]["key"] == "s2"


def test_a_file_that_is_not_a_tar_is_reported_by_name(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"\x00\x01 not a tar at all" * 10)
    decoded = decode_shard(ShardInfo(str(path), path.name, path.stat().st_size), image_size=SIZE, limits=LIMITS)
    assert decoded.keys == []
    assert [(r["shard"], r["reason"].split(":")[0]) for r in decoded.rejected] == [
        (str(path), "not a readable tar archive")]


def test_grayscale_becomes_equal_rgb_channels():
    gray = np.tile(np.arange(0, 240, 6, dtype=np.uint8), (40, 1))
    out = decode_image(encode(gray, "PNG"), 40, LIMITS)
    assert out.shape == (40, 40, 3)
    np.testing.assert_array_equal(out[..., 0], gray)
    np.testing.assert_array_equal(out[..., 1], out[..., 0])
    np.testing.assert_array_equal(out[..., 2], out[..., 0])


def test_16_bit_grayscale_is_scaled_not_clipped():
    values = np.full((32, 32), 257 * 100, np.uint16)  # 100/255 of full scale
    data = encode(values, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit file
    out = decode_image(data, 32, LIMITS)
    np.testing.assert_array_equal(out, np.full((32, 32, 3), 100, np.uint8))


def test_transparent_pixels_become_white_and_opaque_pixels_keep_their_colour():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, 16:] = (10, 20, 30, 255)
    out = decode_image(encode(rgba, "PNG"), 32, LIMITS)
    np.testing.assert_array_equal(out[:, :14], 255)
    np.testing.assert_array_equal(out[:, 18:], np.broadcast_to([10, 20, 30], (32, 14, 3)))


def test_cmyk_jpeg_converts_like_pillow():
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    buffer = io.BytesIO()
    cmyk.save(buffer, format="JPEG", quality=100)
    out = decode_image(buffer.getvalue(), 32, LIMITS)
    assert out.shape == (32, 32, 3)
    red, green, blue = out[..., 0].mean(), out[..., 1].mean(), out[..., 2].mean()
    assert red > 240 and green < 15 and blue < 15


def test_palette_image_is_converted():
    image = Image.new("P", (32, 32))
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    image.paste(1, (0, 0, 32, 32))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), 32, LIMITS), np.full((32, 32, 3), (200, 100, 50)))


def test_adm_center_crop_takes_the_middle_of_a_wide_image():
    third = 64
    wide = np.zeros((third, 3 * third, 3), np.uint8)
    wide[:, :third] = (255, 0, 0)
    wide[:, third:2 * third] = (0, 255, 0)
    wide[:, 2 * third:] = (0, 0, 255)
    crop = center_crop_arr(Image.fromarray(wide), 32)  # box-halved once, then cropped
    assert crop.shape == (32, 32, 3)
    np.testing.assert_array_equal(crop[:, 2:-2], np.broadcast_to([0, 255, 0], (32, 28, 3)))


@pytest.mark.parametrize("weights, message", [
    ("junk.safetensors", "is not a readable safetensors file (Error while deserializing header: header too large)"),
    ("junk.pt", "is neither a safetensors file nor a torch file"),
])
def test_encode_with_a_garbage_weights_file_is_one_line_naming_it(tmp_path, capsys, weights, message):
    from jobs.cli.app import main

    write_tar(tmp_path / "shard-000000.tar", [("a.jpg", rgb_jpeg()), ("a.cls", b"0")])
    (tmp_path / weights).write_bytes(b"garbage garbage garbage garbage")
    code = main(["encode", "--shards", str(tmp_path), "--store", str(tmp_path / "store"), "--encoder", "dinov2-s-reg4",
                 "--encoder-weights", str(tmp_path / weights), "--device", "cpu", "--no-progress"])
    err = without_ray_lines(capsys.readouterr().err)
    assert code == 2
    assert err.startswith(f"rae encode: error: weights file {tmp_path / weights} {message}")
    assert err.count("\n") == 1 and "Traceback" not in err


# ---------------------------------------------------------------- storage faults: one line naming the location

@pytest.fixture()
def encode_cli(tmp_path, monkeypatch, capsys):
    """``rae encode`` on one real shard with a small random encoder (no weights to fetch): returns a function
    taking the store location and giving (exit code, stderr)."""
    from jobs.cli.app import main
    from rae.encoders import load_encoder

    monkeypatch.setattr("pipelines.encode.load_encoder",
                        lambda *args, **kwargs: load_encoder("dinov2-s-reg4", random_init=True, input_size=28))
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "shard-000000.tar", [("a.jpg", rgb_jpeg()), ("a.cls", b"0")])

    def run(store: str) -> tuple[int, str]:
        code = main(["encode", "--shards", str(tmp_path / "shards"), "--store", store, "--device", "cpu",
                     "--no-progress"])
        return code, without_ray_lines(capsys.readouterr().err)

    return run


def assert_one_line(code: int, err: str, line: str) -> None:
    assert (code, err) == (2, f"rae encode: error: {line}\n")


def test_a_store_path_that_is_a_file(tmp_path, encode_cli):
    (tmp_path / "store").write_bytes(b"")
    assert_one_line(*encode_cli(str(tmp_path / "store")),
                    f"{tmp_path / 'store'} is a file where a folder is needed (to hold "
                    f"{tmp_path / 'store' / 'manifest.json'}): choose another location, or move the file away")


def test_a_store_path_under_a_file(tmp_path, encode_cli):
    (tmp_path / "file").write_bytes(b"")
    assert_one_line(*encode_cli(str(tmp_path / "file" / "store")),
                    f"{tmp_path / 'file'} is a file where a folder is needed (to hold "
                    f"{tmp_path / 'file' / 'store' / 'manifest.json'}): choose another location, or move the file "
                    f"away")


def test_a_store_path_on_a_virtual_file_system(encode_cli):
    assert_one_line(*encode_cli("/proc/rae-store"),
                    "cannot create /proc/rae-store: /proc is on a virtual file system (such as /proc or /sys) that "
                    "holds no files of its own; choose a folder on a disk")


@pytest.mark.parametrize("fault, line", [
    (errno.ENOSPC, "cannot write {path}: no space left on its device (or the disk quota is used up); free space or "
                   "choose another location, then rerun the same command: finished work is kept"),
    (errno.EROFS, "cannot write {path}: its file system is read-only; choose a writable location"),
])
def test_a_write_the_disk_refuses_names_the_file(tmp_path, encode_cli, monkeypatch, fault, line):
    """A full or read-only disk, injected where the bytes reach the disk: ``write()`` itself names no file."""
    def refuse(fd):
        raise OSError(fault, os.strerror(fault))

    monkeypatch.setattr("pipelines.storage.os.fsync", refuse)
    store = tmp_path / "store"
    assert_one_line(*encode_cli(str(store)), line.format(path=store / "manifest.json"))
    assert not [p.name for p in store.iterdir() if ".tmp-" in p.name]  # the refused write left nothing behind


def test_a_disk_full_inside_a_ray_task_is_found_behind_rays_wrappers():
    """Ray Data reports a UDF's failure as "UDF failed" around the worker's RayTaskError: the cause is named."""
    from ray.exceptions import RayTaskError

    from pipelines.storage_faults import describe_storage_fault

    disk_full = OSError(errno.ENOSPC, "No space left on device", "/data/store/parts/part-000003.parquet")
    try:
        try:
            raise RayTaskError("commit_shard_batch", "Traceback ...", disk_full).as_instanceof_cause()
        except Exception as worker_error:
            raise RuntimeError("UDF failed to process a data block") from worker_error
    except RuntimeError as error:
        wrapped = error
    assert describe_storage_fault(wrapped).startswith(
        "cannot write /data/store/parts/part-000003.parquet: no space left on its device")


@pytest.fixture()
def s3_cli(s3, monkeypatch, capsys):
    """``rae <args>`` against the loopback S3 server, in a fresh s3fs (its instances cache credentials)."""
    import s3fs

    from jobs.cli.app import main

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no credential lookup on a cloud metadata service

    def run(*args: str) -> tuple[int, str]:
        code = main(list(args))
        return code, without_ray_lines(capsys.readouterr().err)

    yield run
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_without_credentials_is_one_line_naming_the_url(s3_cli, monkeypatch, tmp_path):
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    assert s3_cli("store", "info", "s3://rae-test/store") == (
        2, "rae store: error: no S3 credentials for s3://rae-test/store (Unable to locate credentials): set "
           "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment of this command and of "
           "the cluster's nodes\n")


def test_s3_on_a_closed_endpoint_is_one_line_naming_the_endpoint(s3_cli, monkeypatch):
    from s3_server import free_port

    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries only make the test slower
    assert s3_cli("store", "info", "s3://rae-test/store") == (
        2, f"rae store: error: cannot reach the S3 endpoint {closed} for s3://rae-test/store: check AWS_ENDPOINT_URL "
           f"(unset means AWS itself) and that the endpoint is up and reachable from here\n")


def test_an_unreachable_bucket_is_not_reported_as_missing(s3_cli, monkeypatch):
    """s3fs's ``exists`` answers False for a bucket it cannot ask: that read as "no such file or folder"."""
    import botocore.exceptions

    from pipelines import storage
    from s3_server import free_port

    fs, bucket = storage.resolve("s3://rae-test")
    assert storage.exists(fs, bucket) and not storage.exists(fs, "rae-test/absent")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    fs, bucket = storage.resolve("s3://rae-test", {"skip_instance_cache": True})
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        storage.exists(fs, bucket)


def test_a_full_disk_leaves_the_old_file_and_the_write_succeeds_once_space_is_freed(tmp_path, monkeypatch):
    from pipelines import storage

    fs, root = storage.resolve(str(tmp_path))
    target = storage.join(root, "parts", "part-000000.parquet")
    storage.write_bytes(fs, target, b"old")
    with monkeypatch.context() as disk:
        disk.setattr("pipelines.storage.os.fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
        with pytest.raises(OSError) as raised:
            storage.write_bytes(fs, target, b"new")
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, target)
    assert os.listdir(tmp_path / "parts") == ["part-000000.parquet"] and (tmp_path / "parts" / "part-000000.parquet"
                                                                           ).read_bytes() == b"old"
    storage.write_bytes(fs, target, b"new")  # space freed: the same write completes
    assert (tmp_path / "parts" / "part-000000.parquet").read_bytes() == b"new"


def test_rae_debug_shows_the_storage_fault_itself(tmp_path, monkeypatch):
    from jobs.cli.app import main

    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "imgs" / "cat" / "a.png")
    (tmp_path / "dest").write_bytes(b"")
    monkeypatch.setenv("RAE_DEBUG", "1")
    with pytest.raises(FileExistsError):
        main(["shards", "make", str(tmp_path / "imgs"), str(tmp_path / "dest"), "--no-progress"])


def test_a_disk_full_inside_a_ray_data_udf_is_found_in_the_workers_traceback():
    """Ray Data raises "UDF failed to process a data block" *from* the UDF's error, and the chain is lost on
    the way to the driver: the fault is read from the worker's traceback text, as Ray formats it."""
    import traceback

    from ray.exceptions import RayTaskError, UserCodeException

    from pipelines.storage_faults import describe_storage_fault

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/store/parts/part-000003.parquet")
        except OSError as disk_full:
            raise UserCodeException("UDF failed to process a data block.") from disk_full
    except UserCodeException as udf_error:
        worker_traceback = traceback.format_exc()
        arrived = RayTaskError("MapBatches(commit_shard_batch)", worker_traceback, UserCodeException(str(udf_error)))
    assert describe_storage_fault(arrived.as_instanceof_cause()) == (
        "cannot write /data/store/parts/part-000003.parquet: no space left on its device (or the disk quota is used "
        "up); free space or choose another location, then rerun the same command: finished work is kept")


def test_shards_on_an_unreachable_endpoint_are_not_reported_as_missing(s3_cli, monkeypatch):
    """The shard listing asks the storage, so an endpoint that is down is named as such, not as missing shards."""
    import botocore.exceptions

    from pipelines.shards import ShardInfo, list_shards, read_class_names
    from s3_server import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        list_shards("s3://rae-test/shards", {"skip_instance_cache": True})
    # The class file beside the shards: an unanswered question is not "this store has no class names".
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        read_class_names([ShardInfo("s3://rae-test/shards/a.tar", "a.tar", 1)], {"skip_instance_cache": True})

