"""Per-rank images (issue 4): with several ranks each rank loads only the images whose loss it
computes (image i belongs to rank i % R), whether cached in memory or streamed from disk.

Two gloo CPU ranks build the real pipeline on the micro city (8 train + 2 eval images), train
two 2-camera batches and evaluate every eval image; each rank reports which images its
datamanager read.  Also: the queue interleaves owners, a rank refuses another rank's image,
the disk stream's cache stays within its budget, and the batched step on one rank (what the
benchmark compares against) gives the 2-rank loss on the same batch.
"""

from __future__ import annotations

import pytest
import torch
from _trainers import micro_city, retina_config  # noqa: F401 (fixture)

from landmark_plugin.core.schedule import image_owner, interleave_owners, owned_images
from landmark_plugin.distributed.launch import run_ranks

FAST_START = dict(start_method="forkserver", preload=("landmark_plugin.gaussians.distributed_pipeline", "_trainers"))
BATCH, STEPS = 2, 2
ONE_IMAGE = 48 * 36 * 3  # bytes of one micro-city image as uint8


def _pipeline(data: str, cache: str, budget_gb: float, device: str = "cpu"):
    from pathlib import Path

    config = retina_config(Path(data), Path(data) / "unused-out", STEPS)
    config.pipeline.max_batch_size = BATCH
    config.pipeline.model.background_color = "white"  # the same target on every rank
    dm = config.pipeline.datamanager
    dm.cache_images, dm.cache_budget_gb, dm.prefetch = cache, budget_gb, 2
    return config.pipeline.setup(device=device, test_mode="val")


def _train_and_evaluate(comm, data: str, cache: str, budget_gb: float):
    pipeline = _pipeline(data, cache, budget_gb)
    dm = pipeline.datamanager
    before = dm.loaded_indices("train")
    model = pipeline.model
    model.train()
    losses, batches, cached = [], [], []
    for step in range(STEPS):
        model.step = step
        batches.append(pipeline._next_pool(BATCH))
        _, loss_dict, _ = pipeline.get_train_loss_dict(step)
        loss_dict["main_loss"].backward()
        losses.append(float(loss_dict["main_loss"]))
        cached.append(dm.cached_train.cached_bytes())
    metrics = pipeline.get_average_eval_image_metrics(step=STEPS)
    shown = []
    for index in range(len(dm.eval_dataset)):  # eval images of both owners: the logger is on rank 0
        pipeline._next_eval_index = lambda index=index: index
        image_metrics, images = pipeline.get_eval_image_metrics_and_images(STEPS)
        _, eval_losses, _ = pipeline.get_eval_loss_dict(STEPS)
        shown.append((index, sorted(images), image_metrics["psnr"], float(eval_losses["main_loss"])))
    loaded = {"train": dm.loaded_indices("train"), "eval": dm.loaded_indices("eval")}
    # nerfstudio's data-loader average (every rank iterates the same loader; rank 0 scores)
    loader = [(dm.eval_dataset.cameras[i : i + 1], {"image": dm.eval_dataset[i]["image"]}) for i in range(len(dm.eval_dataset))]
    loader_psnr = pipeline.get_average_image_metrics(loader, "eval")["psnr"]
    foreign = next(i for i in range(len(dm.train_dataset)) if image_owner(i, comm.world_size) != comm.rank)
    try:
        dm.cached_train[foreign]
        refused = False
    except KeyError:
        refused = True
    return {
        "before": before, "train": loaded["train"], "eval": loaded["eval"], "loader_psnr": loader_psnr,
        "num_train": len(dm.train_dataset), "num_eval": len(dm.eval_dataset), "mode": dm.cache_mode,
        "losses": losses, "batches": batches, "cached_bytes": cached, "psnr": metrics["psnr"], "refused": refused, "shown": shown,
    }


def _one_rank_loss(comm, data: str, batch_world: int):
    """The batched step on one rank, on the first batch of a ``batch_world``-rank run's queue."""
    torch.manual_seed(0)  # what every rank of a run does around its pipeline's construction (init_seed 0)
    pipeline = _pipeline(data, "auto", 4.0)
    pipeline.model.train()
    pipeline.model.step = 0
    batch = pipeline._next_pool(BATCH, world_size=batch_world)
    _, loss_dict, _ = pipeline.get_batch_loss_dict(0)
    return batch, float(loss_dict["main_loss"]), pipeline.datamanager.loaded_indices("train")


@pytest.fixture(scope="module")
def two_ranks(micro_city, tmp_path_factory):
    """cache mode -> the two ranks' reports (each mode run once per module)."""
    runs = {}

    def run(cache: str, budget_gb: float):
        if cache not in runs:
            out = tmp_path_factory.mktemp(f"images-{cache}")
            runs[cache] = run_ranks(_train_and_evaluate, 2, out, args=(str(micro_city), cache, budget_gb),
                                    timeout_s=300, **FAST_START)
        return runs[cache]

    return run


@pytest.mark.parametrize("cache,budget_gb", [("auto", 4.0), ("disk", 2.5 * ONE_IMAGE / 2**30)])
def test_each_rank_loads_only_its_own_images(two_ranks, cache, budget_gb):
    results = two_ranks(cache, budget_gb)
    num_train, num_eval = results[0]["num_train"], results[0]["num_eval"]
    assert (num_train, num_eval) == (8, 2)
    for rank, r in enumerate(results):
        assert r["before"] == [], "nothing is read while the pipeline is built"
        assert r["mode"] == ("device" if cache == "auto" else "disk")
        mine = owned_images(num_train, rank, 2)
        used = {i for batch in r["batches"] for i in batch if image_owner(i, 2) == rank}
        if cache == "auto":
            assert r["train"] == mine, f"rank {rank} read {r['train']}, owns {mine}"
        else:
            # streamed: what the batches needed (plus read-ahead), never another rank's image
            assert used <= set(r["train"]) <= set(mine), (rank, r["train"], used, mine)
            assert max(r["cached_bytes"]) <= 2 * ONE_IMAGE, "the stream's cache keeps to its budget"
        assert r["eval"] == owned_images(num_eval, rank, 2), "eval images too: only the owner's"
        assert r["refused"], "another rank's image is refused, not silently read"
    for step in range(STEPS):
        assert results[0]["batches"][step] == results[1]["batches"][step], "the same queue on every rank"
        assert sorted(image_owner(i, 2) for i in results[0]["batches"][step]) == [0, 1], "owners interleaved"
        assert results[0]["losses"][step] == results[1]["losses"][step], "the loss is reduced over ranks"
        assert torch.isfinite(torch.tensor(results[0]["losses"][step]))
    assert results[0]["psnr"] == results[1]["psnr"] and 0 < results[0]["psnr"] < 60
    for r in results:  # get_average_image_metrics works on several ranks too, with the same renders
        assert r["loader_psnr"] == pytest.approx(results[0]["psnr"], abs=1e-4)
    for (index, images, psnr, loss), (_, others, psnr_1, loss_1) in zip(results[0]["shown"], results[1]["shown"]):
        assert images and not others, f"eval image {index} (owner {image_owner(index, 2)}): logged by rank 0 only"
        assert psnr == psnr_1 and loss == loss_1 and 0 < psnr < 60, "the owner's metrics reach every rank"


def test_one_rank_batched_step_matches_two_ranks(two_ranks, micro_city, tmp_path):
    two = two_ranks("auto", 4.0)
    batch, loss, loaded = run_ranks(_one_rank_loss, 1, tmp_path / "one", args=(str(micro_city), 2), timeout_s=300,
                                    **FAST_START)[0]
    assert batch == two[0]["batches"][0]
    assert loss == pytest.approx(two[0]["losses"][0], rel=1e-5, abs=1e-6)
    assert loaded == list(range(8)), "one rank holds every image"


def test_interleave_owners_keeps_each_owners_order():
    order = [5, 3, 7, 1, 0, 2, 6, 4, 9]
    out = interleave_owners(order, 2)
    assert sorted(out) == sorted(order)
    assert [i for i in out if i % 2 == 1] == [5, 3, 7, 1, 9] and [i for i in out if i % 2 == 0] == [0, 2, 6, 4]
    assert [i % 2 for i in out] == [0, 1] * 4 + [1]
    assert interleave_owners(order, 1) == order
    assert owned_images(9, 1, 4) == [1, 5]


def test_disk_stream_keeps_a_bounded_cache_and_reads_ahead(micro_city):
    from landmark_plugin.gaussians.datamanager import ImageStore

    pipeline = _pipeline(str(micro_city), "disk", 1.5 * ONE_IMAGE / 2**30)  # one process: every image
    dm = pipeline.datamanager
    store = dm.cached_train
    assert isinstance(store, ImageStore) and len(store) == 8 and dm.loaded_indices() == []
    first = store[0]["image"]
    assert store[0]["image"] is first, "a cached image is not read again"
    store[1]
    assert store.cached_bytes() == ONE_IMAGE and list(store.cache) == [1], "the least recently used went"
    dm.prefetch_train([5, 6])
    assert sorted(store.pending) == [5, 6]
    assert torch.equal(store[5]["image"], dm.train_dataset.get_data(5, image_type="uint8")["image"])
    store.pending[6].result()  # the read-ahead of 6 runs on the pool: wait for it, not for an access
    assert dm.loaded_indices() == [0, 1, 5, 6]


def test_auto_mode_counts_only_the_images_a_rank_holds(micro_city):
    half = 4 * ONE_IMAGE / 2**30  # the budget holds 4 of the 8 training images
    dm = _pipeline(str(micro_city), "auto", half).datamanager
    assert dm.cache_mode == "cpu", "all 8 images exceed the budget"
    dm.load_only(owned_images(8, 1, 2), owned_images(2, 1, 2))
    assert dm.cache_mode == "device" and dm.owned == {"train": [1, 3, 5, 7], "eval": [1]}
    assert len(dm.cached_train) == 4 and dm.loaded_indices() == [1, 3, 5, 7]
    with pytest.raises(KeyError, match="not held by this process"):
        dm.cached_train[0]
