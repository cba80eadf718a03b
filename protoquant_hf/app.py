"""A demo app for a ProtoQuant model (Gradio; ``pip install protoquant_hf[app]``): upload or pick an image and see
the prediction, the top concepts with their heatmaps, contributions and training patches.

It reuses the explanation API and its figure (`protoquant_hf.explain`), nothing else. `protoquant app --model DIR`
serves it locally; a model bundle's `app.py` runs the same app as a Hugging Face Space.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image

INSTALL = "pip install 'protoquant_hf[app]'  (or: pip install gradio)"


def _gradio():
    try:
        import gradio
    except ImportError:
        raise ImportError(f"The demo app needs Gradio, which is not installed. Install it with:\n    {INSTALL}") from None
    return gradio


def _figure_image(figure) -> PIL.Image.Image:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight", facecolor="white")
    return PIL.Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def build_app(model_folder: str | Path, examples: list[str] | None = None, top_concepts: int = 3):
    """The Gradio Blocks app of a model folder (or bundle). `examples`: image paths offered as examples (default:
    the folder's ``examples/*.png``, if any)."""
    gr = _gradio()
    import torch

    from .explain import explain, load_gallery, plot_explanation
    from .explain.model_folder import load_model_folder

    model, processor = load_model_folder(model_folder)
    gallery = load_gallery(model)
    if examples is None:
        examples = [str(p) for p in sorted(Path(model_folder, "examples").glob("*.png"))]
    labels = model.config.id2label

    def predict(image):
        if image is None:
            return None, None, []
        explanation = explain(model, PIL.Image.fromarray(np.asarray(image)), processor, top_k=top_concepts, gallery=gallery)[0]
        pixels = processor(images=PIL.Image.fromarray(np.asarray(image)), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            probabilities = model(pixels).logits.softmax(-1)[0]
        scores = {str(labels[i]): float(p) for i, p in enumerate(probabilities)}
        rows = [
            [f"#{c.concept}", round(c.score, 4), round(c.weight, 4), round(c.contribution, 4), f"{c.share:.0%}"]
            for c in explanation.concepts
        ]
        return scores, _figure_image(plot_explanation(explanation)), rows

    with gr.Blocks(title="ProtoQuant: this looks like that") as app:
        gr.Markdown(
            f"## ProtoQuant: this looks like that\nA {model.config.num_concepts}-concept ProtoQuant classifier over "
            f"{model.config.num_labels} classes. Its logit for a class is exactly the sum of concept contributions "
            "(presence score × weight); each concept is shown by its nearest training patches."
        )
        with gr.Row():
            image = gr.Image(label="image", type="numpy")
            prediction = gr.Label(label="prediction", num_top_classes=5)
        explanation = gr.Image(label="why: the top concepts, where they are, what they look like", type="pil")
        table = gr.Dataframe(headers=["concept", "score", "weight", "contribution", "share of logit"], label="evidence")
        button = gr.Button("Explain")
        button.click(predict, inputs=image, outputs=[prediction, explanation, table], api_name="predict")
        image.upload(predict, inputs=image, outputs=[prediction, explanation, table])
        if examples:
            gr.Examples(examples, inputs=image)
            first = np.asarray(PIL.Image.open(examples[0]).convert("RGB"))
            # Show a prediction as soon as the page opens.
            app.load(lambda: (first, *predict(first)), outputs=[image, prediction, explanation, table])
    return app


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="protoquant app",
        description="Serve a local demo app for a ProtoQuant model folder: upload an image, see the prediction, the "
        "top concepts with heatmaps and contributions, and their training patches. Needs Gradio "
        f"({INSTALL}).",
    )
    parser.add_argument("--model", required=True, help="a trained ProtoQuant model folder or bundle")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--example", action="append", default=None, help="an example image path (repeatable)")
    args = parser.parse_args(argv)
    try:
        app = build_app(args.model, examples=args.example)
    except (ImportError, ValueError, FileNotFoundError, OSError) as error:
        print(f"protoquant app: error: {error}", file=sys.stderr)
        return 2
    app.launch(server_name=args.host, server_port=args.port)
    return 0


__all__ = ["build_app", "main"]
