"""The model a serving replica holds: a trained checkpoint, optionally with a SKU gallery,
answering batches of image bytes. Plain Python (no Ray): :mod:`.app` wraps it in a Ray
Serve deployment, tests and ``bench/serve_load.py`` can call it directly.

Every image goes through :func:`rp2k_dist.evaluation.predict.decode_image` and
:func:`~rp2k_dist.evaluation.predict.top5_of`, the decode, preprocessing and scoring of
``rp2k predict`` (bf16 autocast on CUDA, as the engine evaluates), so the service and the
batch path give the same top-5 for the same file. With a gallery, each image is answered with
the gallery's SKU or ``unknown`` by the open-set score and threshold the gallery records
(:func:`~rp2k_dist.evaluation.gallery_build.query_scores` and
:meth:`~rp2k_dist.evaluation.gallery.Gallery.answer`, as ``rp2k predict --gallery`` answers).

The gallery is re-read when its generation changes (:func:`~rp2k_dist.evaluation.gallery.generation_of`,
one small read of ``gallery.json``, at most every ``reload_s`` seconds): an add by any replica,
or by ``rp2k gallery add`` on the same storage location, reaches every replica without a
restart. A gallery whose model is not the served one is refused, at start and on reload.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .. import storage
from ..data.images import DECODE_ERRORS
from ..data.transforms import EvalTransform
from ..errors import GalleryError
from ..evaluation.embeddings import LABEL_COLUMNS, Embedded, embeddings_of, label_of, model_id
from ..evaluation.gallery import Gallery, generation_of
from ..evaluation.gallery_build import query_scores, trained_classes
from ..evaluation.inference import TrainedModel, features_of, load_trained
from ..evaluation.predict import decode_error_reason, decode_image, top5_of
from .requests import Limits, RequestError, check_pixels

#: Seconds between two looks at the gallery's generation.
RELOAD_S = 2.0


class Classifier:
    """A checkpoint (and gallery) ready to answer decoded batches."""

    def __init__(self, checkpoint: str | Path | TrainedModel, gallery: str | Path | None = None,
                 limits: Limits = Limits(), reload_s: float = RELOAD_S, device: str | None = None):
        self.trained = checkpoint if isinstance(checkpoint, TrainedModel) else load_trained(checkpoint, device)
        self.checkpoint = "" if isinstance(checkpoint, TrainedModel) else storage.absolute(str(checkpoint))
        self.transform = EvalTransform(self.trained.spec)
        self.model_id = model_id(self.trained)
        self.trained_set = trained_classes(self.trained)  # for a classifier score (Gallery.answer)
        self.limits = limits
        self.reload_s = reload_s
        self.gallery_location = str(gallery) if gallery else None
        self.gallery: Gallery | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if self.gallery_location:
            self._load_gallery()

    # -- gallery -------------------------------------------------------------------------------
    def _load_gallery(self) -> None:
        gallery = Gallery.load(self.gallery_location)
        gallery.check_model(self.model_id, f"the served checkpoint {storage.display(self.checkpoint) or ''}".strip())
        self.gallery = gallery
        self._checked = time.monotonic()

    def refresh_gallery(self, force: bool = False) -> bool:
        """Re-read the gallery when its generation changed (checked at most every
        ``reload_s`` seconds unless ``force``); whether it was re-read. A gallery that
        cannot be read now (a half-written add elsewhere) keeps the current one serving."""
        if not self.gallery_location or (not force and time.monotonic() - self._checked < self.reload_s):
            return False
        with self._lock:
            self._checked = time.monotonic()
            try:
                if generation_of(self.gallery_location) == self.gallery.generation:
                    return False
                self._load_gallery()
            except (GalleryError, OSError, ValueError):
                return False
            return True

    def add_to_gallery(self, label: str, images: list[torch.Tensor]) -> dict[str, Any]:
        """Embed ``images`` as SKU ``label`` into the gallery's next generation (read fresh,
        so an add elsewhere is kept) and serve it from now on."""
        if not self.gallery_location:
            raise RequestError(409, "no_gallery", "this server has no gallery: start it with --gallery")
        vectors = embeddings_of(self.trained, torch.stack(images)).numpy()
        labels = label_of(self.trained.classes, label)
        table = pd.DataFrame([{"key": f"served:{label}:{i}", "split": "", **labels} for i in range(len(images))],
                             columns=list(LABEL_COLUMNS))
        table["embedding"] = list(vectors)
        with self._lock:
            gallery = Gallery.load(self.gallery_location)
            gallery.check_model(self.model_id, "the served checkpoint")
            gallery.add(Embedded(table, [], self.model_id))
            gallery.save(self.gallery_location)
            self.gallery = gallery
            self._checked = time.monotonic()
        return {"sku": labels["sku"] or label, "added": len(images), "gallery_size": len(gallery),
                "generation": gallery.generation}

    # -- requests ------------------------------------------------------------------------------
    def decode(self, images: list[bytes]) -> list[torch.Tensor]:
        """Model inputs of a request's images, or the :class:`RequestError` of the first
        that is too big or no image."""
        out = []
        for n, data in enumerate(images, 1):
            check_pixels(data, self.limits, n)
            try:
                out.append(decode_image(data, self.transform))
            except DECODE_ERRORS as err:
                raise RequestError(400, "not_an_image", f"image {n}: {decode_error_reason(err)}") from None
        return out

    def predict(self, batch: torch.Tensor) -> list[dict[str, Any]]:
        """A uint8 NCHW batch -> one answer per image: ``top5`` (rank, class, name,
        product_name, sku, type, shape, score), ``meta_category`` (the top-1 class's type)
        and, with a gallery, ``gallery`` (answer, score, threshold, top-5 SKUs)."""
        tops = top5_of(self.trained, batch)
        answers = [{"top5": top, "meta_category": top[0]["type"] if top else ""} for top in tops]
        gallery = self.gallery
        if gallery is not None and len(gallery):
            # the gallery's recorded open-set score and threshold, as `rp2k predict --gallery` applies them
            ranked, _, known = query_scores(self.trained, gallery, features_of(self.trained, batch).numpy(), k=5)
            for answer, matches, value in zip(answers, ranked, known):
                answer["gallery"] = {
                    "answer": gallery.answer(matches, float(value), self.trained_set),
                    "score": matches[0].score if matches else None, "threshold": gallery.threshold,
                    "open_set_score": gallery.score, "open_set_value": float(value),
                    "top5": [{"rank": r, **m.label, "score": m.score} for r, m in enumerate(matches, 1)],
                }
        return answers

    def describe(self) -> dict[str, Any]:
        """``GET /model``: what is served."""
        spec = self.trained.spec
        return {
            "model": self.trained.name, "model_id": self.model_id, "checkpoint": storage.display(self.checkpoint),
            "classes": [{k: c.get(k, "") for k in ("index", "name", "sku", "type")} for c in self.trained.classes],
            "num_classes": len(self.trained.classes),
            "input": {"resize_size": spec.resize_size, "crop_size": spec.crop_size, "mean": list(spec.mean),
                      "std": list(spec.std), "formats": ["image/jpeg", "image/png", "image/webp", "image/bmp"]},
            "limits": {"max_bytes": self.limits.max_bytes, "max_images": self.limits.max_images,
                       "max_pixels": self.limits.max_pixels},
            "device": str(self.trained.device),
            "gallery": None if self.gallery is None else {
                "location": storage.display(self.gallery_location), "vectors": len(self.gallery),
                "skus": int(len(set(self.gallery.skus))), "generation": self.gallery.generation,
                "threshold": self.gallery.threshold},
        }

