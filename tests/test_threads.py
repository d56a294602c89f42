"""Applying the thread policy (tlsearch/threads.py): the count it sets, re-checked between epochs,
and the line that says why."""

from __future__ import annotations

import logging

import pytest
import torch

from tlsearch import device
from tlsearch.threads import ThreadPolicy, rebalance, thread_scope


def test_the_thread_line_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device, "available_cores", lambda: 2)
    before = torch.get_num_threads()
    workers = [1]
    policy = ThreadPolicy(workers=lambda: workers[0], who="host:1", interval=0.0)
    load = [0.0]
    monkeypatch.setattr(policy.meter, "busy", lambda: load[0])
    try:
        with caplog.at_level(logging.INFO, logger="tlsearch"):
            assert policy.apply() == 2 and torch.get_num_threads() == 2
            load[0] = 1.0
            with thread_scope(policy):
                rebalance()  # between epochs: another job started
            assert torch.get_num_threads() == 1
            policy.apply()  # unchanged: not logged again
            workers[0] = 2
            load[0] = 0.0
            policy.apply()
        assert caplog.messages == [
            "host:1: 2 thread(s) (2 cores, 1 worker(s) of this study on this host, "
            "0.0 busy with other work)",
            "host:1: 1 thread(s) (2 cores, 1 worker(s) of this study on this host, "
            "1.0 busy with other work)",
            "host:1: 1 thread(s) (2 cores, 2 worker(s) of this study on this host, "
            "0.0 busy with other work)",
        ]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tlsearch"):
            assert ThreadPolicy(fixed=3, who="host:2").apply() == 3
            monkeypatch.setenv("OMP_NUM_THREADS", "2")
            assert ThreadPolicy(who="host:3").apply() == 2
        assert caplog.messages == [
            "host:2: 3 thread(s) (set by --threads or finetune.threads)",
            "host:3: 2 thread(s) (OMP_NUM_THREADS=2)",
        ]
    finally:
        torch.set_num_threads(before)
