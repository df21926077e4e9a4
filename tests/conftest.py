"""Shared test set-up.

The environment is fixed here, before any test module imports huggingface_hub: an isolated HF cache,
no telemetry, no Xet, and HF_ENDPOINT pointing at the suite's local Hub server (tests/hub_server.py).
"""

from __future__ import annotations

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="hf_soups_test_home_")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HF_HUB_OFFLINE", None)

# The local Hub server's port is reserved now so that HF_ENDPOINT is final before huggingface_hub is imported.
# (tests/hub_server.py sets HF_ENDPOINT in reserve_port().)
from tests.hub_server import hub_server, reserve_port  # noqa: E402,F401

reserve_port()

import pytest  # noqa: E402

from tests.tiny_models import make_tiny_bert_dir  # noqa: E402,F401


@pytest.fixture
def tiny_bert_dirs(tmp_path):
    """Three fine-tuned-like tiny BERT classifiers saved with save_pretrained (same base + independent noise)."""
    return [make_tiny_bert_dir(tmp_path / f"ft-{i}", seed=i) for i in range(3)]
