"""Turning weights into a transformers model: the class a `config.json` names.

Used wherever a model is instantiated from an ingredient, a base model or a written soup (the kitchen's live
model, an adapter's base, `Soup.model`).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def model_class_for(config: dict[str, Any]):
    """The transformers class named by `config["architectures"][0]` (falls back to `AutoModel`)."""
    import transformers

    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        if arch:
            logger.warning("Architecture %s is not in transformers; loading the soup with AutoModel.", arch)
        cls = transformers.AutoModel
    return cls
