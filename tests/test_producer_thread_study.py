"""``python -m nnunet_logonet.benchmark.producer_thread``: the sliding window's producer-thread cost."""
from __future__ import annotations

import threading

from nnunet_logonet.benchmark import producer_thread


def test_times_each_network_alone_and_beside_a_waiting_producer(capsys):
    threads_before = threading.active_count()
    assert producer_thread.main(["--models", "logonet_tiny", "nnunet", "--patch-size", "16", "32", "32",
                                 "--rounds", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rounds = [line for line in out.splitlines() if line.startswith("round")]
    assert len(rounds) == 4 and sum("logonet_tiny" in r for r in rounds) == 2
    for row in rounds:
        alone, waiting = float(row.split("alone")[1].split()[0]), float(row.split("thread")[1].split()[0])
        assert alone > 0 and waiting > 0
        ratio = float(row.rsplit("(", 1)[1].rstrip("x)"))
        assert (waiting - 5e-4) / (alone + 5e-4) <= ratio <= (waiting + 5e-4) / (alone - 5e-4)  # printed to 1 ms
    assert [line.split()[0] for line in out.splitlines() if " median " in line] == ["logonet_tiny", "nnunet"]
    assert threading.active_count() == threads_before  # every producer thread was released and joined


def test_the_producer_is_alive_during_the_call_and_gone_after():
    seen = producer_thread.with_waiting_producer((4, 4, 4), lambda: threading.active_count())
    assert seen == threading.active_count() + 1


def test_bad_values_are_refused(capsys):
    assert producer_thread.main(["--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err
    assert producer_thread.main(["--models", "logonet_s", "--patch-size", "30", "64", "64"]) == 2
    assert "error:" in capsys.readouterr().err
