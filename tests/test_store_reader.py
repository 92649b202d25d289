"""The training reader ships latents as stored: float16 tensors that are the part files' bytes, made
from Arrow without a copy; the step normalizes them on its device (the same numbers as
``LatentStats.normalize``); the part order is reshuffled each epoch, the same way on every run."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from builders import CHANNELS, TOKENS, as_format_version_2, class_latent_store, latent_manifest, synthetic_spec, tiny_dit_config, \
    write_latent_store

from jobs.train.dit import DiTTask, store_facts
from jobs.train.loop import RunContext
from jobs.train.parallelize import plan_batches
from pipelines import latent_store, storage
from pipelines.store_reader import iter_part_tables, latent_batch, latent_collate_fn, latent_dataset, open_store

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return class_latent_store(f"file://{tmp_path_factory.mktemp('reader')}/store", rows=48)


def stored_rows(url: str) -> dict[str, np.ndarray]:
    """label -> the latent bytes of each row, straight from the part files (plain pyarrow)."""
    opened = open_store(url)
    tables = [table for _, table in iter_part_tables(opened, columns=["label", latent_store.LATENT_COLUMN])]
    table = pa.concat_tables(tables)
    latents = latent_store.table_latents(table, opened.latent_shape)
    return {"label": table.column("label").to_numpy(), "latent": latents.reshape(len(table), -1).view(np.uint16)}


@pytest.fixture(scope="module")
def store_v2(tmp_path_factory) -> str:
    """The same rows in a store of format version 2 (the latent a fixed_size_list of float16)."""
    return as_format_version_2(class_latent_store(f"file://{tmp_path_factory.mktemp('reader_v2')}/store", rows=48))


@pytest.mark.parametrize("store_fixture", ["store", "store_v2"])
def test_training_batches_are_the_stored_float16_bytes_and_int64_labels(store_fixture, request):
    store = request.getfixturevalue(store_fixture)
    shape = open_store(store).latent_shape
    batches = list(latent_dataset(store, normalize=False, shuffle_files=False).iter_torch_batches(
        batch_size=16, collate_fn=latent_collate_fn(shape)))
    latents = torch.cat([b["latent"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert latents.dtype == torch.float16 and labels.dtype == torch.int64
    assert latents.shape == (48, TOKENS, CHANNELS)
    want = stored_rows(store)
    got = latents.view(torch.int16).reshape(48, -1).numpy().view(np.uint16)
    # the same rows, bit for bit (Ray may hand the blocks over in another order)
    order, want_order = np.lexsort(got.T[:8]), np.lexsort(want["latent"].T[:8])
    np.testing.assert_array_equal(got[order], want["latent"][want_order])
    np.testing.assert_array_equal(labels.numpy()[order], want["label"][want_order])


def test_a_batch_is_a_view_of_the_arrow_buffers_when_it_is_one_chunk(tmp_path):
    url = class_latent_store(f"file://{tmp_path}/store", rows=8)
    fs, path = storage.resolve(open_store(url).parts[0])
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle, columns=["label", latent_store.LATENT_COLUMN]).slice(1, 2)
    batch = latent_batch(table, (TOKENS, CHANNELS))
    column = table.column(latent_store.LATENT_COLUMN).chunk(0)
    width = TOKENS * CHANNELS * 2
    assert column.type == pa.binary(width)
    assert batch["latent"].data_ptr() == column.buffers()[1].address + column.offset * width
    assert batch["latent"].shape == (2, TOKENS, CHANNELS) and batch["label"].dtype == torch.int64
    two_chunks = pa.concat_tables([table.slice(0, 1), table.slice(1, 1)])
    assert torch.equal(latent_batch(two_chunks, (TOKENS, CHANNELS))["latent"], batch["latent"])


def test_a_batch_of_a_format_version_2_store_is_its_stored_values(tmp_path):
    url = as_format_version_2(class_latent_store(f"file://{tmp_path}/store", rows=8))
    fs, path = storage.resolve(open_store(url).parts[0])
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle, columns=["label", latent_store.LATENT_COLUMN]).slice(1, 2)
    values = table.column(latent_store.LATENT_COLUMN).chunk(0).flatten()
    batch = latent_batch(table, (TOKENS, CHANNELS))
    assert batch["latent"].data_ptr() == values.buffers()[1].address + values.offset * 2
    np.testing.assert_array_equal(batch["latent"].numpy().reshape(-1).view(np.uint16),
                                  values.to_numpy().view(np.uint16))


def test_the_views_kept_are_shipped_as_stored(tmp_path):
    manifest = latent_manifest(synthetic_spec(input_size=2, patch_size=1, grid=2, channels=3), parts=2,
                               preprocessing={"views": ["original", "flip"]})
    latents = np.arange(6 * 2 * 4 * 3, dtype=np.float16).reshape(6, 2, 4, 3)
    write_latent_store(str(tmp_path), manifest, latents, [0, 1, 2, 3, 4, 5])
    batches = list(latent_dataset(str(tmp_path), normalize=False, views=(0,), shuffle_files=False)
                   .iter_torch_batches(batch_size=6, collate_fn=latent_collate_fn((4, 3))))
    latent = torch.cat([b["latent"] for b in batches])
    label = torch.cat([b["label"] for b in batches])
    assert latent.dtype == torch.float16
    assert torch.equal(latent[label.argsort()], torch.from_numpy(latents[:, 0]))


def test_part_order_differs_per_epoch_and_is_the_same_on_every_run(tmp_path):
    manifest = latent_manifest(synthetic_spec(input_size=2, patch_size=1, grid=2, channels=3), parts=8,
                               preprocessing={"views": ["original"]})
    shard_of_row = np.repeat(np.arange(8), 2)
    latents = np.broadcast_to(shard_of_row[:, None, None, None], (16, 1, 4, 3)).astype(np.float16)
    write_latent_store(str(tmp_path), manifest, latents, shard_of_row)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    try:
        runs = []
        for _ in range(2):  # two runs: a fresh dataset each, the same seed
            ds = latent_dataset(str(tmp_path), normalize=False, shuffle_seed=3)
            runs.append([[int(row["label"]) for row in ds.iter_rows()] for _ in range(2)])
    finally:
        context.execution_options.preserve_order = False
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1] and sorted(runs[0][0]) == sorted(runs[0][1])


def test_the_dit_step_normalizes_the_stored_float16_on_its_device(store, monkeypatch):
    opened = open_store(store)
    config = tiny_dit_config(store)
    task = DiTTask(config, store_facts(opened.manifest, config, store), opened.stats)
    task.setup(RunContext(rank=0, world=1, device=torch.device("cpu"), plan=plan_batches(16, 1, 8),
                          steps_per_epoch=3))
    seen = []
    monkeypatch.setattr("jobs.train.dit.training_loss", lambda model, x, y, config: seen.append(x) or x.sum((1, 2)))
    z = torch.from_numpy(stored_rows(store)["latent"][:8].view(np.float16).reshape(8, TOKENS, CHANNELS).copy())
    task.per_sample_loss(task.model, {"latent": z, "label": torch.zeros(8, dtype=torch.int64)})
    assert seen[0].dtype == torch.float32
    torch.testing.assert_close(seen[0], opened.stats.normalize(z), rtol=0, atol=0)
