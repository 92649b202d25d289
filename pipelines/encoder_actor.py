"""The encoder actor of the encode job: one shard's decoded crops in, its latents out.

Kept free of Ray (Ray Data instantiates it in an actor pool; benchmarks and tests call it directly),
so it runs wherever torch and timm do.
"""
from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from rae.devices import pick_device
from rae.encoders import RepresentationEncoder, load_encoder
from rae.image_tensors import to_unit_images

if TYPE_CHECKING:
    from pipelines.gpu_decode import JpegCropper
    from pipelines.image_decode import DecodeLimits

log = logging.getLogger(__name__)


class LatentEncoder:
    """Encoder actor: one shard's images in, its latents out, in the store dtype.

    Loads the encoder once; uses CUDA when the actor got a usable GPU, CPU otherwise (a logical
    Ray GPU without CUDA is not usable). On GPU: bf16 autocast, and latents cast to the store dtype
    before they leave the device (half the bytes copied back for float16). On CPU: ``cpu_threads``
    torch threads (a ``num_cpus=1`` Ray actor starts with one), at most the cores this process may use.

    A row may bring JPEG bytes instead of crops (``--decode gpu``, pipelines/shard_jpegs.py): the
    actor then decodes and crops them on its device (nvJPEG on CUDA; on CPU, or where nvJPEG fails,
    torchvision's libjpeg-turbo), with ``limits`` for the images it hands to the CPU path.
    """

    def __init__(self, encoder: str, weights: str | None, input_size: int | None, flip: bool,
                 latent_dtype: str, batch_size: int, weights_digest: str, cpu_threads: int | None = None,
                 limits: DecodeLimits | None = None):
        self.device = pick_device()
        if self.device.type == "cpu" and cpu_threads:
            torch.set_num_threads(max(1, min(cpu_threads, len(os.sched_getaffinity(0)))))
        self.encoder: RepresentationEncoder = load_encoder(encoder, weights=weights, input_size=input_size,
                                                           device=self.device)
        if self.encoder.weights_digest != weights_digest:
            raise RuntimeError(f"encoder weights on this worker (sha256 {self.encoder.weights_digest[:12]}) differ "
                               f"from the driver's ({weights_digest[:12]}); is {weights!r} the same file everywhere?")
        self.flip, self.batch_size = flip, batch_size
        self.dtype = np.dtype(latent_dtype)
        self.torch_dtype = torch.from_numpy(np.zeros(0, self.dtype)).dtype
        self._slots: list[tuple[torch.Tensor, torch.Tensor]] = []  # pinned (crops, latents) x 2, on first GPU use
        self._slots_key: tuple | None = None
        self.encoded_on = where_this_runs(self.device)
        self.limits = limits
        self._jpeg_cropper: JpegCropper | None = None  # made for the first row of JPEG bytes

    @torch.inference_mode()
    def encode(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """(n, S, S, 3) uint8, on the host or already on the device -> (n, V, N, C) latents, V = 2 with
        the flipped view."""
        n, c = self.encoder.latent_spec().shape
        out = np.empty((len(images), 2 if self.flip else 1, n, c), self.dtype)
        if self.device.type == "cuda":
            self._encode_pipelined(images, out)
        else:
            for start in range(0, len(images), self.batch_size):
                x = images[start:start + self.batch_size]
                x = x.to(self.device) if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x))
                out[start:start + len(x)] = self._latents(x).numpy()
        return out

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        """(b, S, S, 3) uint8 on the device -> (b, V, N, C) latents in the store dtype, on the device."""
        x = to_unit_images(images)
        views = [x, x.flip(-1)] if self.flip else [x]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return torch.stack([self.encoder(v).float() for v in views], dim=1).to(self.torch_dtype)

    def _encode_pipelined(self, images: np.ndarray | torch.Tensor, out: np.ndarray) -> None:
        """Batches through two pinned host slots, so the host's copies (crops in, latents out) overlap
        the GPU's work on the other slot instead of idling it: with one synchronous batch at a time
        the GPU ran DINOv2-B at a third of its rate (benchmarks/README.md)."""
        slots = self._pinned_slots(images.shape[1:], out.shape[1:])
        pending: list[tuple[int, int, torch.cuda.Event] | None] = [None, None]

        def drain(slot: int) -> None:
            if pending[slot] is not None:
                start, stop, done = pending[slot]
                done.synchronize()
                out[start:stop] = slots[slot][1][:stop - start].numpy()
                pending[slot] = None

        for index, start in enumerate(range(0, len(images), self.batch_size)):
            slot = index % 2
            drain(slot)  # its previous batch is back on the host and its input buffer is free
            stop = min(start + self.batch_size, len(images))
            host_in, host_out = slots[slot]
            if isinstance(images, torch.Tensor):  # crops made on the device: no copy in
                x = images[start:stop].to(self.device)
            else:
                np.copyto(host_in[:stop - start].numpy(), images[start:stop])
                x = host_in[:stop - start].to(self.device, non_blocking=True)
            latents = self._latents(x)
            host_out[:stop - start].copy_(latents, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            pending[slot] = (start, stop, done)
        for slot in (0, 1):
            drain(slot)

    def jpeg_cropper(self) -> JpegCropper:
        """The JPEG decoder + cropper of this actor: on its CUDA device when nvJPEG works there, else on CPU."""
        if self._jpeg_cropper is None:
            from pipelines.gpu_decode import JpegCropper, nvjpeg_problem
            from pipelines.image_decode import DecodeLimits

            device = self.device
            if device.type == "cuda":
                problem = nvjpeg_problem()
                if problem:
                    log.warning("nvJPEG does not work on this GPU (%s); this actor decodes JPEGs on its CPU", problem)
                    device = torch.device("cpu")
            self._jpeg_cropper = JpegCropper(self.encoder.spec.image_size, device, self.limits or DecodeLimits())
        return self._jpeg_cropper

    def _pinned_slots(self, image_shape: tuple, latent_shape: tuple) -> list[tuple[torch.Tensor, torch.Tensor]]:
        key = (tuple(image_shape), tuple(latent_shape))
        if self._slots_key != key:
            b = self.batch_size
            self._slots = [(torch.empty((b, *image_shape), dtype=torch.uint8).pin_memory(),
                            torch.empty((b, *latent_shape), dtype=self.torch_dtype).pin_memory()) for _ in range(2)]
            self._slots_key = key
        return self._slots

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "jpegs" in batch:
            from pipelines.gpu_decode import crop_split_shard

            cropper = self.jpeg_cropper()
            images, meta = crop_split_shard(json.loads(batch["meta"][0]), batch["images"][0], batch["jpegs"][0], cropper)
            latents = self.encode(images)
            meta["encoded_on"] = {**self.encoded_on, "jpeg_decode": cropper.device.type}
        else:
            latents = self.encode(batch["images"][0])
            meta = {**json.loads(batch["meta"][0]), "encoded_on": self.encoded_on}
        meta = json.dumps(meta)
        return {"shard_index": batch["shard_index"], "meta": np.array([meta]), "latents": latents[None]}


def where_this_runs(device: torch.device) -> dict[str, str | None]:
    """The node (id, autoscaler node type) and torch device a shard is encoded on, recorded with it:
    on an autoscaled cluster it shows which node type did the work, and a logical GPU without CUDA
    (device ``cpu`` on a GPU node type) shows as such. Outside Ray the node fields are None."""
    node_id = node_type = None
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            node_id = context.get_node_id()
            labels = context.get_node_labels() if hasattr(context, "get_node_labels") else {}
            node_type = labels.get("ray.io/node-group") or labels.get("ray.io/node-type")
    except Exception:  # where it ran is a record, never a reason to fail the encode
        pass
    return {"node_id": node_id, "node_type": os.environ.get("RAY_NODE_TYPE_NAME") or node_type, "device": device.type}
