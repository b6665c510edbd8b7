"""One real local Ray cluster for the serving and batch tests (``ray.init(num_cpus=2)``), started once."""

import pytest

ray = pytest.importorskip("ray", reason="the serve extra (pip install 'diffrt[serve]') is not installed")


@pytest.fixture(scope="session")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
