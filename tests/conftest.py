"""Session set-up shared by all tests: find the ComfyUI host and put it first on sys.path.

Keep this file small; fixtures and tiny models belong in their own modules (e.g. tests/tiny_models.py).
"""

import os
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    # Appended, not prepended: the host must stay first so that `import nodes` is ComfyUI's nodes.py.
    sys.path.append(_REPO)

from calibri_core import comfy_env  # noqa: E402

_host = None


def calibri_host() -> comfy_env.Host:
    global _host
    if _host is None:
        try:
            _host = comfy_env.find_host()
        except comfy_env.ComfyHostError as e:
            raise pytest.UsageError(str(e)) from None
    return _host


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    comfy_env.activate(calibri_host())
    import torch

    # The tiny test models are far too small to gain from intra-op threads, and spinning OpenMP
    # threads slow them several-fold whenever the CPUs are shared.
    torch.set_num_threads(1)


def pytest_report_header(config):
    return f"calibri host: {calibri_host().report()}"
