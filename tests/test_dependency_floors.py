"""Every dependency's declared floor is tested: a fresh virtual environment with each one pinned
to the lowest version pyproject.toml allows runs the model, evaluation and training tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def floor_pins() -> list[str]:
    """``name==floor`` for every ``name>=floor`` requirement, the test extras included."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    pins = []
    for req in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)>=([0-9.]+)", req)
        assert match, f"{req}: every dependency is declared as name>=floor, so that its floor can be tested"
        pins.append(f"{match[1]}=={match[2]}")
    return pins


def test_every_requirement_has_a_floor():
    pins = floor_pins()
    assert any(p.startswith("torch==") for p in pins) and any(p.startswith("transformers==") for p in pins)


@pytest.mark.skipif(
    os.environ.get("CI") != "true" and not os.environ.get("MLSAE_FLOOR_TEST"),
    reason="installs every dependency at its floor in a new environment (a few minutes): CI runs it; "
    "MLSAE_FLOOR_TEST=1 runs it here",
)
def test_the_declared_floors_pass_the_model_tests(tmp_path):
    (tmp_path / "floors.txt").write_text("\n".join(floor_pins()) + "\n")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--only-binary=:all:", "-c", str(tmp_path / "floors.txt"), "-e", f"{ROOT}[test]"],
        capture_output=True, text=True, timeout=1200,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    frozen = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True).stdout.lower()
    for pin in floor_pins():
        name, version = pin.lower().split("==")
        assert re.search(rf"^{re.escape(name).replace('_', '[-_]')}==({re.escape(version)}(\.0)*)(\+\S+)?$", frozen, re.M), pin
    tests = ["tests/test_model.py", "tests/test_evaluate.py", "tests/test_train.py", "tests/test_sae.py", "tests/test_hub.py",
             "tests/test_serve.py", "tests/test_serve_browser.py", "tests/test_serve_load.py"]
    run = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:]
    print(f"\n[at the floors ({', '.join(floor_pins())}): {run.stdout.strip().splitlines()[-1]}]")
