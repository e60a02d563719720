"""Training across machines, on loopback: two real `accelerate launch --num_machines 2` processes
(machine ranks 0 and 1, gloo on CPU) follow the loss curves of one process with the same global
batch, only machine 0 writes logs, images and exports, and checkpoints resume on machines with or
without a shared out_dir."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common import checkpoint, load_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

# test_train_tokenizer's TINY with the GAN on from the first step (adaptive weight, LeCam, discriminator
# all exercised by the compared steps) and a GroupNorm discriminator: BatchNorm normalises each
# process's batch, so it cannot match one process with the whole batch (docs/distributed.md)
TOKENIZER = [
    "model.resolution=16", "model.ch=16", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
    "model.attn_resolutions=[8]", "model.z_channels=8", "model.norm_groups=8",
    "model.quantizer.codebook_size=16", "model.quantizer.code_dim=4", "model.quantizer.dead_code_patience=2",
    "loss.perceptual_weight=0", "loss.disc_start=0", "loss.disc_channels=8", "loss.disc_layers=1",
    "loss.disc_norm=group", "loss.lecam_weight=0.1",
    "data.source=synthetic:shapes?size=48",  # 3 global batches of 16 an epoch: 4 steps cross an epoch
    "train.checkpoint_every=2", "train.image_every=2", "train.log_every=2", "train.ema_decay=0.9",
    "train.eval_images=16", "train.eval_batch_size=16", "train.lr=1e-3",
]
PRIOR = ["model.dim=32", "model.depth=2", "model.heads=2", "model.class_dropout=0", "train.lr=3e-3",
         "train.warmup_steps=2", "train.log_every=2", "train.sample_every=1000", "train.checkpoint_every=2",
         "train.mixed_precision=no"]
LAUNCH_TIMEOUT = 300  # seconds; a run takes about 20 s on two busy cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_machines(command: str, per_machine: list[list[str]], logs: Path) -> None:
    """`accelerate launch --multi_gpu --num_machines 2 ... -m vqgan COMMAND ARGS` once per machine rank
    (one process each, over loopback), as on two real machines; fails with both processes' stderr."""
    port = _free_port()
    logs.mkdir(parents=True, exist_ok=True)
    # no GPU, even where there is one: two processes on one GPU is not what a test of machines means
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    procs = []
    for rank, args in enumerate(per_machine):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "vqgan", command, *args]
        with open(logs / f"machine{rank}.out", "w") as out, open(logs / f"machine{rank}.err", "w") as err:
            # a session of its own: on a timeout the launcher and the worker it started are killed together
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True))
    failures = []
    try:
        for rank, proc in enumerate(procs):
            try:
                code = proc.wait(LAUNCH_TIMEOUT)
            except subprocess.TimeoutExpired:
                code = "timeout"
            if code != 0:
                failures.append(f"machine {rank}: exit {code}\n{(logs / f'machine{rank}.err').read_text()[-4000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert not failures, "\n\n".join(failures)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_curves(one: list[dict], two: list[dict], rel: float = 1e-4, loose: tuple[str, ...] = ()) -> None:
    """Every logged value within `rel`; the `loose` keys within 10 * rel."""
    assert [m["step"] for m in two] == [m["step"] for m in one]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a:
            tol = 10 * rel if key in loose else rel
            assert b[key] == pytest.approx(a[key], rel=tol, abs=1e-6), (a["step"], key, a[key], b[key])


@pytest.mark.slow
def test_tokenizer_on_two_machines_without_shared_disk_matches_one_process(tmp_path):
    """2 machines x batch 8 follow 1 process x batch 16 through a GAN step with the adaptive weight,
    LeCam and dead-code revival; each machine writes to its own out_dir (as its own disk), and a run
    stopped after its step-2 checkpoint resumes on both."""
    from stage1_tokenizer.train import TokenizerTrainConfig, train

    train(load_config(TokenizerTrainConfig, None, TOKENIZER + ["train.steps=4", "train.batch_size=16",
                                                               f"train.out_dir={tmp_path / 'one'}"]))
    disks = [tmp_path / "machine0", tmp_path / "machine1"]
    args = [[*TOKENIZER, "train.batch_size=8", f"train.out_dir={disk}"]
            for disk in disks]
    launch_two_machines("train-tokenizer", [[*a, "train.steps=2"] for a in args], tmp_path / "logs_a")
    launch_two_machines("train-tokenizer", [[*a, "train.steps=4", "--resume", "auto"] for a in args],
                        tmp_path / "logs_b")

    main, other = disks
    assert "resumed from" in (tmp_path / "logs_b" / "machine0.out").read_text()
    # the adaptive weight's GAN gradient passes the discriminator's LeakyReLUs, whose kinks turn rounding
    # into small jumps: one process with 2 threads instead of 1 moves it by 2.5e-4 at step 4 too
    assert_same_curves(read_metrics(tmp_path / "one"), read_metrics(main), loose=("gan/weight",))
    assert "loss/disc" in read_metrics(main)[0] and "gan/weight" in read_metrics(main)[0]
    assert json.loads((main / "final_metrics.json").read_text())["num_processes"] == 2
    assert (main / "tokenizer" / "model.safetensors").is_file() and (main / "images" / "final.png").is_file()
    # machine 1 holds only its own whole copy of each checkpoint: weights, optimizers, registered state, its RNG
    assert sorted(p.name for p in other.iterdir()) == ["checkpoints"]
    for disk, rank in ((main, 0), (other, 1)):
        assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
        files = {p.name for p in (disk / "checkpoints" / "step_00000004").iterdir()}
        assert {"model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin",
                f"random_states_{rank}.pkl"} <= files, files
        assert f"random_states_{1 - rank}.pkl" not in files


@pytest.mark.slow
def test_prior_on_two_machines_with_shared_disk_matches_one_process(tiny_stage2, tmp_path):
    """2 machines x batch 4 follow 1 process x batch 8 (4 steps cross an epoch of 32 items); both write
    one checkpoint directory on the shared out_dir."""
    from stage2_prior.train import PriorRunConfig, train

    data = [f"data.codes={tiny_stage2 / 'codes'}", f"data.tokenizer={tiny_stage2 / 'tokenizer'}", "train.steps=4"]
    train(load_config(PriorRunConfig, None, PRIOR + data + ["train.batch_size=8", f"train.out_dir={tmp_path / 'one'}"]))
    shared = tmp_path / "shared"
    args = [*PRIOR, *data, "train.batch_size=4", f"train.out_dir={shared}"]
    launch_two_machines("train-prior", [args, args], tmp_path / "logs")

    assert_same_curves(read_metrics(tmp_path / "one"), read_metrics(shared))
    assert json.loads((shared / "final_stats.json").read_text())["num_processes"] == 2
    assert (shared / "prior" / "model.safetensors").is_file() and (shared / "samples" / "final.png").is_file()
    # one checkpoint per step holding both processes' RNG states; no temporary directory or marker left
    assert sorted(p.name for p in (shared / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    files = {p.name for p in (shared / "checkpoints" / "step_00000004").iterdir()}
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"} <= files


def test_resume_refuses_processes_that_found_different_checkpoints(tmp_path, monkeypatch):
    (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)
    # what two machines with their own disks would answer when one lost its newest checkpoint
    monkeypatch.setattr(checkpoint, "_all_gather_objects", lambda answer: [answer, ("step_00000002", None)])
    with pytest.raises(RuntimeError, match="process 0: step_00000004, process 1: step_00000002"):
        checkpoint.find_checkpoint(tmp_path, "auto")
    monkeypatch.setattr(checkpoint, "_all_gather_objects", lambda answer: [answer, (None, "--resume x: no such")])
    with pytest.raises(FileNotFoundError, match="process 1: --resume x: no such"):
        checkpoint.find_checkpoint(tmp_path, "auto")
    monkeypatch.setattr(checkpoint, "_all_gather_objects", lambda answer: [answer, answer])
    assert checkpoint.find_checkpoint(tmp_path, "auto") == tmp_path / "checkpoints" / "step_00000004"


def test_cpu_backend_only_for_a_multi_process_launch_without_a_device(monkeypatch):
    from common import distributed

    monkeypatch.setattr(distributed, "_has_device_backend", lambda: False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.use_cpu_backend()  # a plain `python -m vqgan ...`
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.use_cpu_backend()      # torchrun / accelerate launch --multi_gpu on CPU machines
    monkeypatch.setattr(distributed, "_has_device_backend", lambda: True)
    assert not distributed.use_cpu_backend()  # GPUs: Accelerate picks NCCL itself
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        distributed.launched_world_size()
