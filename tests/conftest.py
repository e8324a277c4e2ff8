"""Shared fixtures. ``jittor_env`` is imported first so no test can import Jittor unprepared."""

import jittor_env  # noqa: F401  (must precede any import of jittor)
import pytest


@pytest.fixture(scope="session")
def jt():
    """Jittor, prepared for this machine (CUDA when usable, unless IIDM_FORCE_CPU=1)."""
    return jittor_env.setup()
