"""A real one-node SLURM (`slurm`) and a two-node one (`slurm2`: n1 and n2 on this machine, its
own directory and ports) for the tests, each started once per session by slurm/local_cluster.sh.

Tests skip only where the daemons cannot start here (the script exits 3: not root, or the
packages are missing and cannot be installed); any other start failure is a test error with
the daemons' log. Jobs are polled through `scontrol` (not `sbatch --wait`, which sleeps 2, 8, 32 s).
"""

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
# States after which a job will not run again (a requeued job passes through PENDING instead).
VOCAB = 4096  # configs/tiny_*.yaml
VALID_FRACTION = 0.05
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class Slurm:
    """Thin client over the SLURM commands, with the environment the tests need."""

    def __init__(self, env: dict[str, str]):
        self.env = env

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, cwd=REPO)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout

    def sbatch(self, *args: str) -> int:
        return int(self.run("sbatch", "--parsable", *args).strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once forgotten."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}

    def node(self) -> str:
        return self.run("sinfo", "-h", "-o", "%n").split()[0]

    def wait(self, job_id: int, timeout: float, until=None) -> dict[str, str]:
        """Poll every 0.5 s until the job ends (or `until(info)` holds); fail after `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info and (until(info) if until else info["JobState"] in FINAL):
                return info
            time.sleep(0.5)
        self.run("scancel", str(job_id), check=False)
        pytest.fail(f"job {job_id} not done after {timeout} s: {self.job(job_id)}")


def cluster(nodes: int):
    """Start the cluster of `nodes` nodes (idempotent), check that its nodes and accounting are up
    (one line from `status`, instead of a test failing later on an empty `sacct`), yield a
    client, and stop it again if this session started it."""
    # jobs run with --export=ALL: leave out what an in-process distributed test may have set
    leaked = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_CONF")
    env = {k: v for k, v in os.environ.items() if k not in leaked}
    script = [str(SCRIPT), "--nodes", str(nodes)]
    was_up = subprocess.run([*script, "status"], env=env, capture_output=True).returncode == 0
    t0 = time.monotonic()
    out = subprocess.run([*script, "start"], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode == 3:
        pytest.skip(f"no SLURM on this machine: {out.stderr.strip()}")
    if out.returncode != 0:
        pytest.fail(f"slurm/local_cluster.sh start failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    status = subprocess.run([*script, "status"], env=env, capture_output=True, text=True)
    if status.returncode != 0:
        pytest.fail(status.stdout.strip())
    env["SLURM_CONF"] = subprocess.run(
        [*script, "env"], env=env, capture_output=True, text=True, check=True
    ).stdout.split("=", 1)[1].strip()
    print(f"SLURM ({nodes} node(s)) ready in {time.monotonic() - t0:.1f} s ({'was running' if was_up else 'started'})")
    yield Slurm(env)
    if not was_up:
        subprocess.run([*script, "stop"], env=env, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def slurm():
    yield from cluster(1)


@pytest.fixture(scope="session")
def slurm2():
    """The two-node cluster: nodes n1 and n2 (two slurmd on 127.0.0.1, sharing the cores)."""
    yield from cluster(2)


@pytest.fixture(scope="session")
def corpus_and_tokenizer(tmp_path_factory) -> tuple[list[Path], Path]:
    """The embedded default corpus (0.6 MB, 3 inputs) and a tokenizer of the tiny configs' vocab."""
    from data_prep.corpus import build_default_corpus
    from data_prep.train_tokenizer import train_tokenizer

    corpus = build_default_corpus(tmp_path_factory.mktemp("corpus"), max_mb=0.6)
    return corpus, train_tokenizer(corpus, VOCAB, tmp_path_factory.mktemp("tok") / "tok", sample_mb=2)


@pytest.fixture(scope="session")
def local_data(corpus_and_tokenizer, tmp_path_factory) -> Path:
    """The local launcher's output: the reference for the SLURM launcher and the training data."""
    from data_prep.preprocess import preprocess

    corpus, tok = corpus_and_tokenizer
    out = tmp_path_factory.mktemp("data_local")
    preprocess(corpus, tok, out, workers=1, valid_fraction=VALID_FRACTION, quiet=True)
    return out

