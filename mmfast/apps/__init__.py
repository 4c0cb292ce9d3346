"""The mmfast Gradio app: one ``gr.Blocks`` with tabs for image / video QA, streaming video and AR image generation,
baseline and an accelerated method side by side. ``mmfast app`` launches it; ``apps/app.py`` is the same as a
script; :func:`build_app` returns it without launching (tests drive it with gradio_client).

Serving limits: one request runs at a time per event (the models share two CPU cores), at most :data:`QUEUE_SIZE`
wait in the queue (gradio reports each one's position), uploads are capped at :data:`MAX_FILE_SIZE`.
"""

from __future__ import annotations

from typing import Any

QUEUE_SIZE = 64
CONCURRENCY = 1
MAX_FILE_SIZE = "50mb"


def build_app(vlm: Any = "tiny-vlm", gen: Any = "tiny-ar", var: Any = "tiny-var", scan: Any = None,
              methods: list[str] | None = None, gen_methods: list[str] | None = None,
              var_methods: list[str] | None = None, task: str = "class-to-image", repeats: int = 3) -> Any:
    """The app over a VLM (``vlm``: a zoo name, path, HF id or (model, processor)), a next-token generator (``gen``)
    and a next-scale one (``var``); ``None`` hides a tab, and so does a zoo model that is not installed."""
    try:
        import gradio as gr
    except ImportError as e:  # pragma: no cover - depends on the install
        from mmfast.errors import ConfigError

        raise ConfigError("The app needs gradio: pip install 'mmfast[app]'.") from e
    from mmfast import zoo
    from mmfast.apps import gen as G
    from mmfast.apps import qa as Q

    def present(m: Any) -> bool:
        return m is not None and (not isinstance(m, str) or not zoo.is_zoo_name(m) or zoo.available().get(m, False))

    with gr.Blocks(title="mmfast: fast multimodal models") as demo:
        gr.Markdown("# mmfast: the same model, baseline and accelerated, side by side")
        with gr.Tabs():
            if present(vlm):
                import mmfast

                base = mmfast.pipeline("image-qa", model=vlm)
                shared = (base.model, base.processor)
                if scan is None:
                    scan = "tiny-vlm-scan" if vlm == "tiny-vlm" and present("tiny-vlm-scan") else shared
                with gr.Tab("Image / video QA"):
                    Q.qa_tab(vlm, shared, methods or Q.METHODS, repeats)
                if base.adapter.supports_video and "video_stream" in base.adapter.capabilities:
                    with gr.Tab("Streaming video"):
                        Q.stream_tab(shared, scan)
            if present(gen) or present(var):
                with gr.Tab("Generation"):
                    if present(gen):
                        with gr.Tab("next-token (speculative decoding)"):
                            G.gen_section(gen, task, gen_methods or G.METHODS, "generate", repeats)
                    if present(var):
                        with gr.Tab("next-scale (VAR + CoDe)"):
                            G.gen_section(var, "class-to-image", var_methods or G.CODE_METHODS, "generate_scales",
                                          repeats)
    return demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs: Any) -> None:
    """Build and serve the app (blocking) with the upload limit."""
    build_app(**kwargs).launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE)


__all__ = ["build_app", "launch", "QUEUE_SIZE", "CONCURRENCY", "MAX_FILE_SIZE"]
