"""The Ray Serve application of ``rp2k serve``: one deployment, a FastAPI ingress, replicas
that each hold a :class:`~.model.Classifier`.

Routes: ``POST /predict`` (one or more images, :mod:`.requests`), ``POST /gallery`` (a SKU's
photos, ``Authorization: Bearer <token>``), ``GET /health``, ``GET /model``. The deployment
follows the Ray Serve docs' patterns: a class with ``@serve.ingress`` on a FastAPI app
(https://docs.ray.io/en/latest/serve/http-guide.html#fastapi-http-deployments) and dynamic
batching with ``@serve.batch``, its size and wait set from the flags at start
(https://docs.ray.io/en/latest/serve/advanced-guides/dyn-req-batch.html). Decoding happens
per request, before batching, so one bad image is refused alone; the batch runs the model
in a worker thread so the replica keeps accepting requests meanwhile.

A replica that dies is replaced by Serve's controller; a request it held fails with a 5xx
at the client (Serve does not retry a request that reached a replica), never hangs.
"""


import asyncio
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from ..errors import Rp2kError
from .requests import Limits, RequestError, check_token, form_fields, parse_images

#: Environment variable holding the token of ``POST /gallery``.
TOKEN_ENV = "RP2K_SERVE_TOKEN"
#: The application's name in Serve (``serve status``, ``serve.delete``).
APP_NAME = "rp2k"

api = FastAPI(title="rp2k serve", description="Top-5 SKUs of retail product photos, and a SKU gallery")


@dataclass
class ServeSettings:
    """Everything a replica needs, passed to the deployment's constructor."""

    checkpoint: str
    gallery: str | None = None
    max_batch: int = 16
    batch_wait_ms: float = 10.0
    limits: dict[str, int] = field(default_factory=lambda: asdict(Limits()))
    token: str | None = None  # None: read TOKEN_ENV in the replica
    reload_s: float = 2.0


def error_response(err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@serve.deployment(name="classifier")
@serve.ingress(api)
class ClassifierDeployment:
    """One replica: the model (and gallery) on its device, behind the HTTP routes."""

    def __init__(self, settings: dict[str, Any]):
        from .model import Classifier

        self.settings = ServeSettings(**settings)
        self.limits = Limits(**self.settings.limits)
        self.token = self.settings.token or os.environ.get(TOKEN_ENV) or None
        self.classifier = Classifier(self.settings.checkpoint, self.settings.gallery, self.limits,
                                     self.settings.reload_s)
        self.infer.set_max_batch_size(self.settings.max_batch)
        self.infer.set_batch_wait_timeout_s(self.settings.batch_wait_ms / 1000.0)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer(self, images: list[Any]) -> list[dict[str, Any]]:
        """Batched: one decoded image per call, a list of them per batch."""
        import torch

        batch = torch.stack(images)
        return await asyncio.get_running_loop().run_in_executor(None, self.classifier.predict, batch)

    async def _images(self, request: Request) -> tuple[list[Any], bytes]:
        body = await request.body()
        raw = parse_images(request.headers.get("content-type"), body, self.limits)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.classifier.decode, raw), body

    @api.post("/predict")
    async def predict(self, request: Request):
        try:
            images, _ = await self._images(request)
        except RequestError as err:
            return error_response(err)
        await asyncio.get_running_loop().run_in_executor(None, self.classifier.refresh_gallery)
        answers = await asyncio.gather(*(self.infer(image) for image in images))
        return {"model_id": self.classifier.model_id, "predictions": list(answers)}

    @api.post("/gallery")
    async def gallery(self, request: Request):
        """Add photos of one SKU: multipart with a ``sku`` field and image files (or raw
        image bytes with ``?sku=``)."""
        try:
            check_token(self.token, request.headers.get("authorization"))
            images, body = await self._images(request)
            sku = request.query_params.get("sku") or form_fields(request.headers.get("content-type", ""),
                                                                 body).get("sku", "")
            if not sku:
                raise RequestError(400, "no_sku", "name the SKU: a form field `sku` or ?sku=")
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self.classifier.add_to_gallery, sku, images)
        except RequestError as err:
            return error_response(err)
        except Rp2kError as err:
            return JSONResponse({"error": "gallery", "detail": str(err)}, status_code=409)

    @api.get("/health")
    async def health(self):
        gallery = self.classifier.gallery
        return {"status": "ok", "model_id": self.classifier.model_id,
                "gallery_generation": None if gallery is None else gallery.generation}

    @api.get("/model")
    async def model(self):
        await asyncio.get_running_loop().run_in_executor(None, self.classifier.refresh_gallery)
        return self.classifier.describe()


def build_app(settings: ServeSettings, replicas: int = 1, gpus_per_replica: float = 0.0,
              cpus_per_replica: float = 1.0):
    """The bound application: ``replicas`` copies, each with ``gpus_per_replica`` GPUs
    (fractions share a GPU) and ``cpus_per_replica`` CPUs. A replica takes up to twice the
    batch size of requests at once, so that a full batch can form while one runs."""
    options = {"num_cpus": cpus_per_replica}
    if gpus_per_replica:
        options["num_gpus"] = gpus_per_replica
    deployment = ClassifierDeployment.options(
        num_replicas=replicas, ray_actor_options=options, max_ongoing_requests=max(8, 2 * settings.max_batch),
        health_check_period_s=5, health_check_timeout_s=30)
    return deployment.bind(asdict(settings))


def start(settings: ServeSettings, *, replicas: int = 1, gpus_per_replica: float = 0.0,
          cpus_per_replica: float = 1.0, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Start Serve's HTTP proxy on ``host:port`` (on the connected Ray cluster) and run the
    application there; returns its URL once every replica is up."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings, replicas, gpus_per_replica, cpus_per_replica), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def from_config(args: dict[str, Any]):
    """An application builder for a Serve config file (KubeRay's ``RayService``,
    ``serve run``): ``import_path: rp2k_dist.serving.app:from_config`` with ``args``
    ``checkpoint`` (required), ``gallery``, ``replicas``, ``gpus_per_replica``,
    ``cpus_per_replica``, ``max_batch``, ``batch_wait_ms``, ``max_images``, ``max_bytes``,
    ``max_pixels`` (https://docs.ray.io/en/latest/serve/advanced-guides/app-builder-guide.html).
    The gallery token comes from the replicas' ``RP2K_SERVE_TOKEN``."""
    if not args.get("checkpoint"):
        raise ValueError("the Serve config's args need `checkpoint` (a run folder or checkpoint file)")
    defaults = Limits()
    settings = ServeSettings(
        checkpoint=str(args["checkpoint"]), gallery=args.get("gallery") or None,
        max_batch=int(args.get("max_batch", 16)), batch_wait_ms=float(args.get("batch_wait_ms", 10.0)),
        limits={"max_bytes": int(args.get("max_bytes", defaults.max_bytes)),
                "max_images": int(args.get("max_images", defaults.max_images)),
                "max_pixels": int(args.get("max_pixels", defaults.max_pixels))})
    return build_app(settings, int(args.get("replicas", 1)), float(args.get("gpus_per_replica", 0.0)),
                     float(args.get("cpus_per_replica", 1.0)))
