"""``python -m nnunet_logonet.benchmark.path_balance``: how evenly LoGoNet's paths fill the two workers."""
from __future__ import annotations

import pytest
import torch

from nnunet_logonet.benchmark import path_balance
from nnunet_logonet.benchmark.path_balance import Job, greedy_finish
from nnunet_logonet.network.logonet import LoGoNet
from nnunet_logonet.network.presets import arch_kwargs_for_preset

STRIDES = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]


def test_greedy_schedule_of_independent_jobs():
    """Two workers, list order: 5 | 3 then 3 on the worker free at 3, 2 at 5 on the other."""
    jobs = [Job("a", 5.0), Job("b", 3.0), Job("c", 3.0), Job("d", 2.0)]
    assert greedy_finish(jobs) == 7.0  # a 0-5, b 0-3, c 3-6, d 5-7
    assert greedy_finish(jobs, workers=1) == 13.0
    assert greedy_finish([]) == 0.0


def test_a_job_waits_for_what_it_needs_and_goes_first_once_ready():
    """``final`` (first in the list) starts when its inputs end, ahead of the jobs after it."""
    jobs = [Job("final", 4.0, ("stem", "body")), Job("stem", 3.0), Job("body", 1.0), Job("x", 2.0), Job("y", 2.0)]
    # stem 0-3, body 0-1, x 1-3 (final not ready), final 3-7 on the first worker free at 3, y 3-5
    assert greedy_finish(jobs) == 7.0
    # a worker with nothing ready waits for the earliest input to end
    assert greedy_finish([Job("b", 1.0, ("a",)), Job("a", 2.0)]) == 3.0


@pytest.mark.parametrize("jobs", [[Job("a", 1.0, ("b",)), Job("b", 1.0, ("a",))],
                                  [Job("a", 1.0), Job("a", 2.0)],
                                  [Job("a", 1.0, ("nothing",))]])
def test_impossible_job_lists_are_refused(jobs):
    with pytest.raises(ValueError, match="cycle|distinct"):
        greedy_finish(jobs)


def _tiny_logonet() -> LoGoNet:
    kwargs = arch_kwargs_for_preset("tiny", STRIDES)
    return LoGoNet(1, 3, **kwargs).eval()


def test_global_path_parts_give_the_global_path():
    """stem | body | final is the global path's own computation, to the bit."""
    torch.manual_seed(0)
    net = _tiny_logonet()
    x = torch.randn(1, 1, 32, 32, 32).contiguous(memory_format=torch.channels_last_3d)
    stem, body, final = path_balance.global_path_parts(net.global_path)
    with torch.no_grad():
        whole = net.global_path(x)
        coarse = body(x)
        assert torch.equal(final(stem(x), coarse), whole[0])
        assert len(coarse) == len(whole) - 1 and all(torch.equal(a, b) for a, b in zip(coarse, whole[1:]))


@pytest.mark.parametrize("training", [False, True])
def test_measures_every_job_and_both_schedules(training):
    torch.manual_seed(0)
    net = _tiny_logonet()
    x = torch.randn(2 if training else 1, 1, 32, 32, 32).contiguous(memory_format=torch.channels_last_3d)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        r = path_balance.measure(net, x, training=training, repeats=1)
    finally:
        torch.set_num_threads(before)
    assert list(r["jobs"]) == ["global"] + [f"local {i}" for i in range(8)]
    assert all(s > 0 for s in r["jobs"].values()) and r["side_by_side"] > 0
    assert r["ideal"] == pytest.approx(sum(r["jobs"].values()) / 2)
    assert r["ideal"] <= r["greedy"] <= sum(r["jobs"].values())
    assert ("greedy_split" in r) is not training
    if not training:
        assert set(r["global_parts"]) == {"stem", "body", "final"}
    assert net.training is training


def test_measure_needs_the_workers_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(RuntimeError, match=r"2 intra-op threads.*torch.set_num_threads\(2\)"):
            path_balance.measure(_tiny_logonet(), torch.randn(1, 1, 32, 32, 32), training=False)
    finally:
        torch.set_num_threads(before)


def test_command_prints_the_figures_and_refuses_a_bad_patch(capsys):
    before = torch.get_num_threads()
    try:
        assert path_balance.main(["--model", "logonet_tiny", "--patch-size", "32", "32", "32", "--repeats", "1"]) == 0
        out = capsys.readouterr().out
        for line in ("single-threaded: global path", "the global path in parts: stem", "ideal on 2 workers",
                     "greedy schedule of the lever's 9 jobs", "stem | body | final", "measured, the paths side by side"):
            assert line in out, out
        assert path_balance.main(["--model", "logonet_tiny", "--patch-size", "33", "32", "32"]) == 2
        assert "--patch-size 33 32 32" in capsys.readouterr().err
        assert path_balance.main(["--repeats", "0"]) == 2
    finally:
        torch.set_num_threads(before)
