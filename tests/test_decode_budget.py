"""The process-wide decode memory budget: concurrent decodes never reserve more than it, in arrival order."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from featcache.errors import TooLarge, UsageError
from featcache.extract.budget import DECODE_BUDGET, MB, MemoryBudget, set_decode_budget
from featcache.extract.decode import estimate_bytes, load_image
from featcache.extract.registry import BUILTIN

from .images import encode, jpeg_bytes, real_photo

PRE = BUILTIN["efficientnet_lite0"].preprocess


@pytest.fixture
def budget_of():
    """Set the global budget for one test, then put it back."""
    before = DECODE_BUDGET.limit
    yield set_decode_budget
    set_decode_budget(before)


def test_reservations_never_add_up_past_the_limit():
    budget = MemoryBudget(100)
    held, worst, lock = [0], [0], threading.Lock()

    def job(n: int) -> None:
        with budget.reserve(n, "x"):
            with lock:
                held[0] += n
                worst[0] = max(worst[0], held[0])
            time.sleep(0.002)
            with lock:
                held[0] -= n

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(job, [10, 60, 30, 90, 5, 100, 45] * 10))
    assert worst[0] <= 100 and budget.peak <= 100 and budget.in_use == 0


def test_waiters_are_served_in_arrival_order():
    budget, order = MemoryBudget(100), []
    first = budget.reserve(80, "first")
    first.__enter__()

    def job(name: str, n: int) -> None:
        with budget.reserve(n, name):
            order.append(name)

    big = threading.Thread(target=job, args=("big", 90))
    big.start()
    time.sleep(0.05)
    small = threading.Thread(target=job, args=("small", 10))  # would fit now, but the big one came first
    small.start()
    time.sleep(0.05)
    assert order == []
    first.__exit__(None, None, None)
    big.join(5), small.join(5)
    assert order == ["big", "small"]


def test_a_decode_larger_than_the_budget_is_refused_with_the_setting_to_change(budget_of):
    data = jpeg_bytes(real_photo(0).resize((3000, 2000)))
    need = estimate_bytes(data, pre=PRE)
    budget_of(need - MB)
    with pytest.raises(TooLarge, match=r"^too large: decoding a 3000x2000 JPEG image needs about \d+ MB.*"
                                       r"FEATCACHE_DECODE_MEMORY_MB"):
        load_image(data, PRE)
    budget_of(need)
    assert load_image(data, PRE).shape == (3, 224, 224)


def test_lowering_the_limit_refuses_waiters_that_can_no_longer_fit():
    budget = MemoryBudget(100)
    errors = []
    with budget.reserve(60, "holder"):
        def job() -> None:
            try:
                with budget.reserve(80, "waiter"):
                    pass
            except TooLarge as e:
                errors.append(str(e))

        t = threading.Thread(target=job)
        t.start()
        time.sleep(0.05)
        budget.set_limit(50)
        t.join(5)
    assert errors and errors[0].startswith("too large: decoding waiter needs about 1 MB")
    with pytest.raises(UsageError):
        budget.set_limit(0)


def test_concurrent_real_decodes_stay_within_the_budget(budget_of):
    """Eight threads decoding 6 MP images with room for about two at a time: all succeed, none overlap past it."""
    images = [encode(real_photo(i).resize((3000, 2000)), "PNG", compress_level=1) for i in range(4)]
    need = max(estimate_bytes(d, pre=PRE) for d in images)
    budget_of(int(2.5 * need))
    DECODE_BUDGET.peak = 0
    torch.set_num_threads(1)
    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(lambda d: load_image(d, PRE), images * 2))
    assert all(x.shape == (3, 224, 224) for x in out)
    assert need < DECODE_BUDGET.peak <= DECODE_BUDGET.limit and DECODE_BUDGET.in_use == 0
