"""Webdataset shards: made from an image folder at any fsspec URL, listed, and extracted back."""
import io
import json
import tarfile

import fsspec
import numpy as np
import pytest
from builders import write_image_folder
from PIL import Image
from s3_server import s3_server

from pipelines.shards import extract_shards, iter_tar_samples, list_shards, make_shards

CLASSES = ("n01", "n02")


@pytest.fixture()
def image_folder(tmp_path):
    """2 classes x 3 images (PNG and JPEG, one with a dotted name) and one file that is not an image."""
    rng = np.random.default_rng(0)
    root = write_image_folder(tmp_path / "src", {
        c: {f"{c}_{i}.v2.jpg" if i == 2 else f"{c}_{i}.png": rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            for i in range(3)} for c in CLASSES})
    (root / "n01" / "notes.txt").write_text("not an image")
    return root


def read_samples(url: str) -> dict[str, dict[str, bytes]]:
    samples = {}
    for shard in list_shards(url):
        with fsspec.open(shard.url, "rb") as handle:
            for item in iter_tar_samples(handle):
                samples[item.key] = item.members
    return samples


def test_make_packs_every_image_with_its_label_and_writes_the_class_index(image_folder, tmp_path):
    report = make_shards(str(image_folder), str(tmp_path / "shards"), max_count=4, progress=False)

    assert len(report.shards) == 2 and report.images == 6
    assert report.skipped == [f"file://{image_folder}/n01/notes.txt"]
    samples = read_samples(str(tmp_path / "shards"))
    assert sorted(samples) == ["n01/n01_0", "n01/n01_1", "n01/n01_2_v2", "n02/n02_0", "n02/n02_1", "n02/n02_2_v2"]
    for key, members in samples.items():
        cls = key.split("/")[0]
        ext = "jpg" if key.endswith("_v2") else "png"
        assert members["cls"] == str(CLASSES.index(cls)).encode()
        source = image_folder / cls / (key.split("/")[1].replace("_v2", ".v2") + "." + ext)
        assert members[ext] == source.read_bytes()
    index = json.loads((tmp_path / "shards" / "classes.json").read_text())
    assert index["classes"] == list(CLASSES)


def test_shards_are_byte_identical_across_runs(image_folder, tmp_path):
    make_shards(str(image_folder), str(tmp_path / "a"), max_count=4, progress=False)
    make_shards(str(image_folder), str(tmp_path / "b"), max_count=4, progress=False)
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_seeded_shuffle_mixes_classes_across_shards(image_folder, tmp_path):
    make_shards(str(image_folder), str(tmp_path / "s"), max_count=3, progress=False)
    make_shards(str(image_folder), str(tmp_path / "o"), max_count=3, shuffle_seed=None, progress=False)
    ordered = [sorted({k.split("/")[0] for k in read_samples(str(tmp_path / "o" / f"shard-00000{i}.tar"))})
               for i in range(2)]
    shuffled = [sorted({k.split("/")[0] for k in read_samples(str(tmp_path / "s" / f"shard-00000{i}.tar"))})
                for i in range(2)]
    assert ordered == [["n01"], ["n02"]]
    assert shuffled != ordered


def test_extract_reverses_make_through_memory_storage(image_folder, tmp_path):
    make_shards(str(image_folder), "memory://shards-roundtrip", max_count=4, progress=False)
    report = extract_shards("memory://shards-roundtrip", str(tmp_path / "out"), progress=False)

    assert report.images == 6 and report.rejected == []
    for c in CLASSES:
        got = {p.name: p.read_bytes() for p in (tmp_path / "out" / c).iterdir()}
        want = {p.name.replace(".v2", "_v2"): p.read_bytes()
                for p in (image_folder / c).iterdir() if p.suffix != ".txt"}
        assert got == want


def test_make_and_extract_on_s3(image_folder, tmp_path):
    with s3_server():
        report = make_shards(str(image_folder), "s3://rae-test/shards", max_count=4, progress=False)
        assert report.shards == ["s3://rae-test/shards/shard-000000.tar", "s3://rae-test/shards/shard-000001.tar"]
        assert [s.name for s in list_shards("s3://rae-test/shards")] == ["shard-000000.tar", "shard-000001.tar"]
        assert extract_shards("s3://rae-test/shards", str(tmp_path / "out"), progress=False).images == 6
    assert sorted(p.name for p in (tmp_path / "out" / "n02").iterdir()) == ["n02_0.png", "n02_1.png", "n02_2_v2.jpg"]


def test_list_shards_accepts_folders_globs_and_brace_patterns(image_folder, tmp_path):
    make_shards(str(image_folder), str(tmp_path / "sh"), max_count=2, progress=False)
    names = ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s.name for s in list_shards(str(tmp_path / "sh"))] == names
    assert [s.name for s in list_shards(f"{tmp_path}/sh/*.tar")] == names
    assert [s.name for s in list_shards(f"{tmp_path}/sh/shard-{{000001..000002}}.tar")] == names[1:]
    assert all(s.size == (tmp_path / "sh" / s.name).stat().st_size for s in list_shards(str(tmp_path / "sh")))
    with pytest.raises(FileNotFoundError, match="shard-000009.tar"):
        list_shards(f"{tmp_path}/sh/shard-000009.tar")


def test_make_refuses_a_destination_that_already_holds_shards(image_folder, tmp_path):
    make_shards(str(image_folder), str(tmp_path / "sh"), progress=False)
    with pytest.raises(FileExistsError, match="already holds shards"):
        make_shards(str(image_folder), str(tmp_path / "sh"), progress=False)


def test_make_needs_class_subfolders(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no class subfolders"):
        make_shards(str(tmp_path / "flat"), str(tmp_path / "out"), progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_shards(str(tmp_path / "missing"), str(tmp_path / "out"), progress=False)


def test_extract_skips_and_reports_unsafe_members(tmp_path):
    (tmp_path / "sh").mkdir()
    with tarfile.open(tmp_path / "sh" / "evil.tar", "w") as tar:
        for name, data in (("../../evil.png", b"x"), ("ok.png", _png()), ("ok.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report = extract_shards(str(tmp_path / "sh"), str(tmp_path / "out"), progress=False)
    assert report.images == 1 and (tmp_path / "out" / "0" / "ok.png").exists()
    assert [r["key"] for r in report.rejected] == ["../../evil.png"]
    assert not (tmp_path.parent / "evil.png").exists()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


def run_cli(*argv: str) -> int:
    import argparse

    from jobs.cli.data import register

    parser = argparse.ArgumentParser(prog="rae")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_makes_and_extracts_shards(image_folder, tmp_path, capsys):
    assert run_cli("shards", "make", str(image_folder), str(tmp_path / "sh"), "--max-count", "5", "--no-progress") == 0
    assert "6 images in 2 classes -> 2 shards" in capsys.readouterr().out
    assert run_cli("shards", "extract", str(tmp_path / "sh"), str(tmp_path / "out"), "--no-progress") == 0
    assert sorted(p.name for p in (tmp_path / "out" / "n01").iterdir()) == ["n01_0.png", "n01_1.png", "n01_2_v2.jpg"]
