"""Data parallel (DDP) and FSDP2 over 2 CPU processes (gloo), launched with torchrun as on a cluster.

The equality checks give both ranks the same batches and the same random stream (`data.shard=false`,
`callbacks.rng_state.per_rank=false`): the averaged gradient of two identical halves is the single-process
gradient, so the losses must match a single-process run of the same batch, and the weights must land no
further from it than rounding alone moves them. That checks sharding, gathering, clipping, the sharded
optimizer and checkpoints apart from the noise, which differs by rank in normal runs (identical halves
do not check that gradients are reduced at all: that is torch's DDP / FSDP code). Sharding of the data
itself is checked without processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_tmd.data import datamodule as dm
from lightning_tmd.data.shapes import ShapesDataset

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("train/vsd", "train/critic_loss")
SAME_ON_EVERY_RANK = ["data.shard=false", "callbacks.rng_state.per_rank=false"]
# Adam turns the sign of a near-zero gradient (e.g. convolutions behind GroupNorm in the discriminator, where
# the summation order alone flips it) into an lr-sized step; a larger eps keeps such steps as small as their
# gradients, so the comparison below checks the computation rather than that amplification.
ADAM_EPS = ["stage.module.student.optim.eps=1e-4", "stage.module.critic.optim.eps=1e-4"]


def stage2_overrides(teacher: Path, student: Path, *extra: str) -> list[str]:
    return ["experiment=shapes_smoke_dmd", f"stage.module.teacher_ckpt={teacher}",
            f"stage.module.student_ckpt={student}", "callbacks.samples.every_n_steps=0", "trainer.max_steps=6",
            "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_train_steps=3", *ADAM_EPS, *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(overrides: list[str], out: Path) -> None:
    """`torchrun --nproc_per_node 2 -m lightning_tmd.train ...`, each rank composing the config itself."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "lightning_tmd.train", *overrides, "trainer.devices=2", f"hydra.run.dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def logged(run_dir: Path) -> dict[str, dict[int, float]]:
    """Scalars of a run's TensorBoard events: {tag: {step: value}}."""
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in LOSSES if tag in events.Tags()["scalars"]}


def assert_same_losses(ours: dict, reference: dict, steps: range, rtol: float = 1e-4) -> None:
    for tag in LOSSES:
        common = [s for s in steps if s in ours[tag] and s in reference[tag]]
        assert common, (tag, ours[tag], reference[tag])
        got, want = ours[tag], reference[tag]
        for step in common:
            assert got[step] == pytest.approx(want[step], rel=rtol, abs=1e-6), (tag, step, got, want)


def weights(path: Path) -> dict[str, torch.Tensor]:
    """Trained weights of a stage-2 checkpoint: a file, or a sharded (DCP) folder consolidated."""
    if path.is_dir():
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        state = _load_distributed_checkpoint(path)["state_dict"]
    else:
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(("student.", "critic."))}


def distance(ours: dict, reference: dict) -> float:
    """Largest element-wise difference of two sets of weights.

    Runs that are not bit-identical differ by more than float32 rounding: weights with near-zero
    gradients (e.g. convolutions behind GroupNorm in the discriminator, ~1e-8) change gradient sign with
    ~1e-7 input differences, and Adam turns any sign into an lr-sized step.
    """
    assert ours.keys() == reference.keys()
    return max((ours[k].float() - reference[k].float()).abs().max().item() for k in ours)


def one_process_run(teacher: Path, student: Path, out: Path, threads: int) -> Path:
    from lightning_tmd.train import train

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        train(compose_train(stage2_overrides(teacher, student), out))
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture(scope="module")
def reference_run(smoke_checkpoint, smoke_student_checkpoint, tmp_path_factory) -> Path:
    """Six stage-2 iterations (student at 0 and 5) in one process, one thread (as each rank)."""
    return one_process_run(smoke_checkpoint, smoke_student_checkpoint, tmp_path_factory.mktemp("reference"), 1)


@pytest.fixture(scope="module")
def rounding_noise(reference_run, smoke_checkpoint, smoke_student_checkpoint, tmp_path_factory) -> float:
    """How far the same run lands with two threads instead of one: the float32 summation order alone."""
    other = one_process_run(smoke_checkpoint, smoke_student_checkpoint, tmp_path_factory.mktemp("two_threads"), 2)
    return distance(weights(other / "checkpoints" / "last.ckpt"), weights(reference_run / "checkpoints" / "last.ckpt"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp_offload"])
def test_two_processes_match_one_and_resume_exactly(strategy, reference_run, rounding_noise, smoke_checkpoint,
                                                    smoke_student_checkpoint, tmp_path):
    extra = [f"strategy={strategy.removesuffix('_offload')}", *SAME_ON_EVERY_RANK]
    if strategy.startswith("fsdp"):  # fp32 on CPUs; GPUs gather bf16 weights
        extra += ["trainer.precision=32-true", "trainer.strategy.param_dtype=null"]
    if strategy == "fsdp_offload":  # every part's shards, gradients and optimizer states in host memory
        extra += ["trainer.strategy.offload=[teacher,student,critic]"]
    overrides = stage2_overrides(smoke_checkpoint, smoke_student_checkpoint, *extra)
    torchrun(overrides, tmp_path / "full")
    full, reference = logged(tmp_path / "full"), logged(reference_run)
    assert_same_losses(full, reference, range(0, 7))
    checkpoints = tmp_path / "full" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_dir() == strategy.startswith("fsdp")  # FSDP saves one shard per rank
    # no further from the one-process run than that run is from itself with another thread count
    gap = distance(weights(checkpoints / "last.ckpt"), weights(reference_run / "checkpoints" / "last.ckpt"))
    assert gap <= max(rounding_noise, 1e-6), (gap, rounding_noise)

    # resume from iteration 3: iterations 4-6 repeat the uninterrupted run's
    torchrun([*overrides, f"ckpt_path={checkpoints / 'step_0000003.ckpt'}"], tmp_path / "resumed")
    assert_same_losses(logged(tmp_path / "resumed"), full, range(4, 7), rtol=1e-6)
    resumed = weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert distance(resumed, weights(checkpoints / "last.ckpt")) == 0


def test_ranks_read_disjoint_shares_of_the_single_process_global_batch(monkeypatch):
    dataset = ShapesDataset(64, frames=2, size=8, max_objects=1)
    single = list(iter(dm.ResumableLoader(dataset, batch_size=8, seed=3).sampler))
    shares = []
    for rank in range(2):
        monkeypatch.setattr(dm, "process_rank", lambda rank=rank: (rank, 2))
        loader = dm.ResumableLoader(dataset, batch_size=4, seed=3)
        assert len(loader) == 8  # 64 clips / (4 per rank x 2 ranks)
        shares.append(list(iter(loader.sampler)))
    assert not set(shares[0]) & set(shares[1])
    for step in range(8):  # global batch `step` of the ranks == batch `step` of one process with batch 8
        assert shares[0][4 * step:4 * step + 4] + shares[1][4 * step:4 * step + 4] == single[8 * step:8 * step + 8]



def test_the_stage1_derivative_keeps_fp32_times_and_precision_under_fsdp_bf16(tmp_path):
    """FSDP2 with bf16 weights over 2 ranks: the flow head receives the times as given (t = 0.999 is not
    rounded to 1.0), and with the head gathered in fp32 the finite difference equals the fp32 one; under
    bf16-mixed alone the derivative runs in fp32 too, while taking it inside autocast is far off."""
    out = tmp_path / "fd.md"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "experiments/fd_precision.py", "--tiny", "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    measured = json.loads(out.with_suffix(".json").read_text())
    errors = {row["setting"]: row["relative_error_vs_fp32_fd"] for row in measured["rows"]}
    assert measured["world_size"] == 2
    assert errors["bf16-mixed, derivative in fp32 (now)"] <= 1e-2
    assert errors["FSDP2 bf16, head gathered in fp32"] <= 1e-2
    assert errors["bf16-mixed, difference inside autocast (before)"] > 0.1
    for dtype, s in measured["head_times"].values():
        assert dtype in ("torch.float32", "torch.float64") and 0.999 in s and 0.605 + 5e-3 in s


def test_empty_nets_read_from_the_folder_hold_their_shards_only_and_equal_a_one_process_load(tmp_path):
    """model.meta_init over 2 ranks: stage 2's nets (teacher, student and its EMA, critic, discriminator) built
    empty, sharded (the critic offloaded to host memory), then read from a Wan folder: every weight equals the
    one-process load, and no rank held more than its shards plus one block (counted bytes)."""
    out = tmp_path / "loading.md"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "experiments/sharded_loading.py", "--tiny", "--offload", "critic", "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 2 and rows[0]["wan_nets"] == ["critic.net", "student.ema.module.wan", "student.net.wan",
                                                      "teacher.net"]
    for row in rows:  # the critic (and its discriminator) kept in host memory: FSDP2's CPU offload policy
        assert row["offloaded_units"] and all(name.startswith("critic.") for name in row["offloaded_units"])
        assert {"critic.net", "critic.discriminator"} <= set(row["offloaded_units"]) and row["offloaded_on_cpu"]
        assert row["mismatched"] == []
        assert row["empty_bytes_built"] > 0.8 * row["model_bytes"]  # the Wan nets were never built whole
        assert row["largest_full_tensor_bytes"] <= row["block_bytes"]
        assert row["peak_bytes"] <= row["bound_bytes"] and row["shard_bytes"] < 0.55 * row["model_bytes"]


def test_two_processes_generate_the_kd_pairs_each_its_share_then_train(smoke_checkpoint, tmp_path):
    from hydra.utils import instantiate

    pairs = ["experiment=shapes_kd", "model=wan_smoke", "data=shapes_smoke", "text=vocab", "text.encoder.dim=16",
             "text.encoder.max_length=16", "data=teacher_pairs", "data.speed=0.06", "data.frames=4", "data.size=16",
             "data.batch_size=2", "data.val_batch_size=2", f"stage.module.teacher_ckpt={smoke_checkpoint}",
             "data.num_pairs=8", "data.num_val_pairs=4", "data.steps=2", "data.generate_batch_size=2"]
    torchrun([*pairs, f"data.cache_dir={tmp_path / 'two'}", "trainer.max_steps=2", "trainer.val_check_interval=2",
              "callbacks.samples.every_n_steps=0"], tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    two = instantiate(compose_train([*pairs, f"data.cache_dir={tmp_path / 'two'}"], tmp_path / "a").data)
    assert sorted(p.name for p in two.cache_folder().iterdir()) == [*(f"train_{k:05d}.safetensors" for k in range(4)),
                                                                   "val_00000.safetensors", "val_00001.safetensors"]
    one = instantiate(compose_train([*pairs, f"data.cache_dir={tmp_path / 'one'}"], tmp_path / "b").data)
    assert one.generate_share() == 6  # the same pairs from one process
    two.setup("fit"), one.setup("fit")
    for split in ("train", "val"):
        for name in ("noise", "video"):
            torch.testing.assert_close(two.pairs[split].read()[name], one.pairs[split].read()[name], rtol=1e-4,
                                       atol=1e-5)
