"""Live viewing of a multi-rank run, and ns-render / ns-eval / ns-viewer on sharded checkpoints.

In process (no ranks): the mailbox between the viewer's render threads and the training loop
serves one view per step, all views while paused, and never leaves a viewer thread waiting.

One 2-rank gloo run of the real trainer with the viewer on (``_live_viewer_rank``) is shared by
the slow checks:
- a headless Chromium opens the viewer while the ranks train; the page shows a render composited
  from both ranks' partials, served from the training loop's per-step sync; after the viewer's
  pause (applied on every rank), the screenshot's render area matches the one-process model's
  own render of the viewer's camera (correlation, and mean colour), and clearly better than a
  render of another camera does (so the check can fail);
- the run's sharded checkpoint loads through nerfstudio's ``eval_setup`` (what ns-render, ns-eval,
  ns-viewer call): renders equal those of the merged checkpoint (landmark-merge) to 1e-5, ns-eval's
  metrics are the same, and the ns-render CLI writes frames from the sharded run.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import pytest
import torch

from _live_viewer_rank import MAX_RES
from _trainers import micro_city  # noqa: F401,F811 (fixture)

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WINDOW = (800, 600)
CORRELATION_MIN = 0.9
"""The screenshot's render area vs the model's render of the viewer's camera (after JPEG and
resampling); a render of another camera must correlate at least MARGIN less."""
MARGIN = 0.2
MEAN_COLOUR_TOL = 0.06
"""Mean RGB (0..1) of the render area vs the model's render: JPEG at the viewer's quality and
bilinear upscaling shift the mean by well under a percent; a blank or wrong frame is off by far more."""
RENDER_TOL = dict(rtol=0.0, atol=1e-5)
COMPOSITE_TOL = dict(rtol=0.0, atol=1e-4)
"""The 2-rank composite vs the one-process render (float32; the same Gaussians, partials joined in leaf order).
On the CPU the model renders in plain mode, where gsplat's early termination acts per part: at a pixel whose
transmittance falls below 1e-4 within the front part, the back part still adds up to that transmittance.  Which
model state the live view catches depends on timing, and such pixels gave differences of 1.05e-5 and 1.2e-5 on
2 of 93,312 values in runs of the same code; a wrong order, partial or frame is off by 1e-2 or more."""


# ---- the mailbox, in process --------------------------------------------------------------------
def _camera(x: float = 0.0, width: int = 8, height: int = 6):
    from nerfstudio.cameras.cameras import Cameras

    c2w = torch.eye(4)[None, :3, :]
    c2w[0, 0, 3] = x
    return Cameras(camera_to_worlds=c2w, fx=5.0, fy=5.0, cx=width / 2, cy=height / 2, width=width, height=height)


def _single_sync(timeout_s: float = 5.0):
    """A ViewerSync over one process whose render returns the camera's x offset as the image."""
    from landmark_plugin.distributed.groups import Comm
    from landmark_plugin.viewer.distributed import MailboxModel, RenderMailbox, ViewerSync

    def render(camera, background):
        h, w = int(camera.height), int(camera.width)
        return {"rgb": torch.full((h, w, 3), float(camera.camera_to_worlds[0, 0, 3])), "background": background}

    mailbox = RenderMailbox(timeout_s=timeout_s)
    return ViewerSync(Comm.single(), render, mailbox), MailboxModel(mailbox)


def _ask(model, camera, results: Dict, key) -> threading.Thread:
    def run():
        try:
            results[key] = model.get_outputs_for_camera(camera)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            results[key] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_pending(sync, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(sync.mailbox._pending) < count:
        assert time.monotonic() < deadline, "the viewer thread never posted its request"
        time.sleep(0.01)


def test_mailbox_serves_one_view_per_training_step_and_all_while_paused():
    sync, model = _single_sync()
    model.set_background(torch.tensor([0.1, 0.2, 0.3]))
    results: Dict = {}
    threads = [_ask(model, _camera(x=float(i + 1), width=8 + i), results, i) for i in range(3)]
    _wait_pending(sync, 3)
    assert sync.step(lambda: "train") == "train"
    assert sync.renders == 1, "a training step serves at most one view"
    assert sync.step(lambda: "train") == "train" and sync.renders == 2
    # Paused: every pending view is served without training steps, until rank 0 says "train".
    calls = iter(["pause"] * 4 + ["train"] * 10)
    assert sync.step(lambda: next(calls)) == "train"
    for t in threads:
        t.join(5)
    assert sync.renders == 3
    for i in range(3):
        out = results[i]
        assert out["rgb"].shape == (6, 8 + i, 3), "the camera's size travels with the request"
        assert float(out["rgb"][0, 0, 0]) == i + 1, "the camera's pose travels with the request"
        torch.testing.assert_close(out["background"], torch.tensor([0.1, 0.2, 0.3]))
    assert sync.step(lambda: "stop") == "stop" and sync.state == "stopped"


def test_waiting_viewer_thread_is_released_by_close_and_by_timeout():
    from landmark_plugin.viewer.distributed import RenderDropped

    sync, model = _single_sync(timeout_s=0.5)
    results: Dict = {}
    start = time.monotonic()
    _ask(model, _camera(), results, "timeout").join(5)
    assert isinstance(results["timeout"], RenderDropped) and 0.5 <= time.monotonic() - start < 3
    assert not sync.mailbox._pending, "a request that timed out is withdrawn"

    sync, model = _single_sync(timeout_s=60)
    thread = _ask(model, _camera(), results, "closed")
    _wait_pending(sync, 1)
    start = time.monotonic()
    sync.close("training has ended")
    thread.join(5)
    assert isinstance(results["closed"], RenderDropped) and time.monotonic() - start < 1
    with pytest.raises(RenderDropped, match="training has ended"):
        model.get_outputs_for_camera(_camera())


def test_gui_edits_are_installed_at_a_sync_point_or_refused_with_the_reason():
    """Layout edits posted by a GUI callback wait for the sync, which installs them (here on one
    rank) and hands back a rejection as ``EditsError``; a sync without an installer refuses them."""
    from landmark_plugin.edits import EditsError, LayoutEdits, RemoveBlock

    sync, _ = _single_sync()
    installed = []

    def install(edits, source):
        if edits.hidden_blocks() == [9]:
            raise EditsError(f"{source}: block 9 does not exist")
        installed.append((edits, source))

    sync.install_fn = install
    results: Dict = {}

    def post(key, edits):
        def run():
            try:
                sync.mailbox.install_edits(edits, source="viewer")
                results[key] = "installed"
            except EditsError as error:
                results[key] = str(error)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    good, bad = LayoutEdits(ops=(RemoveBlock(1),)), LayoutEdits(ops=(RemoveBlock(9),))
    for key, edits in (("good", good), ("bad", bad)):
        thread = post(key, edits)
        _wait_pending(sync, 1)
        assert key not in results, "the callback waits for the training loop"
        assert sync.step(lambda: "train") == "train"
        thread.join(5)
    assert results == {"good": "installed", "bad": "viewer: block 9 does not exist"}
    assert installed == [(good, "viewer")], "the edits travel as JSON and come back equal"

    sync.install_fn = None
    thread = post("refused", good)
    _wait_pending(sync, 1)
    sync.step(lambda: "train")
    thread.join(5)
    assert "do not install" in results["refused"] and len(installed) == 1


# ---- the 2-rank run with a browser ------------------------------------------------------------
def _browser_missing() -> Optional[str]:
    """Why the browser test cannot run here, or None."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        return f"{CHROMIUM} / {CHROMEDRIVER} absent: install Debian's chromium and chromium-driver (.ci/run does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e .[test])"
    return None


def _browser_or_skip():
    reason = _browser_missing()
    if reason is not None:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    # Headless and quiet: no GPU, no sandbox (root in CI), no background connections (the
    # machine's network is closed; they would be refused many at a time).
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    return driver, profile


def _wait_file(path: Path, future, timeout_s: float = 240) -> Path:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if future.done():
            future.result()  # raises the ranks' failure
            raise AssertionError(f"the run ended before writing {path.name}")
        assert time.monotonic() < deadline, f"timed out waiting for {path.name}"
        time.sleep(0.1)
    return path


def _screenshot(driver) -> np.ndarray:
    from io import BytesIO

    from PIL import Image

    return np.asarray(Image.open(BytesIO(driver.get_screenshot_as_png())).convert("RGB"), dtype=np.float64) / 255


def _shown_resolution(driver) -> Tuple[int, int]:
    """The size of the last image the viewer sent this page (its stats line), (0, 0) before any."""
    from selenium.webdriver.common.by import By

    match = re.search(r"Resolution:\s*(\d+)x(\d+)px", driver.find_element(By.TAG_NAME, "body").text)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _view_area(driver, shot: np.ndarray, width: int, height: int) -> np.ndarray:
    """The part of the screenshot where the viewer draws a ``width`` x ``height`` image: the 3D
    canvas's full height, from its left edge, at the image's aspect (the control panel docks on
    the right; viser's camera aspect, hence the image's, is that of the free area)."""
    left, top, canvas_height, ratio = (float(v) for v in driver.execute_script(
        "const r = document.querySelector('canvas').getBoundingClientRect();"
        "return [r.left, r.top, r.height, window.devicePixelRatio];"
    ))
    h = int(round(canvas_height * ratio))
    w = int(round(h * width / height))
    y0, x0 = int(round(top * ratio)), int(round(left * ratio))
    return shot[y0 : y0 + h, x0 : x0 + w]


def _compared(image: np.ndarray) -> np.ndarray:
    """The rows above the axes gizmo that viser draws in the canvas's bottom-left corner."""
    return image[: int(0.8 * image.shape[0])]


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    t = torch.from_numpy(image).permute(2, 0, 1)[None]
    return torch.nn.functional.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1) - a.mean(), b.reshape(-1) - b.mean()
    return float((a @ b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


@pytest.fixture(scope="module")
def live_run(micro_city, tmp_path_factory):
    """The 2-rank run with a browser on its viewer: (run dir, rank 0's record, screenshots)."""
    from landmark_plugin.distributed.launch import free_port, run_ranks

    driver, profile = _browser_or_skip()
    work = tmp_path_factory.mktemp("live-viewer")
    signals = work / "signals"
    signals.mkdir()
    port = free_port()
    pool = ThreadPoolExecutor(1)
    future = pool.submit(
        run_ranks, _train_fn(), 2, work / "ranks", args=(str(micro_city), str(work / "out"), str(signals), port),
        timeout_s=120.0, start_method="forkserver", preload=("landmark_plugin.gaussians.trainer", "_live_viewer_rank"),
    )
    shots: Dict[str, np.ndarray] = {}
    started = time.monotonic()
    try:
        url = json.loads(_wait_file(signals / "url.json", future).read_text())
        driver.get(f"http://127.0.0.1:{url['port']}")
        deadline = time.monotonic() + 180
        # Until a full-resolution render reaches the page while the ranks train: the viewer first
        # renders small, and the sync serves one view per step, so training has moved on by then.
        while max(_shown_resolution(driver)) != MAX_RES:
            assert not future.done() and time.monotonic() < deadline, "no render reached the page while training"
            time.sleep(0.25)
        shots["training"] = _view_area(driver, _screenshot(driver), *_shown_resolution(driver))
        from selenium.webdriver.common.by import By

        driver.find_element(By.XPATH, "//button[contains(., 'Pause Training')]").click()
        stable = json.loads(_wait_file(signals / "stable.json", future).read_text())
        time.sleep(1.5)  # the last image travels over the websocket and is painted
        shown = _shown_resolution(driver)
        assert shown == (stable["width"], stable["height"]), f"the page shows {shown}, the last render was {stable}"
        shots["paused"] = _view_area(driver, _screenshot(driver), *shown)
        driver.save_screenshot(str(work / "viewer.png"))
    finally:
        (signals / "done").touch()
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        records = future.result(timeout=300)
        pool.shutdown()
    run_dir = next((work / "out").glob("*/retina-gs-small/live"))
    print(f"\nlive run with the browser: {time.monotonic() - started:.1f} s")
    records[0]["trained_leaf_ids"] = torch.cat([r["leaf_ids"] for r in records])  # the merged rows' order
    return run_dir, records[0], shots


def _train_fn():
    from _live_viewer_rank import train_with_live_viewer

    return train_with_live_viewer


def _render(pipeline, camera) -> torch.Tensor:
    with torch.no_grad():
        return pipeline.model.get_outputs_for_camera(camera.to(pipeline.device))["rgb"].cpu()


def _viewer_camera(record):
    from nerfstudio.cameras.cameras import Cameras

    c = record["camera"]
    return Cameras(camera_to_worlds=torch.tensor(c["camera_to_worlds"]), fx=c["fx"], fy=c["fy"], cx=c["cx"], cy=c["cy"],
                   width=c["width"], height=c["height"])


def _other_camera(camera):
    """The viewer's camera turned 90 degrees about the world's up axis (z) around its own centre."""
    from nerfstudio.cameras.cameras import Cameras

    c2w = camera.camera_to_worlds.clone()
    turn = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    c2w[0, :, :3] = turn @ c2w[0, :, :3]
    return Cameras(camera_to_worlds=c2w, fx=camera.fx, fy=camera.fy, cx=camera.cx, cy=camera.cy,
                   width=camera.width, height=camera.height)


def _resume_in_one_process(config_path: Path, checkpoint_dir: Path, work: Path) -> Dict:
    """``ns-train ... --load-dir <run>/nerfstudio_models`` on one process, where that folder holds
    the pointer a sharded save leaves: the trainer resumes from the shards."""
    import yaml

    config = yaml.load(config_path.read_text(), Loader=yaml.Loader)
    config.vis, config.output_dir, config.timestamp = "tensorboard", work / "resumed", "resumed"
    config.load_dir, config.max_num_iterations = checkpoint_dir, 1
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    return {"start_step": trainer._start_step, "num_points": trainer.pipeline.model.num_points}


def _cli(entrypoint, *argv: str) -> None:
    """Run a console script's entry point in this process (a new process would spend ~20 s
    importing nerfstudio on a shared CPU), as the command line ``argv`` would."""
    saved = sys.argv
    sys.argv = list(argv)
    try:
        entrypoint()
    finally:
        sys.argv = saved


@pytest.fixture(scope="module")
def sharded_run(micro_city, tmp_path_factory, request):
    """(run dir, rank 0's viewer record or None): the live run's shards, or, where no browser is
    installed, those of the same 2-rank run without the viewer (the loading checks still run)."""
    if _browser_missing() is None:
        run_dir, record, _ = request.getfixturevalue("live_run")
        return run_dir, record
    from _live_viewer_rank import train_without_viewer

    from landmark_plugin.distributed.launch import run_ranks

    work = tmp_path_factory.mktemp("sharded-run")
    run_ranks(train_without_viewer, 2, work / "ranks", args=(str(micro_city), str(work / "out"), 4), timeout_s=120.0,
              start_method="forkserver", preload=("landmark_plugin.gaussians.trainer", "_live_viewer_rank"))
    return next((work / "out").glob("*/retina-gs-small/live")), None


@pytest.fixture(scope="module")
def loaded(sharded_run, tmp_path_factory):
    """Renders and ns-eval metrics of the sharded run through nerfstudio's loaders, then of the
    merged checkpoint; ns-render's command line on the sharded run."""
    from nerfstudio.scripts import eval as ns_eval
    from nerfstudio.scripts import render as ns_render
    from nerfstudio.utils.eval_utils import eval_setup

    from landmark_plugin.distributed import merge
    from landmark_plugin.distributed.checkpoint import is_shards_pointer

    run_dir, record = sharded_run
    work = tmp_path_factory.mktemp("sharded-loading")
    config = run_dir / "config.yml"
    (pointer,) = (run_dir / "nerfstudio_models").glob("step-*.ckpt")
    assert is_shards_pointer(pointer), "a sharded save leaves a pointer where nerfstudio looks for checkpoints"
    out: Dict = {"frames": work / "frames"}
    started = time.monotonic()
    # ns-eval on 2 ranks (each loads its own shard), meanwhile.
    two_ranks = subprocess.Popen(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "nerfstudio.scripts.eval",
         "--load-config", str(config), "--output-path", str(work / "eval-two-ranks.json")],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    out["resumed"] = _resume_in_one_process(config, run_dir / "nerfstudio_models", work)
    _cli(ns_render.entrypoint, "ns-render", "dataset", "--load-config", str(config), "--output-path", str(out["frames"]),
         "--split", "test", "--rendered-output-names", "rgb")
    for kind in ("sharded", "merged"):
        if kind == "merged":
            log = two_ranks.communicate(timeout=600)[0]  # it must load the pointer before the merge replaces it
            assert two_ranks.returncode == 0, log[-6000:]
            out["two_ranks_metrics"] = json.loads((work / "eval-two-ranks.json").read_text())["results"]
            _cli(merge.entrypoint, "landmark-merge", str(config), "--no-write-ply")
            assert not is_shards_pointer(pointer), "landmark-merge replaces the pointer with the merged checkpoint"
        _, pipeline, _, _ = eval_setup(config, test_mode="test")
        cameras = pipeline.datamanager.eval_dataset.cameras
        renders = [_render(pipeline, cameras[i : i + 1]) for i in range(len(cameras))]
        if record is not None:
            # The viewer's camera as the viewer rendered it: over the viewer's background (the
            # model's is "random": eval renders over the colour the viewer sets, as nerfstudio's
            # one-process viewer does), with the SH degree of the training step (a loaded
            # model renders all degrees) and the leaves the Gaussians had in training (a loaded
            # model assigns them by mean; some drifted across a leaf face since the last migration).
            background = record["last_view"]["background"]
            if background is not None:
                pipeline.model.set_background(torch.tensor(background))
            pipeline.model.step = record["last_view"]["model_step"]
            pipeline.model.leaf_ids = record["trained_leaf_ids"].to(pipeline.model.means.device)
            viewer_camera = _viewer_camera(record)
            renders += [_render(pipeline, viewer_camera), _render(pipeline, _other_camera(viewer_camera))]
        out[kind] = {"renders": renders, "num_points": pipeline.model.num_points}
        _cli(ns_eval.entrypoint, "ns-eval", "--load-config", str(config), "--output-path", str(work / f"eval-{kind}.json"))
        out[kind]["metrics"] = json.loads((work / f"eval-{kind}.json").read_text())["results"]
    print(f"sharded / merged loading: {time.monotonic() - started:.1f} s")
    return out


@pytest.mark.slow
def test_browser_shows_the_composited_render_while_training(live_run, loaded):
    run_dir, record, shots = live_run
    assert record["host"] == "127.0.0.1" and any("http://127.0.0.1:" in line for line in record["info"]), record["info"]
    assert not record["watcher_failures"], record["watcher_failures"]
    # Live: views were rendered by the per-step sync while the ranks trained, at most one per step.
    assert record["renders_while_training"] >= 1
    assert record["step_at_pause_request"] > record["step_at_connect"], "training went on while the page was open"
    assert record["renders_while_training"] <= record["step_at_pause_request"] + 1
    # Paused on every rank: no step ran while the viewer rendered after the pause.
    assert record["renders_paused"] >= 1 and record["step_after_renders"] == record["step_paused"]
    assert record["sync_state"] == "stopped" and record["late_request_seconds"] < 1.0, record["late_request"]

    # The composite rank 0 handed the viewer equals the one-process model's render of that camera
    # (the run's final shards hold the paused model: nothing trained after the pause).
    view = record["last_view"]
    assert view["camera"] == record["camera"], "no render after the renders settled"
    mine, other = loaded["sharded"]["renders"][-2], loaded["sharded"]["renders"][-1]
    torch.testing.assert_close(view["rgb"], mine, **COMPOSITE_TOL)

    # The screenshot's render area vs that render.
    paused = _compared(shots["paused"])
    h, w = shots["paused"].shape[:2]
    expected = _compared(_resize(mine.numpy().astype(np.float64), h, w))
    wrong = _compared(_resize(other.numpy().astype(np.float64), h, w))
    corr, corr_other = _correlation(paused, expected), _correlation(paused, wrong)
    colour = np.abs(paused.reshape(-1, 3).mean(0) - expected.reshape(-1, 3).mean(0)).max()
    print(f"\nviewer screenshot vs model render: correlation {corr:.3f} (another camera: {corr_other:.3f}), "
          f"mean colour difference {colour:.4f}; renders {record['renders']} in {record['render_seconds']:.2f} s "
          f"({record['renders_while_training']} while training, steps {record['step_at_connect']}..{record['step_paused']})")
    assert paused.std() > 0.05, "the render area is blank"
    assert _compared(shots["training"]).std() > 0.02, "the render shown while training is blank"
    assert corr > CORRELATION_MIN, f"the page does not show the model's render (correlation {corr:.3f})"
    assert corr > corr_other + MARGIN, f"the check does not tell views apart ({corr:.3f} vs {corr_other:.3f})"
    assert colour < MEAN_COLOUR_TOL


def _metric_tolerances(psnr: float) -> dict:
    """How far image metrics may move when every pixel moves by at most RENDER_TOL's atol
    (renders of 2 ranks and of one process differ by float rounding).  PSNR: the mean squared
    error moves by at most 2 * sqrt(mse) * atol (+ atol^2), so PSNR by 20 / ln 10 * atol /
    sqrt(mse); a fixed 1e-6 is about one float32 step of a PSNR near 15 and failed on it."""
    atol = RENDER_TOL["atol"]
    rms = 10.0 ** (-psnr / 20.0)
    return {"psnr": 20.0 / math.log(10.0) * (atol + atol**2 / rms) / rms, "ssim": 1e-5, "lpips": 1e-5}


@pytest.mark.slow
def test_sharded_run_renders_and_evaluates_as_its_merge(sharded_run, loaded):
    sharded, merged = loaded["sharded"], loaded["merged"]
    assert sharded["num_points"] == merged["num_points"]
    for a, b in zip(sharded["renders"], merged["renders"]):
        torch.testing.assert_close(a, b, **RENDER_TOL)
    assert sharded["metrics"].keys() == merged["metrics"].keys()
    tol = _metric_tolerances(merged["metrics"]["psnr"])
    for key, value in merged["metrics"].items():
        if "psnr" in key or "ssim" in key or "lpips" in key:
            kind = next(k for k in tol if k in key)
            assert sharded["metrics"][key] == pytest.approx(value, abs=tol[kind]), key
    assert math.isfinite(sharded["metrics"]["psnr"])
    for key in ("psnr", "ssim"):
        assert loaded["two_ranks_metrics"][key] == pytest.approx(merged["metrics"][key], abs=tol[key]), key
    # Resuming from nerfstudio_models/ (the pointer) on one process: every Gaussian, the next step.
    (ckpt,) = (sharded_run[0] / "shards").iterdir()
    assert loaded["resumed"] == {"start_step": int(ckpt.name.split("-")[1]) + 1, "num_points": merged["num_points"]}
    # ns-render's command line on the sharded run (before the merge): one frame per test view.
    assert len(list(loaded["frames"].rglob("*.jpg"))) == 2


# ---- landmark-grid on 2 ranks: nerfstudio's render path through the mailbox -------------------------
@pytest.mark.slow
def test_grid_live_view_is_the_model_render(micro_city, tmp_path):  # noqa: F811
    """A 2-rank landmark-grid run (branch parallel) serves nerfstudio's viewer from rank 0: the
    viewer's own render path (``RenderStateMachine._render_img``, driven on rank 0 without a browser)
    gets a view while the ranks train and one after the viewer's pause, rendered by both ranks'
    model-parallel forward; the paused view equals the one-process render of the run's saved shards
    (the paused model) for the viewer's camera.  Layout edits made with the viewer's controls reach
    both ranks (a rejected one on neither), and the edited view equals the one-process edited render."""
    from _live_viewer_rank import GRID_EDITS, GRID_MAX_RES, train_grid_with_live_viewer
    from nerfstudio.utils.eval_utils import eval_setup

    from landmark_plugin.distributed.launch import free_port, run_ranks
    from landmark_plugin.edits import LayoutEdits, apply_edits

    started = time.monotonic()
    records = run_ranks(
        train_grid_with_live_viewer, 2, tmp_path / "ranks", args=(str(micro_city), str(tmp_path / "out"), free_port()),
        timeout_s=120.0, start_method="forkserver", preload=("landmark_plugin.grid.trainer", "_live_viewer_rank"),
    )
    record = records[0]
    print(f"\n2-rank landmark-grid run with the live viewer: {time.monotonic() - started:.1f} s")
    assert not record["failures"], record["failures"]
    assert record["stand_in"] == ["MailboxNerf", "MailboxModel", "Model"], "the viewer sees a NeRF"
    training = record["while_training"]
    assert training["renders"] == 1, "the view was rendered by the ranks' per-step sync while they trained"
    assert "rgb" in training["keys"] and "gl_z_buf_depth" in training["keys"]
    assert record["step_after_view"] == record["step_paused"], "nothing trained while paused"
    assert [r["sync_state"] for r in records] == ["stopped", "stopped"], "the viewer's stop reached every rank"

    view = record["paused_view"]
    assert max(view["camera"]["width"], view["camera"]["height"]) == GRID_MAX_RES
    (config,) = (tmp_path / "out").glob("*/landmark-grid/live/config.yml")
    _, pipeline, _, _ = eval_setup(config, test_mode="inference")
    mine = _render(pipeline, _viewer_camera({"camera": view["camera"]}))
    torch.testing.assert_close(view["rgb"], mine, **COMPOSITE_TOL)
    assert view["rgb"].std() > 0.01, "the view is not blank"

    # The viewer's layout edits: shown, rejected alike on both ranks, installed on both.
    assert record["gui_layout_folders"] == ["appearance", "edit", "partition"]
    assert record["rejected"]["edits"]["ops"] == [] and "block 99 does not exist" in record["rejected"]["message"]
    assert record["installed"] == GRID_EDITS
    assert [r["field_edits"] for r in records] == [2, 2], "both ranks hold the viewer's edits"
    edited = record["edited_view"]
    assert edited["camera"] == view["camera"]
    apply_edits(pipeline.model, LayoutEdits.from_dict(GRID_EDITS))
    torch.testing.assert_close(edited["rgb"], _render(pipeline, _viewer_camera(edited)), **COMPOSITE_TOL)
    assert (edited["rgb"] - view["rgb"]).abs().max() > 1e-3, "the edits change the view"
