"""Test-session setup: CUDA simulator, Hypothesis profiles, output poisoning, backends.

Order matters: the simulator switch must be set before Numba is first imported,
so this file decides it before importing anything that imports Numba.
"""

import os
import sys

import torch  # does not import numba

if "NUMBA_ENABLE_CUDASIM" not in os.environ and not torch.cuda.is_available():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # no GPU here: run CUDA kernels in the simulator

# Let the tests run from a clean checkout without installing the package.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402
from helpers import BACKENDS, simulator_on, tiny_under_sim  # noqa: E402,F401 (re-exported)
from hypothesis import HealthCheck, settings  # noqa: E402

import sla_numba.testing  # noqa: E402

# --------------------------------------------------------------------------- Hypothesis
_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=10, **_COMMON)
settings.register_profile(
    "ci", max_examples=100, derandomize=True, **_COMMON
)  # CI: same examples every run
settings.register_profile("gpu", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs a GPU backend (the CUDA simulator without a GPU)")
    config.addinivalue_line("markers", "slow: a slower test (torch.compile, large shapes)")


def pytest_report_header(config):
    return (
        f"sla_numba tests: hypothesis profile={settings.get_current_profile_name()}, "
        f"CUDA simulator={'on' if simulator_on() else 'off'}, "
        f"backends={BACKENDS}"
    )


def pytest_collection_modifyitems(config, items):
    """Everything under tests/gpu/ runs GPU kernels: give it the ``gpu`` mark too."""
    gpu_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu") + os.sep
    for item in items:
        if str(item.path).startswith(gpu_dir):
            item.add_marker(pytest.mark.gpu)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True, scope="session")
def _fast_simulated_barriers():
    """Under the simulator every CUDA thread is a Python thread and ``syncthreads`` waits
    for all of them: a short GIL switch interval makes barriers ~10x cheaper."""
    if not simulator_on():
        yield
        return
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)


@pytest.fixture(autouse=True, scope="session")
def _poison_outputs():
    """Every output buffer a backend allocates starts as NaN: an unwritten element fails."""
    sla_numba.testing.poison_outputs(True)
    yield
    sla_numba.testing.poison_outputs(False)


@pytest.fixture(
    params=[pytest.param(b, marks=[pytest.mark.gpu] if b == "gpu" else []) for b in BACKENDS]
)
def backend(request):
    """Every backend there is: "cpu", and "gpu" when importable (simulated without a GPU).
    gpu cases carry the ``gpu`` mark: ``-m "not gpu"`` runs the CPU half alone."""
    return request.param


@pytest.fixture(autouse=True)
def _race_check(request):
    """``SLA_TEST_RACE_CHECK=1``: run every simulated kernel of the test under the
    race detector (sla_numba.testing_race); a race fails the test."""
    if os.environ.get("SLA_TEST_RACE_CHECK") != "1" or not simulator_on():
        yield
        return
    from sla_numba.testing_race import detect_races

    with detect_races(raise_first=True):
        yield
