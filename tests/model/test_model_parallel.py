"""Model parallelism on 2 gloo processes equals the single model (see parallel_worker.py):
TP=2 gives the same logits, loss and gradients as TP=1 for every position method, with 12
heads (6 per rank: non-power-of-two, the slope-slicing trap) and 16 heads; PP=2 gives the same
loss and gradients, the tied embedding's copies start equal on both stages."""

import json
import subprocess
from pathlib import Path

import pytest

from helpers import launch

from .model_helpers import POSITIONS

WORKER = Path(__file__).with_name("parallel_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    procs = launch([str(WORKER), str(tmp)], 2, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = [p.communicate(timeout=600)[0] for p in procs]
    out = []
    for r in range(2):
        path = tmp / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no result:\n{logs[r][-4000:]}"
        res = json.loads(path.read_text())
        assert "error" not in res, f"rank {r} failed:\n{res.get('error')}"
        out.append(res)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("heads", [12, 16])
@pytest.mark.parametrize("position", POSITIONS)
def test_tp2_matches_tp1(results, position, heads):
    for rank, res in enumerate(results):
        case = res[f"tp-{position}-{heads}"]
        assert case["n_grads"] > 0
        assert case["logits"] < 1e-5, (rank, case)
        assert case["loss"] < 1e-5, (rank, case)
        assert case["grads"] < 1e-4, (rank, case)


@pytest.mark.slow
@pytest.mark.parametrize("position", POSITIONS)
def test_pp2_matches_pp1(results, position):
    for rank, res in enumerate(results):
        case = res[f"pp-{position}"]
        assert case["n_grads"] > 0 and case["tied_init_equal"], (rank, case)
        assert case["loss"] < 1e-5, (rank, case)
        assert case["grads"] < 1e-4, (rank, case)
