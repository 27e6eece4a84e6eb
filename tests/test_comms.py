"""llmbook.comms: the alpha-beta model of ring collectives, its fit, and the GPU predictions.
(The timing job itself runs in the notebook; timings are never asserted.)"""

import pytest

from llmbook.comms import (COLLECTIVES, LINKS, collective_seconds, fit_alpha_beta, predicted_step,
                           ring_cost)
from llmbook.sizing import llama_config


def test_ring_cost():
    assert ring_cost("all_reduce", 1000, 1) == (0, 0.0)
    assert ring_cost("all_reduce", 1000, 2) == (2, 1000.0)
    assert ring_cost("all_gather", 1000, 4) == (3, 750.0)
    assert ring_cost("reduce_scatter", 800, 8) == (7, 700.0)
    with pytest.raises(ValueError, match="all_reduce"):
        ring_cost("broadcast", 8, 2)


def test_all_reduce_is_reduce_scatter_plus_all_gather():
    for world in (2, 3, 8):
        parts = [collective_seconds(op, 4096, world, 1e-5, 1e9) for op in ("reduce_scatter", "all_gather")]
        assert collective_seconds("all_reduce", 4096, world, 1e-5, 1e9) == pytest.approx(sum(parts))


def test_fit_recovers_alpha_and_beta():
    exact = [(op, 2 ** p, collective_seconds(op, 2 ** p, 4, 3e-5, 5e9)) for op in COLLECTIVES for p in range(3, 27, 3)]
    alpha, bandwidth = fit_alpha_beta(exact, 4)
    assert alpha == pytest.approx(3e-5, rel=1e-9) and bandwidth == pytest.approx(5e9, rel=1e-9)


def test_fit_refuses_samples_without_latency():
    # times that fall with the size cannot come from a latency plus a bandwidth term
    with pytest.raises(ValueError, match="not physical"):
        fit_alpha_beta([("all_reduce", 8, 1.0), ("all_reduce", 8 << 20, 1e-3)], 2)


def test_predictions():
    nvlink, infiniband = LINKS
    seven_b = llama_config("7B")
    # DDP's ratio hardly depends on the model size (N cancels in the bandwidth term; alpha adds 1%)
    ratios = []
    for size in ("1B", "7B", "70B"):
        compute, communication = predicted_step("DDP", llama_config(size), 64, 8192, infiniband)
        ratios.append(communication / compute)
    assert max(ratios) / min(ratios) < 1.03
    # FSDP moves 1.5 times DDP's bytes
    ddp = predicted_step("DDP", seven_b, 8, 8192, nvlink)[1]
    fsdp = predicted_step("FSDP", seven_b, 8, 8192, nvlink)[1]
    assert fsdp / ddp == pytest.approx(1.5, rel=1e-3)
    # tensor parallelism: fine on NVLink, communication-bound on InfiniBand
    compute, communication = predicted_step("TP", seven_b, 8, 8192, nvlink)
    assert communication < compute
    compute, communication = predicted_step("TP", seven_b, 16, 8192, infiniband)
    assert communication > compute
