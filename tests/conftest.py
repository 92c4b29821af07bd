import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test models are tiny (2 layers, width 64): a second intra-op thread buys nothing, and on a
# shared 2-core machine OpenMP threads spinning against other processes (or our own data-prefetch
# thread) make steps up to 10x slower. Child processes (torchrun, stage subprocesses) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Property tests draw the same examples in every run (CI included): a failure is reproducible,
# never a lucky or unlucky seed. HYPOTHESIS_PROFILE=explore draws new ones while developing.
try:
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True)
    _hyp_settings.register_profile("explore", derandomize=False)
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover - hypothesis is a test requirement
    pass


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    import torch

    torch.set_num_threads(1)
    yield


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_em_run(tmp_path_factory):
    """The tiny EM loop of tests/test_em.py, stages one after another (``local.jobs=1``) with its
    E-step as two shard processes: run once per session, shared by tests/test_em.py and, as the
    sequential reference, tests/test_em_parallel.py. Tests may rerun it, never change its results."""
    from apps.bolt import em
    from tests.test_em import _cfg

    tmp = tmp_path_factory.mktemp("em")
    cfg = _cfg(tmp, "local.estep_procs=2")
    return tmp, cfg, em.run(cfg)
