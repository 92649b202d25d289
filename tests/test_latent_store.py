"""The latent store format, without Ray or an encoder: a synthetic store written through the same
commit path as the encode job (write_shard per shard, then finalize)."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from builders import latent_manifest, synthetic_spec, write_latent_store

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
    """Write a store; returns the latents written, (rows*shards, N, C) float16, in shard order."""
    rng = np.random.default_rng(0)
    z = np.concatenate([(rng.standard_normal((rows, 1, N, C)) * 3 + 1).astype(np.float16) for _ in range(num_shards)])
    keys = [f"k{i}" if same_keys else f"s{index}/k{i}" for index in range(num_shards) for i in range(rows)]
    write_latent_store(url, make_manifest(num_shards), z, [i % 3 for _ in range(num_shards) for i in range(rows)], keys)
    return {"latent": z[:, 0]}


def test_plain_pyarrow_reads_and_reshapes_latents_from_the_manifest_alone(tmp_path):
    written = synthetic_store(str(tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    tables = [pq.read_table(tmp_path / part["path"]) for part in manifest["parts"]]
    column = pa.concat_tables(tables).column(manifest["latent"]["column"]).combine_chunks()
    assert column.type == pa.list_(pa.float16(), N * C)
    spec = manifest["latent_spec"]
    latents = column.flatten().to_numpy().reshape(-1, spec["grid"] ** 2, spec["channels"])
    np.testing.assert_array_equal(latents, written["latent"])


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
    assert len(problems) == 1 and problems[0].startswith("stats: stored var differs from the data's")


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
    expected = r"has format version 1; this version of rae reads version 2 .*Re-encode the images with `rae encode`"
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
    assert "problem: 9 rows in the parts, manifest says 10" in capsys.readouterr().out
