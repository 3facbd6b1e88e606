"""Hard faults: `mlsae train` killed with SIGKILL at random points, again and again, resumes to
the result of an uninterrupted run, and its last good checkpoint always loads."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from mlsae.activations import write_cache
from mlsae.checkpoint import latest, read_progress
from mlsae.errors import MlsaeError
from mlsae.text import pack_windows

TEXT = [f"Record {i}: the river rose {i % 9} feet while {i * 3} boats waited at the dock." for i in range(300)]
KILLS = int(os.environ.get("MLSAE_FAULT_KILLS", "8"))  # more for a longer soak: MLSAE_FAULT_KILLS=40


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    model = tiny_model("llama", n_layers=3, seed=1)
    folder = tmp_path_factory.mktemp("faults") / "cache"
    write_cache(model, pack_windows(TEXT, model.tokenizer, 32), folder, tokens=1500, shard_tokens=400)
    return folder


def command(cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "mlsae.cli", "train", "--cache", str(cache), "--out", str(out), "--tokens", "16384",
        "--expansion-factor", "8", "-k", "4", "--tokens-per-step", "64", "--micro-batch-tokens", "32",
        "--checkpoint-tokens", "64", "--lr", "3e-3", "--init-tokens", "256", "--shuffle-buffer-mb", "1",
        "--device", "cpu", "--ctx", "32", *extra,
    ]


def last_step(run: Path) -> int:
    """The last step in the run's log, reading past a torn last line."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return -1
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return -1


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def test_sigkill_at_random_points_resumes_bit_identical(tmp_path, cache):
    done = subprocess.run(command(cache, tmp_path / "reference"), env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = load_file(str(tmp_path / "reference" / "sae.safetensors"))

    rng = random.Random(1234)
    run = tmp_path / "run"
    kills, progress, total_steps = 0, [], 16384 // 64
    while kills < KILLS:
        try:
            resumable = latest(run) is not None
        except MlsaeError:
            resumable = False
        proc = subprocess.Popen(command(cache, run, "--resume" if resumable else "--overwrite"), env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # kill once the log passes a random step ahead of the last kill, a random few ms later:
        # inside a step, a checkpoint write or the log's own write
        before = max(last_step(run), 0)  # the new process must log past this before it is killed
        room = (total_steps - 1 - before) // (KILLS - kills)
        target = before + rng.randint(1, max(1, room))
        while proc.poll() is None and last_step(run) < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.005))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            pytest.fail("the run finished before it could be killed")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        kills += 1
        try:
            folder = latest(run)  # whatever the kill interrupted, the newest complete checkpoint loads
            load_file(str(folder / "sae.safetensors"))
            load_file(str(folder / "trainer.safetensors"))
            progress.append(read_progress(folder)["tokens"])
        except MlsaeError as e:
            assert "holds no checkpoint" in str(e), str(e)  # killed before the first checkpoint
            progress.append(0)
    final = subprocess.run(command(cache, run, "--resume" if progress and max(progress) else "--overwrite"), env=env(),
                           capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    result = load_file(str(run / "sae.safetensors"))
    assert result.keys() == reference.keys() and all(torch.equal(result[k], reference[k]) for k in reference)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(len(steps))) and steps[-1] == 16384 // 64  # each step logged once, none torn
    print(f"\n[{kills} SIGKILLs survived; checkpoints at {progress} tokens when killed]")
    assert progress == sorted(progress) and max(progress) > 0  # the kills did land during training
