"""A training rank's batches read with pyarrow straight from the store (no Ray Data): every row of an
epoch in exactly one rank's share, the stored float16 bytes with their labels, the same batches for
the same (seed, epoch, rank, world) and another order the next epoch, the stored order within a share
when there is no shuffle buffer, the views kept, stores of format version 2 and on S3, and the
training loop's resume contract."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from builders import as_format_version_2, class_latent_store, latent_manifest, synthetic_spec, tiny_dit_config, \
    write_latent_store

from jobs.train.loop import RunContext, step_batches
from jobs.train.parallelize import plan_batches
from pipelines import latent_store
from pipelines.store_batches import RowGroup, StoreBatches, epoch_share, store_rows
from pipelines.store_reader import open_store, read_latents

SHAPE = (4, 3)  # 2x2 tokens of 3 channels
ROWS_PER_GROUP = 3


def numbered_store(url: str, *, images: int, parts: int, views: int = 1, rows_per_group: int | None = None,
                   monkeypatch: pytest.MonkeyPatch | None = None) -> str:
    """A store of random float16 latents (each row's bytes unique), label = the image's index."""
    if rows_per_group is not None:
        monkeypatch.setattr(latent_store, "TARGET_ROW_GROUP_BYTES", rows_per_group * SHAPE[0] * SHAPE[1] * 2)
    names = ["original", "flip"][:views]
    manifest = latent_manifest(synthetic_spec(input_size=2, patch_size=1, grid=2, channels=3), parts=parts,
                               preprocessing={"views": names})
    latents = np.random.default_rng(7).standard_normal((images, views, *SHAPE)).astype(np.float16)
    return write_latent_store(url, manifest, latents, list(range(images)))


@pytest.fixture
def grouped_store(tmp_path, monkeypatch) -> str:
    """20 rows in 3 parts (7, 7, 6 rows) of row groups of 3 rows: 8 row groups."""
    return numbered_store(str(tmp_path / "store"), images=20, parts=3, rows_per_group=ROWS_PER_GROUP,
                          monkeypatch=monkeypatch)


def stored(url: str) -> dict[bytes, tuple[int, int]]:
    """Each stored row's latent bytes -> (label, view)."""
    data = read_latents(url)
    return {row.tobytes(): (int(label), int(view))
            for row, label, view in zip(data["latent"], data["label"], data["view"], strict=True)}


def rows_of(batches) -> list[tuple[bytes, int]]:
    out = []
    for batch in batches:
        assert batch["latent"].dtype == torch.float16 and batch["label"].dtype == torch.int64
        out += [(z.numpy().tobytes(), int(y)) for z, y in zip(batch["latent"], batch["label"], strict=True)]
    return out


def source(url: str, *, rank: int = 0, world: int = 1, seed: int = 0, shuffle_buffer: int = 0,
           views: tuple[int, ...] | None = None) -> StoreBatches:
    return StoreBatches(store_rows(open_store(url), views), rank=rank, world=world, seed=seed,
                        shuffle_buffer=shuffle_buffer)


def test_the_store_is_read_as_its_row_groups(grouped_store):
    rows = store_rows(open_store(grouped_store))
    assert [g.rows for g in rows.groups] == [3, 3, 1, 3, 3, 1, 3, 3] and rows.num_rows == 20
    assert rows.shape == SHAPE


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("shuffle_buffer", [0, 5])
def test_every_row_of_an_epoch_is_in_exactly_one_ranks_share_as_stored(grouped_store, world, shuffle_buffer):
    want = stored(grouped_store)
    shares = [rows_of(source(grouped_store, rank=r, world=world, shuffle_buffer=shuffle_buffer)(epoch=1, micro=1))
              for r in range(world)]
    assert sorted(len(share) for share in shares) == sorted(20 // world + (r < 20 % world) for r in range(world))
    seen = [row for share in shares for row in share]
    assert len(seen) == len(want) and {z for z, _ in seen} == set(want)  # each row once, its bytes as stored
    assert all(want[z][0] == label for z, label in seen)  # with its own label


@pytest.mark.parametrize("shuffle_buffer", [0, 4])
def test_a_share_is_cut_in_batches_of_exactly_micro_rows_and_its_tail_is_left_out(grouped_store, shuffle_buffer):
    """20 rows over 3 ranks: shares of 6, 7, 7 rows; batches of 3 rows leave the last row of the two
    7-row shares out (which row: the shuffle buffer's draw, another each epoch)."""
    shares = [list(source(grouped_store, rank=r, world=3, shuffle_buffer=shuffle_buffer)(epoch=0, micro=3))
              for r in range(3)]
    assert [len(batches) for batches in shares] == [2, 2, 2]
    assert all(len(batch["label"]) == 3 for batches in shares for batch in batches)
    seen = [z for batches in shares for z, _ in rows_of(batches)]
    assert len(seen) == len(set(seen)) == 18
    if shuffle_buffer == 0:  # no shuffle: what is left out is each share's last row
        full = [rows_of(source(grouped_store, rank=r, world=3)(epoch=0, micro=1)) for r in range(3)]
        assert set(stored(grouped_store)) - set(seen) == {full[1][-1][0], full[2][-1][0]}


@pytest.mark.parametrize("shuffle_buffer", [0, 5])
def test_the_same_seed_epoch_and_rank_give_the_same_batches_and_another_epoch_another_order(grouped_store,
                                                                                           shuffle_buffer):
    def read(epoch: int, seed: int = 0) -> list[tuple[bytes, int]]:  # a fresh reader each time, as a new worker
        return rows_of(source(grouped_store, rank=1, world=2, seed=seed, shuffle_buffer=shuffle_buffer)(epoch, 2))

    assert read(0) == read(0) and read(3) == read(3)
    assert read(0) != read(1)
    assert read(0) != read(0, seed=1)
    whole = [rows_of(source(grouped_store, shuffle_buffer=shuffle_buffer)(epoch, 1)) for epoch in (0, 1)]
    assert whole[0] != whole[1] and sorted(whole[0]) == sorted(whole[1])


def test_without_a_shuffle_buffer_rows_keep_their_stored_order_within_each_row_group(grouped_store):
    index = {z: i for i, z in enumerate(stored(grouped_store))}  # the stored order
    rows = store_rows(open_store(grouped_store))
    orders = []
    for epoch in range(2):
        got = [index[z] for z, _ in rows_of(source(grouped_store)(epoch, 1))]
        pieces = epoch_share(rows.groups, seed=0, epoch=epoch, rank=0, world=1)
        starts = np.cumsum([0] + [g.rows for g in rows.groups])
        want = [int(starts[rows.groups.index(p.group)]) + i for p in pieces for i in range(p.start, p.stop)]
        assert got == want  # whole row groups, each in stored order
        orders.append([p.group for p in pieces])
    assert orders[0] != orders[1]  # the row groups in another order each epoch


def test_the_shuffle_buffer_mixes_the_rows_of_a_window_of_whole_row_groups(grouped_store):
    """A buffer of 8 rows: windows of whole row groups holding at least 8 rows, each in a random order."""
    in_order = rows_of(source(grouped_store)(4, 1))
    mixed = rows_of(source(grouped_store, shuffle_buffer=8)(4, 1))
    pieces = epoch_share(store_rows(open_store(grouped_store)).groups, seed=0, epoch=4, rank=0, world=1)
    first_window = int(np.searchsorted(np.cumsum([p.stop - p.start for p in pieces]), 8)) + 1
    size = sum(p.stop - p.start for p in pieces[:first_window])
    assert size >= 8 and sorted(mixed[:size]) == sorted(in_order[:size]) and mixed[:size] != in_order[:size]
    assert sorted(mixed) == sorted(in_order)


def test_a_share_covers_only_the_row_groups_it_overlaps():
    groups = tuple(RowGroup(f"part{i}", 0, 4) for i in range(5))  # 20 rows
    for world in (1, 2, 3, 7):
        shares = [epoch_share(groups, seed=2, epoch=5, rank=r, world=world) for r in range(world)]
        assert sum(p.stop - p.start for share in shares for p in share) == 20
        assert all(0 <= p.start < p.stop <= 4 for share in shares for p in share)
        sequence = [(p.group.part, i) for share in shares for p in share for i in range(p.start, p.stop)]
        assert len(set(sequence)) == 20  # the shares are consecutive cuts of one sequence
    with pytest.raises(ValueError, match="rank 2 is not one of 2 workers"):
        epoch_share(groups, seed=0, epoch=0, rank=2, world=2)


def test_only_the_views_kept_are_read_and_every_one_once(tmp_path):
    url = numbered_store(str(tmp_path / "store"), images=9, parts=2, views=2)
    want = {z: lv for z, lv in stored(url).items() if lv[1] == 0}
    rows = store_rows(open_store(url), views=(0,))
    assert rows.num_rows == 9 and rows.views == (0,)
    seen = [row for r in range(2) for row in rows_of(
        StoreBatches(rows, rank=r, world=2, seed=0, shuffle_buffer=3)(epoch=0, micro=1))]
    assert {z for z, _ in seen} == set(want) and len(seen) == 9
    assert all(want[z][0] == label for z, label in seen)


def test_a_store_of_format_version_2_gives_the_same_batches(tmp_path):
    v3 = numbered_store(str(tmp_path / "v3"), images=12, parts=3)
    v2 = as_format_version_2(numbered_store(str(tmp_path / "v2"), images=12, parts=3))
    for shuffle_buffer in (0, 4):
        assert rows_of(source(v2, shuffle_buffer=shuffle_buffer)(2, 2)) == \
            rows_of(source(v3, shuffle_buffer=shuffle_buffer)(2, 2))


def test_a_store_on_s3_is_read_through_fsspec(s3):
    url = class_latent_store("s3://rae-test/batches-store", rows=24)
    want = stored(url)
    seen = [row for r in range(2) for row in rows_of(source(url, rank=r, world=2, shuffle_buffer=8)(0, 4))]
    assert {z for z, _ in seen} == set(want) and len(seen) == 24


def test_a_memory_store_is_refused_because_workers_cannot_read_it():
    url = numbered_store("memory://store-batches", images=4, parts=1)
    with pytest.raises(ValueError, match="memory:// store lives in this process only"):
        store_rows(open_store(url))


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "store-batches-prefetch"]


def test_a_stream_left_early_stops_its_reading_thread(grouped_store):
    stream = source(grouped_store)(0, 1)
    next(stream)
    assert _prefetch_threads()
    stream.close()
    for thread in _prefetch_threads():
        thread.join(timeout=60)
    assert not _prefetch_threads()


def test_a_part_that_cannot_be_read_fails_the_stream_with_its_error(grouped_store):
    reader = source(grouped_store)
    for part in open_store(grouped_store).parts:
        open(part.removeprefix("file://"), "wb").close()  # emptied after the run was planned
    with pytest.raises(OSError, match=r"store part file://\S+\.parquet \(row group \d+\) could not be read: .*"
                                      r"(?i:parquet|size|magic).*rae store verify"):
        list(reader(0, 1))


def test_a_resumed_epoch_continues_with_the_batches_the_uninterrupted_run_had(grouped_store):
    """The loop's contract: a resume skips ``position x accum`` micro-batches of the epoch's stream."""
    def steps(rank: int, start: int) -> list[list[tuple[bytes, int]]]:
        ctx = RunContext(rank=rank, world=2, device=torch.device("cpu"), plan=plan_batches(4, 2, 1),
                         steps_per_epoch=5)
        reader = source(grouped_store, rank=rank, world=2, seed=3, shuffle_buffer=4)
        return [rows_of(step) for step in step_batches(reader, ctx, start, total_steps=12)]

    for rank in range(2):
        uninterrupted = steps(rank, 0)
        assert len(uninterrupted) == 12 and all(len(step) == 2 for step in uninterrupted)
        assert steps(rank, 7) == uninterrupted[7:] and steps(rank, 3) == uninterrupted[3:]


def test_rae_train_dit_hands_each_worker_a_reader_of_the_store_and_no_ray_dataset(class_store, monkeypatch):
    from jobs.train import dit

    launched = {}
    monkeypatch.setattr(dit, "train_task", lambda task, loop, **kwargs: launched.update(task=task, loop=loop, **kwargs))
    dit.train_dit(tiny_dit_config(class_store), run_name="wired", storage="unused")
    assert "dataset" not in launched  # no Ray Dataset: nothing for Ray Data to execute
    task, loop = launched["task"], launched["loop"]
    assert loop.shuffle_buffer == 32 and launched["rows"] == 64
    for world in (1, 2):  # the share is cut from the world each attempt has (an elastic run changes it)
        shares = [rows_of(task.batch_source(loop, rank, world)(0, 8)) for rank in range(world)]
        assert shares[0] == rows_of(source(class_store, rank=0, world=world, shuffle_buffer=32)(0, 8))
        assert sum(len(share) for share in shares) == 64


def test_only_shuffled_reads_map_the_parts_and_both_give_the_stored_rows(grouped_store, monkeypatch):
    """Shuffled batches are copies, so their parts may be memory-mapped; batches in stored order are
    views of the Arrow buffers, which must never point into a read-only mapping (an in-place write
    there would crash the process)."""
    import pyarrow.parquet as pq

    opened: list[bool] = []
    plain = pq.ParquetFile

    class Recording(plain):
        def __init__(self, source, **options):
            opened.append(options.get("memory_map", False))
            super().__init__(source, **options)

    monkeypatch.setattr(pq, "ParquetFile", Recording)
    rows = stored(grouped_store)
    for shuffle_buffer, mapped in ((0, False), (6, True)):
        batches = source(grouped_store, shuffle_buffer=shuffle_buffer)  # reads the parts' footers
        opened.clear()
        seen = rows_of(batches(0, 2))
        assert opened and set(opened) == {mapped}, (shuffle_buffer, opened)
        assert len(seen) == len(set(seen)) == 20
        assert all(rows[key][0] == label for key, label in seen)  # each batch row is a stored row, unaltered
