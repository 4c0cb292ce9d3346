"""Which adapter serves which model: VLM adapters by ``config.model_type``, AR generators by architecture.

Adapters are imported lazily (a pipeline over one family never imports the others' modules). This table is the
only place outside the adapters that names model families.
"""

from __future__ import annotations

import importlib
from typing import Any

from mmfast.errors import UnsupportedModelError

#: VLM adapters by transformers ``model_type``
VLM_ADAPTERS: dict[str, str] = {
    "llava": "mmfast.models.llava:LlavaAdapter",
    "llava_next": "mmfast.models.llava:LlavaNextAdapter",
    "llava_next_video": "mmfast.models.llava:LlavaNextVideoAdapter",
    "llava_onevision": "mmfast.models.llava:LlavaOnevisionAdapter",
    "qwen2_vl": "mmfast.models.qwen_vl:Qwen2VLAdapter",
    "qwen2_5_vl": "mmfast.models.qwen_vl:Qwen2VLAdapter",
}

#: AR image generator adapters by architecture / model_type
ARGEN_ADAPTERS: dict[str, str] = {
    "llamagen": "mmfast.models.llamagen:LlamaGenAdapter",
    "var": "mmfast.models.var:VARAdapter",
    "janus": "mmfast.models.janus:JanusAdapter",
    "emu3": "mmfast.models.emu3:Emu3Adapter",
}


def load_class(path: str) -> type[Any]:
    module, cls = path.split(":")
    return getattr(importlib.import_module(module), cls)


def vlm_adapter_class(model_type: str) -> type[Any]:
    """The VLM adapter class for ``model_type``."""
    if model_type not in VLM_ADAPTERS:
        raise UnsupportedModelError(
            f"No mmfast adapter for model_type {model_type!r}. Supported: {', '.join(sorted(VLM_ADAPTERS))}."
        )
    return load_class(VLM_ADAPTERS[model_type])


def adapter_for(model: Any, processor: Any) -> Any:
    """The :class:`~mmfast.models.vlm.VLMAdapter` for a loaded transformers VLM (chosen by ``config.model_type``)."""
    mt = getattr(model.config, "model_type", "")
    try:
        cls = vlm_adapter_class(mt)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{e} ({type(model).__name__})") from None
    return cls(model, processor)
