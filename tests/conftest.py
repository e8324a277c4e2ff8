"""Shared fixtures. ``jittor_env`` is imported first so no test can import Jittor unprepared."""

import jittor_env  # noqa: F401  (must precede any import of jittor)
import pytest


@pytest.fixture(scope="session")
def jt():
    """Jittor, prepared for this machine (CUDA when usable, unless IIDM_FORCE_CPU=1)."""
    return jittor_env.setup()


def pytest_collection_modifyitems(config, items):
    """``cuda`` tests are skipped, with the reason, when Jittor would not use a GPU here."""
    cuda_items = [item for item in items if "cuda" in item.keywords]
    if not cuda_items:
        return
    choice = jittor_env.choose_device()
    if choice.use_cuda:
        return
    skip = pytest.mark.skip(reason=f"needs a usable GPU: {choice.reason}")
    for item in cuda_items:
        item.add_marker(skip)
