"""diffrt.fast_start: the cyclic collector is off inside the block, what was loaded is frozen on the way out,
and the caller's collector state comes back, also when the block raises."""

import gc

import pytest

import diffrt


@pytest.fixture
def collector():
    was_enabled = gc.isenabled()
    yield
    gc.unfreeze()  # give the frozen objects back to the collector: other tests run in this process
    (gc.enable if was_enabled else gc.disable)()


def test_the_collector_is_paused_inside_and_what_loaded_is_frozen(collector):
    gc.enable()
    gc.unfreeze()
    with diffrt.fast_start():
        assert not gc.isenabled()
        kept = [[i] for i in range(1000)]  # stands for the imported modules and the model
    assert gc.isenabled() and gc.get_freeze_count() >= len(kept)


def test_a_caller_with_the_collector_off_keeps_it_off_and_errors_restore_it(collector):
    gc.disable()
    with diffrt.fast_start():
        pass
    assert not gc.isenabled()
    gc.enable()
    with pytest.raises(RuntimeError, match="failed load"), diffrt.fast_start():
        raise RuntimeError("failed load")
    assert gc.isenabled()
