"""Expert parallelism on CPU (gloo), through tests/ep_worker.py under torchrun: the dispatch against one process,
engine steps under ZeRO-1/2 against one process, and the checkpoint that reshards across (world size, ep)."""
from __future__ import annotations

import glob
import os

import pytest
import torch

from conftest import REPO, torchrun_worker

pytestmark = pytest.mark.slow
WORKER = os.path.join(REPO, "tests", "ep_worker.py")


def worker(nproc: int, *args, **env) -> dict:
    return torchrun_worker(WORKER, nproc, *args, **env)


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_equals_one_process(world):
    """Outputs, input grads and expert grads (summed over the ranks holding the same experts) of the EP layer equal
    one process holding every expert, for each ep dividing the world, top-1 and top-2; experts no token picks get
    zero gradient, and at ep = 4 one rank receives no token at all."""
    out = worker(world, "dispatch")
    assert set(out) == {f"ep{ep}_top{k}" for ep in (1, 2, 4) if world % ep == 0 for k in (1, 2)}
    for case, ranks in out.items():
        for r, e in enumerate(ranks):
            assert e["y"] < 1e-5 and e["x_grad"] < 1e-5, (case, r, e)
            assert max(e["w_gate"], e["w_up"], e["w_down"]) < 1e-5, (case, r, e)  # relative to the largest grad
            assert e["empty_expert_grad"] == 0.0, (case, r, e)
    if world == 4:
        assert [e["received"] for e in out["ep4_top2"]][2] == 0  # experts 4, 5 live on EP rank 2, unpicked
        assert all(e["received"] > 0 for i, e in enumerate(out["ep4_top2"]) if i != 2)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_step_with_expert_parallel_equals_one_process(stage):
    """Two steps of the real engine (ep 2 on 2 ranks, grad accumulation 2, clipping, AdamW with decay) leave the
    weights of one process that trained on the whole global batch, and the same grad norms."""
    out = worker(2, "step", stage, 2)
    assert out["max_param_err"] < 2e-5, out
    assert out["norms"] == pytest.approx(out["ref_norms"], rel=1e-5)


@pytest.fixture(scope="module")
def saved_at_4_2(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ck42"))
    out = worker(4, "save", 2, 2, d, STEPS_A=2)
    assert "manifest.json" in out["saved"]
    return d


@pytest.mark.parametrize("world,ep,stage", [(4, 4, 2), (4, 1, 2), (2, 2, 2), (2, 1, 1), (2, 1, 0), (1, 1, 2)])
def test_checkpoint_saved_at_world4_ep2_resumes_on_other_topologies(saved_at_4_2, world, ep, stage):
    """Weights after resuming on another (world, ep, ZeRO stage) and training one more step equal one process that
    trained all three steps: the fp32 masters and both Adam moments came back for every expert."""
    out = worker(world, "load", stage, ep, saved_at_4_2, STEPS_B=1)
    assert out["resumed_at"] == 2 and out["max_param_err"] < 2e-5, out


def test_checkpoint_without_moments_is_caught(saved_at_4_2):
    """Negative control: the same resume with the Adam moments left out is far off."""
    out = worker(2, "load", 2, 2, saved_at_4_2, STEPS_B=1, SKIP_MOMENTS=1)
    assert out["max_param_err"] > 1e-3, out


def test_same_topology_resume_is_bit_exact(saved_at_4_2, tmp_path):
    """Resumed at step 2 on the same (4, 2) and saved at step 3 == saved at step 3 by an uninterrupted run:
    every fp32 master and moment tensor equal, bit for bit."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    worker(4, "save", 2, 2, straight, STEPS_A=3)
    worker(4, "load", 2, 2, saved_at_4_2, STEPS_B=1, SAVE_AFTER=resumed)
    files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(straight, "checkpoints", "step_00000003",
                                                                       "params_*.pt")))
    assert files
    for f in files:
        a = torch.load(os.path.join(straight, "checkpoints", "step_00000003", f), weights_only=True)
        b = torch.load(os.path.join(resumed, "checkpoints", "step_00000003", f), weights_only=True)
        assert a.keys() == b.keys()
        for key in a:
            for k in ("fp32", "exp_avg", "exp_avg_sq"):
                assert torch.equal(a[key][k], b[key][k]), (f, key, k)


@pytest.mark.parametrize("stage,ep", [(0, 1), (1, 1), (2, 2), (3, 1)])
def test_bad_steps_are_skipped_on_every_rank_and_a_streak_stops_the_run(stage, ep):
    """Through the trainer's train_step: a NaN loss on rank 1, then a loss spike on rank 0, skip the update on both
    ranks under every ZeRO stage (fp32 masters, Adam moments and the LR schedule unchanged, the skip counted); the
    next clean step applies; three skips in a row stop the run with the message."""
    ranks = worker(2, "guard", stage, ep)["ranks"]
    for r, out in enumerate(ranks):
        for case, reason in (("nan", "loss nan"), ("spike", "loss spike")):
            assert out[case]["unchanged"] and out[case]["sched_unchanged"], (stage, r, case, out)
            assert reason in ranks[1 if case == "nan" else 0][case]["reason"]
        assert (out["nan"]["skipped"], out["spike"]["skipped"]) == (1, 2)
        assert out["clean"]["reason"] is None and out["clean"]["changed"]
        assert "3 optimizer steps in a row were skipped" in out["stopped"]


def test_a_checkpoint_that_fails_to_write_is_not_published(tmp_path):
    """Rank 1's write fails as a full disk makes torch.save fail: both ranks stop with the file and the reason, the
    partial tag is removed, and the previous checkpoint stays the one a resume takes."""
    out = worker(2, "savefail", 2, 2, str(tmp_path / "run"))
    assert out["tags"] == ["latest", "step_00000001"] and out["latest"] == "step_00000001"
    assert "step_00000002 was not published" in out["message"] and "step_00000001, is kept" in out["message"]
    assert "params_r00001_000.pt: RuntimeError" in out["message"]
