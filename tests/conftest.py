"""Session-wide test settings and the shared tiny models (built once per session, used by every test module)."""

import os

# Triton reads TRITON_INTERPRET when `import triton` decorates its own standard library, and transformers / torch
# import triton early, so it is set here, before any test module imports them: Triton kernels then run on CPU in
# the interpreter (tests keep their shapes tiny).
os.environ.setdefault("TRITON_INTERPRET", "1")

from contextlib import contextmanager  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

#: AR image generator families of the method matrix: the zoo's tiny-ar (LlamaGen) and tiny random Janus / Emu3
AR_FAMILIES = ("llamagen", "janus", "emu3", "var")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and lose a lot when the cores are shared (intra-op threads only
    wait on each other). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def vlm_dirs(tmp_path_factory):
    """family -> directory of a tiny random model of the real transformers class (saved, loadable with
    ``from_pretrained``); families that expose tower features also get a random TokenFLEX projector beside it."""
    from mmfast.accel.tokenflex import FlexProjector
    from mmfast.models.registry import vlm_adapter_class
    from mmfast.train.tiny_models import FAMILIES, build_tiny_vlm, tiny_vlm_config

    out = {}
    for fam in FAMILIES:
        path = build_tiny_vlm(fam, tmp_path_factory.mktemp(fam))
        if "tower_features" in vlm_adapter_class(fam).capabilities:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                flex = FlexProjector(tiny_vlm_config(fam).vision_config.hidden_size, 16)
                torch.nn.init.normal_(flex.down.weight, std=0.1)
            flex.save(path)
        out[fam] = path
    return out


@pytest.fixture(scope="session")
def vlm_pipes(vlm_dirs):
    """family -> (image-qa pipeline loaded from disk, video-qa pipeline sharing its model, or None)."""
    import mmfast

    out = {}
    for fam, path in vlm_dirs.items():
        img = mmfast.pipeline("image-qa", model=str(path))
        vid = mmfast.pipeline("video-qa", model=(img.model, img.processor)) if img.adapter.supports_video else None
        out[fam] = (img, vid)
    return out


@pytest.fixture(scope="session")
def ar_adapters(tmp_path_factory):
    """family -> AR image generator adapter: tiny-ar (the zoo's LlamaGen), tiny random Janus, Emu3 and VAR."""
    from mmfast.api import load_argen
    from mmfast.models.emu3 import Emu3Adapter
    from mmfast.models.janus import JanusAdapter
    from mmfast.train.tiny_models import build_tiny_emu3, build_tiny_janus
    from mmfast.train.toy import toy_var_pair

    return {
        "llamagen": load_argen("tiny-ar")[0],
        "janus": JanusAdapter.from_pretrained(build_tiny_janus(tmp_path_factory.mktemp("janus"))),
        "emu3": Emu3Adapter.from_pretrained(build_tiny_emu3(tmp_path_factory.mktemp("emu3"))),
        "var": toy_var_pair()[0],
    }


def prompt_embeds(pipe, question, image):
    """(inputs_embeds (1, n, D), visual (n,) bool) of the prompt the adapter builds for one image, no method."""
    ad = pipe.adapter
    inputs = ad.preprocess(question, images=[image])
    gen_inputs, spans = ad.build_inputs(inputs, ad.visual_tokens(inputs))
    embeds = gen_inputs["inputs_embeds"]
    visual = torch.zeros(embeds.shape[1], dtype=torch.bool)
    for sp in spans:
        visual[sp.start : sp.end] = True
    return embeds, visual


@contextmanager
def eager_attention(model):
    """Run ``model`` with eager attention (which returns attention weights), sdpa again afterwards."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            yield model
    finally:
        model.set_attn_implementation("sdpa")
