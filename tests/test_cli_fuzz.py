"""Every command, driven with wrong types, missing files, unknown models, out-of-range layers
and empty data (hypothesis): each ends with ONE clear error line and a non-zero exit, never a
traceback, and nothing already written is changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from mlsae import config as cfgmod
from mlsae.cli import COMMANDS, main
from mlsae.config import TrainConfig
from mlsae.kernels import IMPLS
from mlsae.sae import ARRANGEMENTS
from mlsae.train import train

TEXT = [f"Entry {i}: small models read plain text about {i % 7} topics." for i in range(120)]
CASES = 120


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny model, text, an empty text file, a finished run and a non-run folder."""
    root = tmp_path_factory.mktemp("fuzz")
    model = tiny_model("llama", n_layers=3)
    model.model.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    (root / "t.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXT))
    (root / "empty.jsonl").write_text("")
    (root / "not-a-run").mkdir()
    (root / "not-a-run" / "notes.txt").write_text("hello")
    train(TrainConfig(model=str(root / "model"), data=str(root / "t.jsonl"), out=str(root / "run"), expansion_factor=2,
                      k=4, tokens=128, tokens_per_step=64, micro_batch_tokens=64, ctx=24, device="cpu",
                      shuffle_buffer_mb=1, init_tokens=64), model=model)
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def bad_int(minimum: int):
    """Never a valid value: not a whole number, or below the setting's minimum."""
    return st.sampled_from(["abc", "1.5", "", "1e9x", str(minimum - 1), str(minimum - 7)])


BAD_FLOAT = st.sampled_from(["abc", "nan", "inf", "-1", ""])
BAD_CHOICE = st.sampled_from(["bogus", "", "MLSAE", "per_layer "])
MISSING = st.sampled_from(["./no/such/path", "/nonexistent/folder", "./missing.gguf"])


def bad_argument(command: str, root: Path):
    """One argument that must be refused, for ``command``: (flag, value...) tokens."""
    cls = COMMANDS[command][0]
    fields = {f.name for f in cfgmod.dataclasses.fields(cls)}
    options = []
    for name in sorted(fields):
        flag = "--" + name.replace("_", "-")
        if name in cfgmod.MINIMUM and name != "layers":
            options.append(bad_int(cfgmod.MINIMUM[name]).map(lambda v, flag=flag: [flag, v]))
        elif name in cfgmod.POSITIVE_FLOATS + cfgmod.NON_NEGATIVE_FLOATS:
            options.append(BAD_FLOAT.map(lambda v, flag=flag: [flag, v]))
        elif name in cfgmod.CHOICES:
            options.append(BAD_CHOICE.map(lambda v, flag=flag: [flag, v]))
        elif name == "device":
            options.append(st.sampled_from(["gpu9", "cuda:x", "tpu"]).map(lambda v: ["--device", v]))
    if "model" in fields:
        options.append(MISSING.map(lambda v: ["--model", v]))
        options.append(st.sampled_from(["99", "-1", "3"]).map(lambda v: ["--model", str(root / "model"), "--layers", v]))
        options.append(st.just(["--model", str(root / "model"), "--data", str(root / "empty.jsonl"), "--tokens", "10",
                                "--ctx", "24"]))
    if "data" in fields and command != "demo":
        options.append(MISSING.map(lambda v: ["--data", v]))
    if "cache" in fields:
        options.append(MISSING.map(lambda v: ["--cache", v]))
    if command in ("eval", "analyze"):
        options.append(st.sampled_from(["99", "-2"]).map(lambda v: ["--data", str(root / "t.jsonl"), "--layers", v])
                       if command == "eval" else st.just(["--data", str(root / "empty.jsonl")]))
    if command == "train":  # a finished run is never overwritten without --overwrite
        options.append(st.just(["--model", str(root / "model"), "--data", str(root / "t.jsonl"), "--out", str(root / "run"),
                                "--tokens", "64", "--ctx", "24"]))
    if command == "cache":
        options.append(st.just(["--model", str(root / "model"), "--data", str(root / "t.jsonl"), "--out", str(root / "run"),
                                "--tokens", "10", "--ctx", "24", "--dtype", "int8"]))
    options.append(st.sampled_from(["--no-such-flag", "--tokens"]).map(lambda v: [v]))
    return st.one_of(options)


@st.composite
def invocations(draw, root: Path):
    command = draw(st.sampled_from(sorted(COMMANDS)))
    argv = [command]
    if "run" in {f.name for f in cfgmod.dataclasses.fields(COMMANDS[command][0])}:
        argv.append(draw(st.sampled_from([str(root / "run"), str(root / "not-a-run"), str(root / "missing-run")])))
    argv += draw(bad_argument(command, root))
    if draw(st.booleans()) and command != "demo" and "--device" not in argv:  # sometimes a harmless extra setting beside the bad one
        argv += ["--device", "cpu"]
    return argv


def test_every_bad_invocation_is_one_line_and_harms_nothing(world, capsys, monkeypatch):
    import mlsae.assets

    def never(*args, **kwargs):
        raise AssertionError("a fuzz case reached the real model: every case must be refused early")

    monkeypatch.setattr(mlsae.assets, "smollm2_gguf", never)
    before = snapshot(world)
    seen = []

    @settings(max_examples=CASES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(invocations(world))
    def check(argv):
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
        err = capsys.readouterr().err
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]  # progress bars redraw with \r
        errors = [line for line in lines if "error:" in line]
        assert code not in (0, None), f"{argv} succeeded"
        assert "Traceback" not in err and "internal error" not in err, f"{argv}: {err[-500:]}"
        assert len(errors) == 1 and lines[-1] == errors[0], f"{argv}: {err[-500:]}"
        assert errors[0].startswith("mlsae"), errors[0]
        seen.append(argv[0])

    check()
    assert snapshot(world) == before  # nothing already written was changed
    assert set(seen) == set(COMMANDS)  # every command was driven
    print(f"\n[{len(seen)} bad invocations, each one clear line]")


def test_the_choices_checked_up_front_are_the_ones_the_code_knows():
    assert cfgmod.CHOICES["arch"] == tuple(ARRANGEMENTS)
    assert set(cfgmod.CHOICES["decoder_impl"]) == {"auto", *IMPLS}
