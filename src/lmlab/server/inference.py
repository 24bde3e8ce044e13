"""Generation for the web app: trained model directories loaded once (safetensors + JSON only) and kept
in a small LRU, reloaded when a newer training run replaces the weights. The serving copy is never the
object a training process updates: training lives in another process and writes a new directory."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..models.io import WEIGHTS, load_pretrained


class NotTrained(LookupError):
    pass


class ModelCache:
    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._items: OrderedDict[Path, tuple[int, Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> tuple[Any, Any]:
        weights = path / WEIGHTS
        if not weights.is_file():
            raise NotTrained(f"model {path.name!r} has no weights yet: train it first")
        stamp = weights.stat().st_mtime_ns
        with self._lock:  # one loader at a time; a hit costs a dict lookup
            hit = self._items.get(path)
            if hit is not None and hit[0] == stamp:
                self._items.move_to_end(path)
                return hit[1], hit[2]
            model, tokenizer = load_pretrained(path)
            if tokenizer is None:
                raise NotTrained(f"model {path.name!r} has no tokenizer.json")
            self._items[path] = (stamp, model, tokenizer)
            self._items.move_to_end(path)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return model, tokenizer

    def forget(self, path: Path) -> None:
        with self._lock:
            self._items.pop(path, None)
