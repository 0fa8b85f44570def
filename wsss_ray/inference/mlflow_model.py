"""The Segmenter as an MLflow model (pyfunc flavour), so a run ends in something that can be
loaded and deployed, not only charts: ``mlflow models serve -m models:/NAME/1`` serves it, and
``Segmenter.from_checkpoint("models:/NAME/1")`` loads it back.

Input (a DataFrame): ``image`` (encoded image bytes: JPEG, PNG, ...) and, optionally,
``class_names`` (a comma-separated string; PGSeg models only; empty = the model's defaults).
Output: ``mask_png`` (a palette PNG of the class indices, as bytes), ``classes`` (JSON list,
index 0 = background) and ``areas`` (JSON object: class -> fraction of the image).
The model folder holds the segmenter package (weights included) and the ``wsss_ray`` code.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc

ARTIFACT = "segmenter"


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("binary", "image"), ColSpec("string", "class_names", required=False)])
    outputs = Schema(
        [ColSpec("binary", "mask_png"), ColSpec("string", "classes"), ColSpec("string", "areas")]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


class SegmenterModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of a segmenter package (``artifacts["segmenter"]``)."""

    def load_context(self, context) -> None:
        from wsss_ray.inference.segmenter import Segmenter

        self.seg = Segmenter.load(context.artifacts[ARTIFACT])

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        from wsss_ray.inference.render import label_png

        rows = []
        for rec in model_input.to_dict("records"):
            names = rec.get("class_names") or None
            result = self.seg.predict([bytes(rec["image"])], names)[0]
            rows.append(
                {
                    "mask_png": label_png(result.mask),
                    "classes": json.dumps(result.class_names),
                    "areas": json.dumps(result.areas),
                }
            )
        return pd.DataFrame(rows, columns=["mask_png", "classes", "areas"])


def log_segmenter(seg, name: str = "model", registered_model_name: str | None = None):
    """Log ``seg`` as a pyfunc model in the active run (registered as ``registered_model_name``
    when given); returns MLflow's ModelInfo."""
    import wsss_ray

    with tempfile.TemporaryDirectory() as tmp:
        package = seg.save(Path(tmp) / ARTIFACT)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=SegmenterModel(),
            artifacts={ARTIFACT: str(package)},
            code_paths=[str(Path(wsss_ray.__file__).parent)],
            signature=signature(),
            registered_model_name=registered_model_name,
        )
