"""The released archive's oddities planted into a catalogue (``quirks=True``): each odd file
takes the place of an ordinary train image and is recorded in :attr:`SynthSummary.quirks`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ...errors import ConfigError
from .config import ClassSpec, _pick
from .naming import _relpath


class _Planter:
    """Puts odd files in place of ordinary train images, taking host classes in turn."""

    def __init__(self, classes: list[ClassSpec], hosts: list[int], rng: np.random.Generator):
        self.classes, self.rng = classes, rng
        self.hosts = [int(h) for h in rng.permutation(hosts)]
        self.free = {
            h: [im.index for im in classes[h].images if im.split == "train"] for h in hosts
        }
        self.turn = 0
        self.last_host = -1

    def _next_host(self, exclude: int) -> int:
        for step in range(len(self.hosts)):
            host = self.hosts[(self.turn + step) % len(self.hosts)]
            if host != exclude and self.free[host]:
                self.turn += step + 1
                return host
        raise ConfigError("too few train images to plant the quirks; raise --images-per-class or pass --no-quirks")

    def plant(self, kind: str, name: Callable[[str], str], exclude: int = -1) -> str:
        """Turn a free train image of the next host (not class ``exclude``) into ``kind``,
        renamed ``name(old stem)``; returns its relative path."""
        host = self.last_host = self._next_host(exclude)
        free = self.free[host]
        i = free.pop(int(self.rng.integers(len(free))))
        spec = self.classes[host]
        image = spec.images[i]
        image = replace(image, kind=kind, name=name(image.name.rsplit(".", 1)[0]))
        self.classes[host] = replace(spec, images=spec.images[:i] + (image,) + spec.images[i + 1 :])
        return _relpath(self.classes[host], image)

    def copy(self) -> str:
        """Add a byte-identical copy of an untouched train JPEG, named like Windows names
        copies (``0716_7768 - 副本 (2).jpg``); returns its relative path."""
        host = self._next_host(exclude=-1)
        spec = self.classes[host]
        jpegs = [i for i in self.free[host] if spec.images[i].kind == "jpg"] or self.free[host]
        original = spec.images[_pick(self.rng, jpegs)]
        # The same index seeds the same random stream: the same pixels and bytes.
        stem, suffix = original.name.rsplit(".", 1)
        copy = replace(original, name=f"{stem} - 副本 (2).{suffix}")
        self.classes[host] = replace(spec, images=spec.images + (copy,))
        return _relpath(self.classes[host], copy)


def _plant_quirks(
    classes: list[ClassSpec], rng: np.random.Generator
) -> tuple[list[ClassSpec], dict[str, object]]:
    """Turn a clean catalogue into one with RP2K's oddities; returns what was planted."""
    empty = classes.pop()  # the extra product: a folder without images
    quirks: dict[str, object] = {"empty_class": f"all/train/{empty.folder}"}

    # The smallest class of >= 3 images moves wholly to test.
    only_test = min((c for c in classes[1:] if len(c.images) >= 3), key=lambda c: len(c.images))
    moved = tuple(replace(im, split="test") for im in only_test.images)
    classes[only_test.index] = replace(only_test, images=moved)
    quirks["test_only_class"] = f"all/test/{only_test.folder}"

    # A folder name with a space and full-width brackets, like 青岛啤酒 经典（500ml）.
    spec = classes[int(rng.choice([c.index for c in classes[1:] if c.type != "tobacco"]))]
    folder = f"{spec.brand}{spec.name} {spec.flavour or '经典'}（{spec.size}）"
    classes[spec.index] = replace(spec, folder=folder)
    quirks["space_class"] = folder

    # Odd files replace train images of classes that keep at least one other image.
    hosts = [c.index for c in classes if sum(im.split == "train" for im in c.images) >= 2]
    planter = _Planter(classes, hosts, rng)
    quirks["rgba_png"] = planter.plant("rgba", lambda stem: stem + ".png")
    quirks["palette_png"] = planter.plant("palette", lambda stem: stem + ".png")
    quirks["corrupt"] = planter.plant("corrupt", lambda stem: stem + ".jpg")
    quirks["screenshot"] = planter.plant("png", lambda stem: "截屏2019-12-10下午5.15.14.png")
    first = planter.plant("jpg", lambda stem: stem + ".jpg")
    shared = first.rsplit("/", 1)[1]
    second = planter.plant("jpg", lambda stem: shared, exclude=planter.last_host)
    quirks["duplicate_basename"] = [first, second]
    quirks["copy_name"] = planter.copy()
    return classes + [empty], quirks
