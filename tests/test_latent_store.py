"""The latent store format, without Ray or an encoder: a synthetic store written through the same
commit path as the encode job (write_shard per shard, then finalize)."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from builders import as_format_version_2, latent_manifest, synthetic_spec, write_latent_store
from ray_lines import without_ray_lines

from pipelines import latent_store
from pipelines.latent_store import StoreMismatchError, check_compatible, finalize, write_shard
from pipelines.store_check import store_info, verify_store
from pipelines.store_reader import open_store, read_latents
from rae.latent_spec import STATS_FILE, LatentSpec

N, C = 4, 8


def make_manifest(num_shards: int = 3, **spec_overrides) -> dict:
    spec = synthetic_spec(**{"input_size": 28, "patch_size": 14, "grid": 2, "channels": C, **spec_overrides})
    return latent_manifest(spec, parts=num_shards, class_names=["a", "b", "c"],
                           preprocessing={"crop": "adm-center-crop", "views": ["original"]}, software={"rae": "test"})


def synthetic_store(url: str, *, rows: int = 3, num_shards: int = 3, same_keys: bool = False) -> dict:
    """Write a store; returns the latents written, (rows*shards, N, C) float16, in shard order.

    ``same_keys``: every part's keys are then rewritten to ``k0, k1, ...`` (a store damaged after
    the encode: the encode itself keeps keys unique)."""
    rng = np.random.default_rng(0)
    z = np.concatenate([(rng.standard_normal((rows, 1, N, C)) * 3 + 1).astype(np.float16) for _ in range(num_shards)])
    keys = [f"s{index}/k{i}" for index in range(num_shards) for i in range(rows)]
    write_latent_store(url, make_manifest(num_shards), z, [i % 3 for _ in range(num_shards) for i in range(rows)], keys)
    if same_keys:
        for part in json.loads((Path(url) / "manifest.json").read_text())["parts"]:
            table = pq.read_table(Path(url) / part["path"])
            plain = pa.array([key.split("/")[1] for key in table.column("key").to_pylist()], pa.string())
            pq.write_table(table.set_column(0, "key", plain), Path(url) / part["path"])
    return {"latent": z[:, 0]}


def test_plain_pyarrow_reads_and_reshapes_latents_from_the_manifest_alone(tmp_path):
    written = synthetic_store(str(tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    tables = [pq.read_table(tmp_path / part["path"]) for part in manifest["parts"]]
    column = pa.concat_tables(tables).column(manifest["latent"]["column"]).combine_chunks()
    assert manifest["format_version"] == 3 and column.type == pa.binary(N * C * 2)
    spec = manifest["latent_spec"]
    values = np.frombuffer(column.buffers()[1], "<f2", len(column) * N * C, column.offset * N * C * 2)
    latents = values.reshape(-1, spec["grid"] ** 2, spec["channels"])
    np.testing.assert_array_equal(latents.view(np.uint16), written["latent"].view(np.uint16))


def test_a_store_of_format_version_2_still_reads_and_verifies_bit_exact(tmp_path):
    written = synthetic_store(str(tmp_path))
    as_format_version_2(str(tmp_path))
    table = pq.read_table(tmp_path / "parts" / "00000-shard-000000.parquet")
    assert table.schema.field("latent").type == pa.list_(pa.float16(), N * C)
    read = read_latents(str(tmp_path))["latent"]
    assert read.dtype == np.float16
    np.testing.assert_array_equal(read.view(np.uint16), written["latent"].view(np.uint16))
    report = verify_store(str(tmp_path))
    assert report.ok and report.rows == 9, report.problems


def test_verify_names_a_latent_column_of_the_other_format_version(tmp_path):
    synthetic_store(str(tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(dict(manifest, format_version=2)))
    problems = verify_store(str(tmp_path)).problems
    assert problems[0] == (f"parts/00000-shard-000000.parquet: latent column is fixed_size_binary[{N * C * 2}], "
                           f"manifest says fixed_size_list<item: halffloat>[{N * C}]")


def test_a_complete_store_of_format_version_2_serves_a_rerun_of_its_encode(tmp_path):
    synthetic_store(str(tmp_path))
    as_format_version_2(str(tmp_path))
    check_compatible(latent_store.read_manifest(str(tmp_path)), make_manifest(3), str(tmp_path))


def test_an_unfinished_store_of_format_version_2_is_not_continued_in_version_3(tmp_path):
    manifest = dict(make_manifest(3), format_version=2)
    with pytest.raises(StoreMismatchError) as err:
        check_compatible(manifest, make_manifest(3), "file:///data/store")
    assert str(err.value) == (
        "store file:///data/store is an unfinished encode in format version 2; this rae writes version 3 and will "
        "not mix the two in one store. Finish it with the rae that started it, or encode into a new --store URL")


def test_stats_are_exact_float64_moments_of_the_stored_rows(tmp_path):
    written = synthetic_store(str(tmp_path))["latent"].astype(np.float64)
    stats = open_store(str(tmp_path)).stats
    assert stats.count == 9
    np.testing.assert_allclose(stats.mean.numpy(), written.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.var.numpy(), written.var(0), rtol=1e-12, atol=1e-12)


def test_verify_passes_on_an_intact_store(tmp_path):
    synthetic_store(str(tmp_path))
    report = verify_store(str(tmp_path))
    assert report.ok and report.rows == 9


def test_verify_finds_duplicate_keys(tmp_path):
    synthetic_store(str(tmp_path), same_keys=True)
    problems = verify_store(str(tmp_path)).problems
    assert len(problems) == 2 and all("3 duplicate (key, view) rows" in p for p in problems)


def test_verify_finds_nan_latents(tmp_path):
    synthetic_store(str(tmp_path))
    part = tmp_path / "parts" / "00001-shard-000001.parquet"
    table = pq.read_table(part)
    z = latent_store.table_latents(table, (N, C)).copy()
    z[2, 1, 3] = np.nan
    pq.write_table(latent_store.latents_to_table(table.column("key").to_pylist(), table.column("label").to_pylist(),
                                                 table.column("view").to_pylist(), z), part)
    assert verify_store(str(tmp_path)).problems == ["parts/00001-shard-000001.parquet: 1 rows with NaN or inf latents"]


def test_verify_finds_a_row_count_that_disagrees_with_the_manifest(tmp_path):
    synthetic_store(str(tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["parts"][0]["rows"] = 4
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert verify_store(str(tmp_path)).problems == ["parts/00000-shard-000000.parquet: 3 rows, manifest says 4"]


def test_verify_finds_stats_inconsistent_with_the_data(tmp_path):
    synthetic_store(str(tmp_path))
    stats = open_store(str(tmp_path)).stats
    stats.var = stats.var * 1.01
    stats.save(tmp_path / STATS_FILE)
    problems = verify_store(str(tmp_path)).problems
    assert len(problems) == 1 and problems[0].startswith("stats.safetensors: stored var differs from the data's")


def test_non_finite_latents_are_rejected_when_written(tmp_path):
    manifest = make_manifest(1)
    z = np.ones((3, 1, N, C), np.float16)
    z[1, 0, 0, 0] = np.inf
    marker = write_shard(str(tmp_path), manifest, 0, keys=["a", "b", "c"], labels=[0, 1, 2], latents=z, rejected=[])
    assert marker["rows"] == 2
    assert marker["rejected"] == [{"shard": "file:///data/shard-000000.tar", "key": "b",
                                   "reason": "non-finite latent (NaN or inf)"}]


def test_a_mismatch_names_every_differing_field():
    with pytest.raises(StoreMismatchError) as err:
        check_compatible(make_manifest(3), make_manifest(4, weights_digest="def"), "s3://bucket/store")
    message = str(err.value)
    assert "latent_spec.weights_digest: store has 'abc', this run asks for 'def'" in message
    assert "shards: store has ['shard-000000.tar (1000 bytes)', 'shard-000001.tar (1001 bytes)', " \
           "'shard-000002.tar (1002 bytes)'], this run asks for" in message


def test_a_store_of_an_older_format_is_refused_with_what_to_do(tmp_path):
    synthetic_store(str(tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    old = {k: v for k, v in manifest.items() if k != "latent_spec"}
    old.update(format_version=1, encoder={"name": "synthetic"}, latent=dict(manifest["latent"], shape=[N, C]))
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    expected = r"has format version 1; this version of rae reads versions 2, 3 .*Re-encode the images with `rae encode`"
    with pytest.raises(StoreMismatchError, match=expected):
        open_store(str(tmp_path))
    with pytest.raises(StoreMismatchError, match=expected):
        check_compatible(old, make_manifest(3), str(tmp_path))


def test_the_manifest_holds_the_latent_spec_once_and_the_statistics_where_it_says(tmp_path):
    synthetic_store(str(tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert "encoder" not in manifest and set(manifest["latent"]) == {"column", "dtype", "layout"}
    spec = open_store(str(tmp_path)).latent_spec
    assert spec == LatentSpec.from_dict(manifest["latent_spec"]) and spec.shape == (N, C)
    assert (tmp_path / spec.stats).is_file() and spec.stats == STATS_FILE
    with pytest.raises(ValueError, match=f"a store keeps its statistics in {STATS_FILE}"):
        make_manifest(1, stats=None)


def test_an_unfinished_store_cannot_be_read_or_finalized(tmp_path):
    manifest = make_manifest(2)
    latent_store.write_manifest(str(tmp_path), manifest)
    write_shard(str(tmp_path), manifest, 0, keys=["a"], labels=[0], latents=np.ones((1, 1, N, C), np.float16),
                rejected=[])
    with pytest.raises(ValueError, match="is not complete"):
        open_store(str(tmp_path))
    with pytest.raises(RuntimeError, match=r"shards not encoded yet: \['shard-000001.tar'\]"):
        finalize(str(tmp_path), manifest)
    assert store_info(str(tmp_path))["shards_done"] == 1


def test_memory_storage_holds_a_store_for_this_process():
    written = synthetic_store("memory://latent-store-test")
    np.testing.assert_array_equal(read_latents("memory://latent-store-test")["latent"], written["latent"])
    normalized = read_latents("memory://latent-store-test", normalize=True)["latent"]
    stats = open_store("memory://latent-store-test").stats
    torch.testing.assert_close(torch.from_numpy(normalized),
                               stats.normalize(torch.from_numpy(written["latent"].astype(np.float32))))
    assert verify_store("memory://latent-store-test").ok


def test_a_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no latent store at .*nowhere"):
        open_store(str(tmp_path / "nowhere"))


def test_cli_store_info_and_verify(tmp_path, capsys):
    import argparse

    from jobs.cli.data import register

    parser = argparse.ArgumentParser(prog="rae")
    register(parser.add_subparsers(dest="command", required=True))
    synthetic_store(str(tmp_path))
    for argv in (("store", "info", str(tmp_path)), ("store", "verify", str(tmp_path))):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    out = capsys.readouterr().out
    assert '"rows": 9' in out and f"ok: {tmp_path} (9 rows)" in out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["rows"] = 10
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    args = parser.parse_args(("store", "verify", str(tmp_path)))
    assert args.func(args) == 1
    out = capsys.readouterr().out
    assert "problem: manifest.json: 9 rows in the parts, manifest says 10" in out
    assert out.splitlines()[-1] == f"2 problem(s) in {tmp_path} (9 rows read)"


def commit_shards(url: str, manifest: dict, shard_keys: list[list[str]], seed: int = 0) -> np.ndarray:
    """Commit one shard per list of keys (labels 0, 1, ...); returns every latent written, in order."""
    rng = np.random.default_rng(seed)
    latent_store.write_manifest(url, manifest)
    written = []
    for index, keys in enumerate(shard_keys):
        z = rng.standard_normal((len(keys), 1, N, C)).astype(np.float16)
        write_shard(url, manifest, index, keys=keys, labels=list(range(len(keys))), latents=z, rejected=[])
        written.append(z[:, 0])
    return np.concatenate(written)


def test_a_key_repeated_across_shards_is_stored_once_and_its_later_occurrences_rejected(tmp_path):
    manifest = make_manifest(3)
    z = commit_shards(str(tmp_path), manifest, [["a", "b"], ["b", "c"], ["a", "d"]])
    done = finalize(str(tmp_path), manifest)
    assert (done["rows"], done["images"], done["rejected"]) == (4, 4, 2)
    data = read_latents(str(tmp_path))
    assert sorted(data["key"]) == ["a", "b", "c", "d"]
    first = {"a": z[0], "b": z[1], "c": z[3], "d": z[5]}  # each key's first occurrence, in shard order
    for key, latent in zip(data["key"], data["latent"]):
        np.testing.assert_array_equal(latent, first[key])
    lines = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert lines == [
        {"shard": "file:///data/shard-000001.tar", "key": "b",
         "reason": "duplicate key: already stored from shard file:///data/shard-000000.tar"},
        {"shard": "file:///data/shard-000002.tar", "key": "a",
         "reason": "duplicate key: already stored from shard file:///data/shard-000000.tar"}]
    stats = open_store(str(tmp_path)).stats  # the statistics are the stored rows' alone
    kept = np.stack([first[k] for k in "abcd"]).astype(np.float64)
    np.testing.assert_allclose(stats.var.numpy(), kept.var(0), rtol=1e-12, atol=1e-12)
    assert stats.count == 4 and verify_store(str(tmp_path)).ok
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == [  # the replaced parts are gone
        "00000-shard-000000.parquet", "00001-shard-000001.unique.parquet", "00002-shard-000002.unique.parquet"]


def test_a_shard_whose_every_key_is_repeated_keeps_no_part(tmp_path):
    manifest = make_manifest(2)
    commit_shards(str(tmp_path), manifest, [["a", "b"], ["b", "a"]])
    done = finalize(str(tmp_path), manifest)
    assert (done["rows"], done["rejected"], len(done["parts"])) == (2, 2, 1) and verify_store(str(tmp_path)).ok


def test_a_finalize_killed_while_rejecting_repeats_gives_the_same_store_when_rerun(tmp_path, monkeypatch):
    """Shards committed by a killed run count too: keys are checked against every committed part at
    the end, and a finalize killed between a rewritten part and its marker rejects the same keys again."""
    manifest = make_manifest(3)
    reference = tmp_path / "reference"
    commit_shards(str(reference), manifest, [["a", "b"], ["b", "c"], ["c", "d"]])
    want = finalize(str(reference), manifest)

    store = tmp_path / "killed"
    commit_shards(str(store), manifest, [["a", "b"], ["b", "c"], ["c", "d"]])
    write_json = latent_store.storage.write_json

    def dies_on_the_second_marker(fs, path, obj):
        if path.endswith("_progress/00002-shard-000002.json"):
            raise OSError("killed")
        write_json(fs, path, obj)

    monkeypatch.setattr(latent_store.storage, "write_json", dies_on_the_second_marker)
    with pytest.raises(OSError, match="killed"):
        finalize(str(store), manifest)
    monkeypatch.setattr(latent_store.storage, "write_json", write_json)
    got = finalize(str(store), manifest)
    assert {k: got[k] for k in ("rows", "images", "rejected")} == {k: want[k] for k in ("rows", "images", "rejected")}
    assert (store / "rejected.jsonl").read_text() == (reference / "rejected.jsonl").read_text()
    assert finalize(str(store), manifest)["rejected"] == 2  # finalizing again rejects nothing more
    a, b = read_latents(str(store)), read_latents(str(reference))
    for column in ("key", "label", "latent"):
        np.testing.assert_array_equal(a[column], b[column])
    assert torch.equal(open_store(str(store)).stats.var, open_store(str(reference)).stats.var)


def test_the_manifest_records_the_range_of_the_labels_stored(tmp_path):
    spec = synthetic_spec(input_size=28, patch_size=14, grid=2, channels=C)
    manifest = latent_manifest(spec, parts=2, class_names=None)
    latent_store.write_manifest(str(tmp_path), manifest)
    z = np.ones((3, 1, N, C), np.float16)
    write_shard(str(tmp_path), manifest, 0, keys=["a", "b", "c"], labels=[7, 2, 7], latents=z, rejected=[])
    write_shard(str(tmp_path), manifest, 1, keys=["d", "a"], labels=[4, 9], latents=z[:2], rejected=[])
    done = finalize(str(tmp_path), manifest)
    assert done["num_classes"] is None and done["classes"] is None
    assert done["labels"] == {"min": 2, "max": 7, "distinct": 3}  # the repeated "a" (label 9) is not stored


def test_verify_reports_every_problem_each_with_its_file(tmp_path):
    """A truncated part, a part that is not Parquet, a missing part, damaged statistics and a short
    rejected list: every one reported, by file, and the readable parts still checked."""
    synthetic_store(str(tmp_path), num_shards=4, same_keys=False)
    parts = tmp_path / "parts"
    whole = (parts / "00000-shard-000000.parquet").read_bytes()
    (parts / "00000-shard-000000.parquet").write_bytes(whole[: len(whole) // 2])
    (parts / "00001-shard-000001.parquet").write_bytes(b"not parquet at all")
    (parts / "00002-shard-000002.parquet").unlink()
    (tmp_path / STATS_FILE).write_bytes(b"\0" * 10)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["rejected"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    report = verify_store(str(tmp_path))
    assert report.rows == 3  # the intact part was read
    files = [problem.split(": ", 1)[0] for problem in report.problems]
    assert files == ["parts/00000-shard-000000.parquet", "parts/00001-shard-000001.parquet",
                     "parts/00002-shard-000002.parquet", "rejected.jsonl", STATS_FILE], report.problems
    assert "not a readable Parquet file (truncated or damaged)" in report.problems[0]
    assert "<Buffer>" not in report.problems[0] and report.problems[2].endswith(": missing")
    assert report.problems[3] == "rejected.jsonl: 0 entries, manifest says 1"


def test_a_damaged_manifest_is_named_as_such(tmp_path, capsys, monkeypatch):
    from jobs.cli.app import main

    synthetic_store(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"format": "rae-latent-store", "rows": ')
    with pytest.raises(ValueError, match=r"manifest.json is not valid JSON \(.*\): the store's manifest is damaged"):
        verify_store(str(tmp_path))
    monkeypatch.delenv("RAE_DEBUG", raising=False)
    assert main(["store", "verify", str(tmp_path)]) != 0
    err = without_ray_lines(capsys.readouterr().err).strip()
    assert err.startswith(f"rae store: error: file://{tmp_path}/manifest.json is not valid JSON") and "\n" not in err
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"manifest.json holds a JSON list, not an object: the store's manifest"):
        open_store(str(tmp_path))


def test_a_store_whose_encode_has_not_finished_is_reported_not_verified(tmp_path):
    manifest = make_manifest(2)
    latent_store.write_manifest(str(tmp_path), manifest)
    assert verify_store(str(tmp_path)).problems == [
        "manifest.json: the encode has not finished (status 'in_progress'); rerun `rae encode` with the same arguments"]


def test_a_shard_killed_between_its_data_and_its_marker_is_committed_again_once(tmp_path, monkeypatch):
    manifest = make_manifest(2)
    url = str(tmp_path)
    latent_store.write_manifest(url, manifest)
    z = np.arange(4 * N * C, dtype=np.float16).reshape(4, 1, N, C)
    write_shard(url, manifest, 0, keys=["a", "b"], labels=[0, 1], latents=z[:2], rejected=[])
    write_json = latent_store.storage.write_json

    def killed_before_the_marker(fs, path, obj):
        if path.endswith(f"{latent_store.PROGRESS_DIR}/00001-shard-000001.json"):
            raise KeyboardInterrupt
        write_json(fs, path, obj)

    monkeypatch.setattr(latent_store.storage, "write_json", killed_before_the_marker)
    with pytest.raises(KeyboardInterrupt):
        write_shard(url, manifest, 1, keys=["c", "d"], labels=[2, 0], latents=z[2:], rejected=[])
    monkeypatch.setattr(latent_store.storage, "write_json", write_json)
    assert (tmp_path / "parts" / "00001-shard-000001.parquet").exists()  # its data is there, but
    assert sorted(latent_store.done_markers(url, manifest)) == [0]  # the shard is not done: the rerun redoes it
    write_shard(url, manifest, 1, keys=["c", "d"], labels=[2, 0], latents=z[2:], rejected=[])
    done = finalize(url, manifest)
    assert (done["rows"], done["rejected"]) == (4, 0) and verify_store(url).ok
    assert sorted(read_latents(url)["key"]) == ["a", "b", "c", "d"]


@pytest.mark.parametrize("failing", ["part", "moments"])
def test_a_shard_whose_data_was_not_all_written_has_no_marker(tmp_path, monkeypatch, failing):
    """The marker is written last: a commit that dies writing the part or the moments leaves the
    shard not done (were the marker written first, the rerun would skip a shard with no data)."""
    manifest = make_manifest(1)
    latent_store.write_manifest(str(tmp_path), manifest)
    if failing == "part":
        monkeypatch.setattr(latent_store.pq, "write_table", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("disk full")))
    else:
        write_bytes = latent_store.storage.write_bytes
        monkeypatch.setattr(latent_store.storage, "write_bytes", lambda fs, path, data: (
            (_ for _ in ()).throw(OSError("disk full")) if path.endswith(".moments.npz") else write_bytes(fs, path, data)))
    with pytest.raises(OSError, match="disk full"):
        write_shard(str(tmp_path), manifest, 0, keys=["a"], labels=[0], latents=np.ones((1, 1, N, C), np.float16),
                    rejected=[])
    assert latent_store.done_markers(str(tmp_path), manifest) == {}
    assert not (tmp_path / latent_store.PROGRESS_DIR / "00000-shard-000000.json").exists()


def test_remove_temporaries_clears_only_what_killed_writers_left(tmp_path):
    synthetic_store(str(tmp_path))
    left = [tmp_path / "parts" / "00000-shard-000000.parquet.tmp-1a2b", tmp_path / "_progress" / "x.json.tmp-3c4d"]
    for path in left:
        path.write_bytes(b"half")
    before = sorted(p for p in tmp_path.rglob("*") if p not in left)
    assert sorted(latent_store.remove_temporaries(str(tmp_path))) == sorted(str(p) for p in left)
    assert sorted(tmp_path.rglob("*")) == before and verify_store(str(tmp_path)).ok
