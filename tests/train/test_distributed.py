"""Data-parallel training: two gloo processes on CPU match one process on the same global batch.

The exact-match test uses a GroupNorm model (tests/tiny_models.py): with BatchNorm each
rank would normalise its own half-batch and the runs would differ by design.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from edgederm.runtime.preprocess import PreprocessConfig  # noqa: E402
from edgederm.data import read_image_folder  # noqa: E402
from edgederm.train import TrainConfig, train  # noqa: E402
from tests.tiny_models import tiny_net  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no gloo backend")

SIZE = 32
CONFIG: dict[str, Any] = dict(model="tiny_net", epochs=2, batch_size=16, lr=3e-3, seed=7, threads=1, augment=True,
              model_kwargs={"img_size": SIZE, "width": 8})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, report = train(data, TrainConfig(**CONFIG), out_dir=Path(out) / "ckpt", model_factory=tiny_net,
                              say=lambda m: None)
        np.savez(Path(out) / f"rank{rank}.npz", step_losses=np.array(report["step_losses"]),
                 rank_samples=report["rank_samples"],
                 **{k: v.numpy() for k, v in model.state_dict().items()})
    finally:
        # Both ranks reach the end before either tears its group down: a rank that exits
        # while the other is still inside gloo can abort it (seen once: SIGABRT, "terminate
        # called without an active exception" in rank 1).
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from edgederm.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("ddp_data")
    # 60 images, 20% validation -> 48 training images = 3 full global batches of 16
    generate_dataset(root, n_per_class=20, size=48, seed=4)
    return read_image_folder(root, PreprocessConfig(input_size=(SIZE, SIZE)))


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(data, tmp_path, record_property):
    import torch.multiprocessing as mp

    single, report = train(data, TrainConfig(**CONFIG), model_factory=tiny_net, say=lambda m: None)
    mp.start_processes(_worker, args=(2, _free_port(), data, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    single_losses = np.array(report["step_losses"])
    assert len(single_losses) == 6  # 2 epochs x 3 steps
    for r in ranks:
        assert np.allclose(r["step_losses"], single_losses, rtol=1e-5, atol=1e-6), (r["step_losses"], single_losses)
    weight_diff = max(float(np.abs(ranks[0][k] - v.numpy()).max()) for k, v in single.state_dict().items())
    rank_diff = max(float(np.abs(ranks[0][k] - ranks[1][k]).max()) for k in single.state_dict())
    record_property("figure:ddp_vs_single_max_loss_rel_diff",
                    float(np.max(np.abs(ranks[0]["step_losses"] - single_losses) / single_losses)))
    record_property("figure:ddp_vs_single_max_weight_diff", weight_diff)
    # each rank trained on its half of every global batch, not on the whole batch
    assert [int(r["rank_samples"]) for r in ranks] == [48, 48] and report["rank_samples"] == 96
    assert rank_diff == 0.0  # DDP keeps the replicas identical
    assert weight_diff <= 1e-5
    # rank 0 alone wrote the checkpoint and the metrics, once per epoch
    history = json.loads((tmp_path / "ckpt" / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert json.loads((tmp_path / "ckpt" / "training_state" / "state.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_torchrun_runs_the_trainer_module(tmp_path, record_property):
    """`torchrun --standalone --nproc_per_node=2 -m edgederm.train ...` end to end on a registered model."""
    from edgederm.data.synthetic import generate_dataset

    generate_dataset(tmp_path / "data", n_per_class=4, size=128, seed=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "edgederm.train",
           str(tmp_path / "data"), "--model", "hifuse_tiny", "--out", str(tmp_path / "ckpt"), "--epochs", "1",
           "--batch-size", "4", "--threads", "1", "--device", "cpu", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("checkpoint written to") == 1  # rank 0 reports, rank 1 stays quiet
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["world_size"] == 2 and np.isfinite(report["history"][0]["train_loss"])
    assert (tmp_path / "ckpt" / "model.safetensors").is_file() and (tmp_path / "ckpt" / "metrics.csv").is_file()
