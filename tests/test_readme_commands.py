"""The README's commands, run as a user runs them: from the repository root, where Python puts the
root first on sys.path (a root-level name that shadows an installed package breaks exactly these).

Each `python -m bench.*` command the README gives is run from the root at its smallest setting by the
bench's own test, named here; a README that names a bench not listed here fails, so the README cannot
give an untested command. `make demo` and `make test` run from the root in CI, in a pinned and a
newest-releases venv; the demo's command also runs below."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
ENV.pop("TRITON_INTERPRET", None)  # as a user's shell has it: the commands set up what they need

# Each bench the README gives -> the test file that runs it from the repository root (cwd=ROOT),
# at its smallest setting.
RUN_BY = {
    "bench.shift": "test_bench_shift.py",  # python -m bench.shift --quick
    "bench.gpu_check": "test_bench_gpu_check.py",  # python -m bench.gpu_check --dry-run
    "bench.meta_effect": "test_bench_meta_effect.py",  # python -m bench.meta_effect --quick --tasks synthetic
}


def readme_bench_modules() -> set[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return set(re.findall(r"python -m (bench\.\w+)", f.read()))


def test_every_bench_the_readme_gives_is_run_from_the_root_by_a_test():
    unknown = readme_bench_modules() - set(RUN_BY)
    assert not unknown, f"README gives {sorted(unknown)}, which no test runs: run it from the root in a test, list it in RUN_BY"
    for module, test_file in RUN_BY.items():
        with open(os.path.join(ROOT, "tests", test_file)) as f:
            text = f.read()
        assert f'"-m", "{module}"' in text and "cwd=ROOT" in text, f"{test_file} does not start {module} from the root"


def _run(args, tmp_path):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(args)} from the repository root failed:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_make_demo_command_runs_from_the_repository_root(tmp_path):
    """What `make demo` runs (fewer steps), started in the root: the first command of the README."""
    r = _run(["-m", "metarm_fast.cli", "train", "--method", "metarm", "--max-steps", "2", "--no-progress",
              "--output-dir", str(tmp_path / "demo")], tmp_path)
    assert "meta reward gap" in r.stdout
    assert os.path.isfile(tmp_path / "demo" / "model.safetensors")
