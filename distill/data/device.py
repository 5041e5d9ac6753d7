"""The part of preprocessing that runs on the device, in the step: uint8 pixels to float, normalised, and random
erasing's noise filled in.

Loader workers ship uint8 images, a quarter of the bytes of normalised fp32 to pin, copy and send to a GPU, and do
none of the per-pixel float arithmetic, which the device does for a whole batch at once (timm's prefetcher, the
same idea). The values are torchvision's, on any device: ToTensor's and Normalize's operations (x / 255, minus the
mean, divided by the std, in fp32), every divisor a tensor on the device, never a Python number (CUDA divides by a
Python number through its reciprocal, which differs in the last bit for half of the byte values; a tensor divisor is
IEEE division there as on a CPU). A batch finished here equals the one the worker computed before, bit for bit.

Random erasing stays a per-sample decision taken in the worker: the worker draws the box with timm's own
RandomErasing (the same python `random` draws, in the same place of the sample's seeded stream, as when it erased
there) and a seed for its noise; the device fills the box with normal noise from that seed. A sample's erasing is
thus a pure function of its augmentation seed and of the kind of device that fills it (a CPU's generator and CUDA's
draw different normal numbers from one seed): a resumed run and a teacher cache's replay on the same kind of device
see the very pixels an uninterrupted run saw.
"""


from __future__ import annotations

import copy
import random
from typing import Any, Sequence

import torch
from timm.data.random_erasing import RandomErasing

Pixels = torch.Tensor | dict[str, torch.Tensor]  # uint8 [.., 3, H, W], or {"pixels": ..., "erase": [.., 5]}


class _Box:
    """Stands for the image in timm's RandomErasing._erase, which assigns the noise to img[:, top:bottom, left:right]:
    it keeps the slice and drops the values."""

    def __init__(self) -> None:
        self.box = (0, 0, 0, 0)

    def __setitem__(self, key: tuple[slice, slice, slice], value: Any) -> None:
        _, rows, cols = key
        self.box = (rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start)


class EraseBox:
    """The worker's half of random erasing ('pixel' mode, one box, DeiT's): the box timm's RandomErasing draws for a
    C x H x W image, and a seed for its noise, carried beside the uint8 pixels as (top, left, height, width, seed);
    height 0 when the image is not erased. Built from the RandomErasing timm's create_transform made, with its
    settings; only its box is used."""

    def __init__(self, erasing: RandomErasing):
        if erasing.min_count != 1 or erasing.max_count != 1 or erasing.num_splits > 1:
            raise ValueError("EraseBox carries one box per image; timm's erasing asks for several")
        self.probability = erasing.probability
        self.timm = copy.copy(erasing)
        self.timm.mode, self.timm.per_pixel, self.timm.rand_color, self.timm.device = "const", False, False, "cpu"

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        recorder = _Box()
        channels, height, width = pixels.shape
        self.timm._erase(recorder, channels, height, width, torch.float32)  # timm's draws, no pixels touched
        seed = random.getrandbits(62) if recorder.box[2] else 0
        return {"pixels": pixels, "erase": torch.tensor([*recorder.box, seed], dtype=torch.int64)}

    def __repr__(self) -> str:
        return f"EraseBox(p={self.probability})"


class Finish:
    """uint8 batches to normalised float on the device, random erasing filled in. One per normalisation; each
    consumer of a loader (training step, evaluation, prediction, the teacher cache) finishes its batches here."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, batch: Pixels, device: torch.device | str | None = None, non_blocking: bool = True) -> torch.Tensor:
        erase = None
        if isinstance(batch, dict):
            batch, erase = batch["pixels"], batch["erase"]
        if batch.dtype != torch.uint8:
            raise TypeError(f"Finish takes uint8 pixels, not {batch.dtype}")
        where = torch.device(device) if device is not None else batch.device
        scale, mean, std = self._on(where)
        images = batch.to(where, non_blocking=non_blocking).float().div_(scale).sub_(mean).div_(std)
        if erase is not None:
            self._erase(images, erase)
        return images

    def _on(self, where: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """255, the mean and the std as [1, C, 1, 1] tensors on the device (tensors: see the module's docstring)."""
        if where not in self._constants:
            channels = len(self.mean)
            self._constants[where] = tuple(torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1).expand(1, channels, 1, 1)
                                           .contiguous().to(where) for v in ((255.0,), self.mean, self.std))  # type: ignore[assignment]
        return self._constants[where]

    def _erase(self, images: torch.Tensor, erase: torch.Tensor) -> None:
        """Each erased image's box filled with normal noise from its own seed (a loop over the erased images, as
        timm's prefetcher loops; about a quarter of a batch at DeiT's 0.25)."""
        rows = erase.cpu().tolist() if erase.device.type != "cpu" else erase.tolist()
        generator = self._generators.get(images.device)
        if generator is None:
            generator = self._generators[images.device] = torch.Generator(device=images.device)
        channels = images.shape[1]
        for i, (top, left, height, width, seed) in enumerate(rows):
            if height:
                generator.manual_seed(seed)
                images[i, :, top:top + height, left:left + width] = torch.randn(
                    (channels, height, width), generator=generator, device=images.device, dtype=images.dtype)

    def __repr__(self) -> str:
        return f"Finish(mean={self.mean}, std={self.std})"

    def __getstate__(self) -> dict[str, Any]:  # pickled into loader workers with the transform: no device tensors
        return {"mean": self.mean, "std": self.std}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["mean"], state["std"])  # type: ignore[misc]
