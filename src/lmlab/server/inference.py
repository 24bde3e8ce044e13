"""Generation for the web app: trained model directories loaded once (safetensors + JSON only) and kept
in a small LRU, reloaded when a newer training run replaces the weights. The serving copy is never the
object a training process updates: training lives in another process and writes a new directory."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..models.io import CONFIG, TOKENIZER, WEIGHTS, load_pretrained
from .workspace import snapshot_dir


class NotTrained(LookupError):
    pass


def unservable(folder: Path, name: str) -> str | None:
    """Why the model directory cannot be loaded for generation (a file it lacks), or None: the one rule of the
    cache below and of the models the OpenAI API lists, so that it lists none it then answers 404 for."""
    for file, why in ((WEIGHTS, "no weights yet: train it first"), (CONFIG, f"no {CONFIG}"),
                      (TOKENIZER, f"no {TOKENIZER}")):
        if not (folder / file).is_file():
            return f"model {name!r} has {why}"
    return None


class ModelCache:
    """Loads from a snapshot of the directory (workspace.snapshot_dir, in `scratch`: hard links, so on the
    same file system as the models) so that a finished run swapping the directory in meanwhile cannot hand
    it one version's config and another's weights."""

    def __init__(self, scratch: Path, size: int = 4) -> None:
        self.scratch, self.size = scratch, size
        self._items: OrderedDict[Path, tuple[tuple[int, int], Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, snapshot: Callable[[Path, Path], Path] = snapshot_dir) -> tuple[Any, Any]:
        """The model of the directory `path` (or of a checkpoint: `snapshot` makes the model directory of it)."""
        tmp = Path(tempfile.mkdtemp(dir=self.scratch, prefix="load-"))
        try:
            folder = snapshot(path, tmp / path.name)
            if (why := unservable(folder, path.name)) is not None:
                raise NotTrained(why)
            st = (folder / WEIGHTS).stat()
            stamp = (st.st_mtime_ns, st.st_size)
            with self._lock:  # one loader at a time; a hit costs a dict lookup
                hit = self._items.get(path)
                if hit is not None and hit[0] == stamp:
                    self._items.move_to_end(path)
                    return hit[1], hit[2]
                model, tokenizer = load_pretrained(folder)
                self._items[path] = (stamp, model, tokenizer)
                self._items.move_to_end(path)
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
                return model, tokenizer
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def forget(self, path: Path) -> None:
        with self._lock:
            self._items.pop(path, None)
