"""Exact and near-duplicate removal, at document or paragraph level, with clusters that can be opened.

    lmlab data dedup books/ --out books-dedup                 # documents; exact + MinHash/LSH near duplicates
    lmlab data dedup books/ --out paras --level paragraph --keep none --threshold 0.8
    lmlab data clusters books-dedup --show 3                  # the members of cluster 3 and their shared shingles

Text is compared as its words: `\\w+` runs of the NFKC, case-folded text with ё read as е, joined by one space
(punctuation, case, spacing, ligatures and the dots of ё do not make two texts different). Exact duplicates
share a BLAKE2b digest of that form. Near duplicates follow MinHash + LSH as datatrove's FineWeb pipeline runs
it (word 5-gram shingles, 14 bands of 8 rows = 112 permutations, https://github.com/huggingface/datatrove): a
pair sharing all rows of any band is a candidate, so a pair of Jaccard similarity s is caught with probability
1 - (1 - s^rows)^bands (0.92 at s = 0.8). By default every candidate is a duplicate, as in datatrove; with
`threshold`, a candidate is kept only if the signatures agree on at least that share of the permutations (the
MinHash estimate of its Jaccard).

Signatures are bit-identical to datasketch's MinHash (scheme "affine32", its default since 2.0.0,
https://github.com/ekzhu/datasketch): a shingle's hash is the first 4 bytes of its SHA-1 read little-endian,
mixed once by the MurmurHash3 finalizer, then permuted as a*h + b mod 2^32 with odd a and b drawn from
numpy's RandomState(seed). So the candidate pairs equal those of datasketch's MinHashLSH with
params=(bands, rows) (tests/test_dedup.py checks it). Here each shingle is hashed once and the permutations
run as one numpy product over blocks of shingles, so memory stays bounded by the block and the
(units x permutations) uint32 signature matrix (45 MB for 100,000 units).

Clusters are the connected components (union-find) of exact groups and near pairs; `keep="one"` keeps each
cluster's first member in source order, `keep="none"` drops the whole cluster (Lee et al. 2022, "Deduplicating
Training Data Makes Language Models Better", https://arxiv.org/abs/2107.06499, removes all but one).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..configs import knob, validate
from ..files import fix_modes, temp_dir_beside
from .dataset import _document_names
from .documents import find_documents, read_document

CLUSTERS, REPORT, TEXTS = "clusters.json", "report.json", "texts"
_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s")
_PARAGRAPH = re.compile(r"[^\n]*\S[^\n]*(?:\n[^\n]*\S[^\n]*)*")  # a run of non-blank lines
_MAX32 = np.uint32(0xFFFFFFFF)
_sha1 = hashlib.sha1
_BLOCK_ROWS = 1 << 15  # shingles permuted at once: 32768 x 112 x 4 bytes = 14 MB of temporaries
# datatrove uses 112 permutations, datasketch 128 by default; 1,024 holds the block's temporaries to 128 MB and
# the signatures to 4 KB a unit
MAX_PERM = 1024


@dataclass(frozen=True)
class DedupConfig:
    level: str = "doc"  # "doc" or "paragraph"
    near: bool = True  # MinHash near duplicates besides exact ones
    ngram: int = 5  # words per shingle
    bands: int = 14
    rows: int = 8  # permutations per band; bands x rows permutations in all
    # datasketch's default seed; numpy's RandomState takes 0..2^32-1 (-1 failed as an internal error, after reading)
    seed: int = knob(1, "the permutations' seed", ge=0, lt=2**32)
    threshold: float | None = None  # verify candidates: estimated Jaccard >= threshold; None keeps every candidate
    keep: str = "one"  # "one": the first member of each cluster stays; "none": every member goes

    def __post_init__(self) -> None:
        validate(self)  # types (ngram=2.5 was a TypeError later), finite numbers, the seed's bounds
        if self.level not in ("doc", "paragraph"):
            raise ValueError(f"level must be doc or paragraph, not {self.level!r}")
        if self.keep not in ("one", "none"):
            raise ValueError(f"keep must be one or none, not {self.keep!r}")
        for name in ("ngram", "bands", "rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be at least 1")
        if self.bands * self.rows > MAX_PERM:  # 100,000 x 100,000 asked numpy for 37 GiB before any text was read
            raise ValueError(f"bands x rows ({self.bands} x {self.rows}) must be at most {MAX_PERM:,} permutations")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold ({self.threshold}) must be in [0, 1]")

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows


def fold(text: str) -> str:
    """The form words are compared in: NFKC (a ligature or a full-width letter is its plain letters), case-folded,
    and ё read as е (Russian prints most books without the dots, and one edition of a text must match the other)."""
    return unicodedata.normalize("NFKC", text).casefold().replace("ё", "е")


def words(text: str) -> list[str]:
    return _WORD.findall(fold(text))


WORD_CHUNK_CHARS = 1 << 21  # text cut into words at a time: every word of a 45 MB book at once held ~0.8 GB


def word_chunks(text: str, keep: int = 0) -> Iterator[tuple[list[str], int]]:
    """The words of `text` (as words() cuts them) a piece of about WORD_CHUNK_CHARS characters at a time, as
    (words, fresh): each piece after the first starts with the last `keep` words of the piece before, and its own
    words start at `fresh`. So every run of keep + 1 words lies whole in one piece, and pieces[fresh:] joined
    are words(text). Only one piece is held at a time."""
    tail: list[str] = []
    start = 0
    while True:
        end = len(text)
        if start + WORD_CHUNK_CHARS < end:  # cut after a space: no word, nor a letter and its accent, spans it
            cut = _SPACE.search(text, start + WORD_CHUNK_CHARS)
            end = cut.end() if cut else end
        piece = tail + _WORD.findall(fold(text[start:end]))
        yield piece, len(tail)
        if end >= len(text):
            return
        tail = piece[-keep:] if keep else []
        start = end


def shingles(text: str, n: int = 5) -> set[str]:
    """Word n-grams joined by spaces; a text of fewer than n words is one shingle (none if it has no word)."""
    return ngrams(words(text), n)


def ngrams(w: list[str], n: int) -> set[str]:
    """Word n-grams of the words `w`, joined by spaces; fewer than n words make one shorter gram."""
    if len(w) < n:
        return {" ".join(w)} if w else set()
    return set(map(" ".join, zip(*(w[k:] for k in range(n)))))


def unit_hashes(text: str, n: int = 5, grams: bool = True) -> tuple[bytes, np.ndarray]:
    """(key, hashes) of one text. key: the BLAKE2b digest of its words joined by single spaces, which exact
    duplicates share (b"" for a text without words). hashes: datasketch's sha1_hash32 of each distinct word
    n-gram (UTF-8, joined by spaces): SHA-1's first 4 bytes, little-endian; a text of fewer than n words is one
    shorter gram. Made distinct as hashes (the same set as the shingles' for MinHash, whose minimum no repeat
    changes); none without `grams`. The text is cut into words a piece at a time (word_chunks), so memory is
    bounded by a piece."""
    key = hashlib.blake2b(digest_size=16)
    parts, first, total = [], [], 0
    for piece, fresh in word_chunks(text, keep=n - 1):
        if len(piece) > fresh:
            key.update((b" " if total else b"") + " ".join(piece[fresh:]).encode())
            total += len(piece) - fresh
            first += piece[fresh:][:n - len(first)]  # the words of a text shorter than n
        if not grams or len(piece) < n:
            continue
        w = " ".join(piece).encode().split(b" ")  # encoded once, not gram by gram
        digests = b"".join([_sha1(g).digest() for g in set(map(b" ".join, zip(*(w[k:] for k in range(n)))))])
        parts.append(np.unique(np.frombuffer(digests, dtype="<u4")[::5]))  # 20-byte digests: every 5th word
    if not total or not grams:
        return key.digest() if total else b"", np.zeros(0, dtype=np.uint32)
    if total < n:
        parts = [np.frombuffer(_sha1(" ".join(first).encode()).digest()[:4], dtype="<u4")]
    return key.digest(), np.unique(np.concatenate(parts)).astype(np.uint32)


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutation parameters: odd a and any b, uint32, from RandomState(seed)."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, the bijection datasketch applies before permuting."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def signatures(texts: Iterable[str], config: DedupConfig = DedupConfig()) -> np.ndarray:
    """(len(texts), bands*rows) uint32 MinHash signatures; a text without words gets all 0xFFFFFFFF."""
    return _signatures((unit_hashes(t, config.ngram)[1] for t in texts), config)


def _signatures(hashed: Iterable[np.ndarray], config: DedupConfig) -> np.ndarray:
    """Signatures of texts given as unit_hashes' hashes."""
    a, b = (p[:, None] for p in permutations(config.num_perm, config.seed))
    rows: list[np.ndarray] = []  # finished (num_perm, k) blocks of signatures, transposed
    pending: list[np.ndarray] = []
    size = 0

    def flush() -> None:
        sig = np.full((config.num_perm, len(pending)), _MAX32, dtype=np.uint32)
        lengths = np.array([len(p) for p in pending])
        nonempty = np.flatnonzero(lengths)
        if len(nonempty):
            hv = _fmix32(np.concatenate(pending))
            owner = np.repeat(nonempty, lengths[nonempty])
            for start in range(0, len(hv), _BLOCK_ROWS):
                block = a * hv[start:start + _BLOCK_ROWS] + b  # (num_perm, shingles), wraps mod 2^32
                own = owner[start:start + _BLOCK_ROWS]
                cuts = np.flatnonzero(np.r_[True, own[1:] != own[:-1]])
                docs = own[cuts]  # distinct within a block: a text's shingles are contiguous
                sig[:, docs] = np.minimum(sig[:, docs], np.minimum.reduceat(block, cuts, axis=1))
        rows.append(sig)
        pending.clear()

    for hashes in hashed:
        pending.append(hashes)
        size += len(pending[-1])
        if size >= 4 * _BLOCK_ROWS:
            flush()
            size = 0
    if pending or not rows:
        flush()
    return np.ascontiguousarray(np.concatenate(rows, axis=1).T)


BUCKET_ALL_PAIRS = 64  # a bucket of more members pairs each with its next BUCKET_NEXT (templated text)
BUCKET_NEXT = 16
CLUSTER_PAIRS = 100   # the pairs a cluster lists (its count is pairs_total)


def candidate_pairs(sig: np.ndarray, bands: int, rows: int, valid: np.ndarray | None = None) -> np.ndarray:
    """(P, 2) int64 pairs i < j, sorted, that agree on every row of at least one band (MinHashLSH's
    candidates). Rows where `valid` is False take no part. Each bucket of k members gives k(k-1)/2 pairs, so
    exact duplicates are best collapsed first (dedup_texts does); a bucket of more than BUCKET_ALL_PAIRS gives
    each member's pairs with the next BUCKET_NEXT members instead, which still joins them into one cluster (20,000
    templated paragraphs gave 2.7M pairs and 1.9 GB, a web request 8M pairs and 9.8 GB)."""
    idx = np.arange(len(sig)) if valid is None else np.flatnonzero(valid)
    found: list[np.ndarray] = []
    for band in range(bands):
        cols = sig[idx, band * rows:(band + 1) * rows]
        order = np.lexsort(cols.T[::-1])
        srt = cols[order]
        starts = np.flatnonzero(np.r_[True, np.any(srt[1:] != srt[:-1], axis=1)])
        sizes = np.diff(np.r_[starts, len(srt)])
        for s, k in zip(starts[sizes > 1], sizes[sizes > 1]):
            members = np.sort(idx[order[s:s + k]])
            if k <= BUCKET_ALL_PAIRS:
                i, j = np.triu_indices(k, 1)
            else:
                i = np.repeat(np.arange(k), BUCKET_NEXT)
                j = i + np.tile(np.arange(1, BUCKET_NEXT + 1), k)
                i, j = i[j < k], j[j < k]
            found.append(members[i] * len(sig) + members[j])
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    codes = np.unique(np.concatenate(found))
    return np.stack([codes // len(sig), codes % len(sig)], axis=1)


def estimated_jaccard(sig: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Share of permutations on which each pair's signatures agree."""
    out = np.empty(len(pairs))
    for s in range(0, len(pairs), 4096):
        p = pairs[s:s + 4096]
        out[s:s + 4096] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1)
    return out


def _find(parent: list[int], x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]  # path halving
        x = parent[x]
    return x


@dataclass
class Unit:
    doc: int  # index of the document
    start: int  # [start, end) characters in the document's text
    end: int


@dataclass
class DedupResult:
    units: list[Unit]
    clusters: list[dict]  # {"id", "kind": exact|near, "members": [unit], "kept": [unit], "pairs": [[u, v, J]]}
    keep: np.ndarray  # bool per unit
    stats: dict = field(default_factory=dict)


def split_units(texts: Sequence[str], level: str) -> list[Unit]:
    if level == "doc":
        return [Unit(i, 0, len(t)) for i, t in enumerate(texts)]
    return [Unit(i, m.start(), m.end()) for i, t in enumerate(texts) for m in _PARAGRAPH.finditer(t)]


def dedup_texts(texts: Sequence[str], config: DedupConfig = DedupConfig()) -> DedupResult:
    """Find exact and (with config.near) near duplicates among the units of `texts`; nothing is written."""
    units = split_units(texts, config.level)
    n = len(units)
    parent = list(range(n))
    reps: list[int] = []
    seen: dict[bytes, int] = {}

    def new_units():  # one pass over the text: exact duplicates join their first copy, the rest are signed
        for u, unit in enumerate(units):
            key, hashes = unit_hashes(texts[unit.doc][unit.start:unit.end], config.ngram, grams=config.near)
            if not key:
                continue  # blank or punctuation only: neither duplicate nor original
            if key in seen:
                parent[u] = seen[key]
            else:
                seen[key] = u
                reps.append(u)
                yield hashes

    near_pairs, candidates = np.zeros((0, 3)), 0
    if config.near:
        sig = _signatures(new_units(), config)
    else:
        sig = None
        for _ in new_units():
            pass
    exact_removable = sum(1 for u in range(n) if parent[u] != u)
    if sig is not None and len(reps) > 1:
        pairs = candidate_pairs(sig, config.bands, config.rows)
        jac = estimated_jaccard(sig, pairs)
        candidates = len(pairs)
        if config.threshold is not None:
            pairs, jac = pairs[jac >= config.threshold], jac[jac >= config.threshold]
        rep = np.array(reps)
        near_pairs = np.c_[rep[pairs], jac] if len(pairs) else near_pairs
        for i, j in rep[pairs]:
            ri, rj = _find(parent, int(i)), _find(parent, int(j))
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)  # the root is the earliest unit: it is the one kept
    roots = [_find(parent, u) for u in range(n)]
    members: dict[int, list[int]] = {}
    for u, r in enumerate(roots):
        members.setdefault(r, []).append(u)
    pair_lists: dict[int, list] = {}
    for i, j, jv in near_pairs:
        pair_lists.setdefault(roots[int(i)], []).append([int(i), int(j), round(float(jv), 4)])
    keep = np.ones(n, dtype=bool)
    clusters = []
    for r in sorted(r for r, m in members.items() if len(m) > 1):
        m = members[r]
        kept = m[:1] if config.keep == "one" else []
        keep[[u for u in m if u not in kept]] = False
        pairs = pair_lists.get(r, [])
        clusters.append({"id": len(clusters), "kind": "near" if r in pair_lists else "exact", "members": m,
                         "kept": kept, "pairs": pairs[:CLUSTER_PAIRS], "pairs_total": len(pairs)})
    chars_in = sum(u.end - u.start for u in units)
    chars_out = sum(u.end - u.start for u, k in zip(units, keep) if k)
    stats = {"units": n, "removed": int(n - keep.sum()), "exact_duplicates": exact_removable,
             "clusters": len(clusters), "near_clusters": sum(c["kind"] == "near" for c in clusters),
             "candidate_pairs": int(candidates), "near_pairs": len(near_pairs),
             "chars_in": chars_in, "chars_out": chars_out, "config": asdict(config)}
    return DedupResult(units, clusters, keep, stats)


def kept_texts(texts: Sequence[str], result: DedupResult) -> list[str]:
    """Each document with its removed units left out (paragraphs joined by a blank line); "" if none stays."""
    parts: list[list[str]] = [[] for _ in texts]
    for unit, k in zip(result.units, result.keep):
        if k:
            parts[unit.doc].append(texts[unit.doc][unit.start:unit.end])
    if result.stats["config"]["level"] == "doc":
        return [p[0] if p else "" for p in parts]
    return ["\n\n".join(p) + "\n" if p else "" for p in parts]


def dedup(sources: Sequence[str | Path], out_dir: str | Path, config: DedupConfig = DedupConfig()) -> DedupResult:
    """Read every document under `sources`, deduplicate and write `out_dir` (refused if it exists):
    texts/NAME.txt for each document with text left, clusters.json and report.json. The folder appears
    whole or not at all (written under a temporary name, then renamed)."""
    out = Path(out_dir)
    if out.exists():
        raise ValueError(f"{out} already exists; choose a new --out (nothing is overwritten)")
    paths = find_documents(sources)
    names = _document_names(paths)
    files = [name if name.endswith((".txt", ".md")) else name + ".txt" for name in names]
    twice = next((f for i, f in enumerate(files) if f in files[:i]), None)
    if twice is not None:  # "notes" beside "notes.txt": the second overwrote the first without a word
        raise ValueError(f"two documents would be written as the same file: {TEXTS}/{twice}")
    texts = [read_document(p) for p in paths]
    result = dedup_texts(texts, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)
    try:
        (tmp / TEXTS).mkdir()
        written = []
        for name, text in zip(names, kept_texts(texts, result)):
            if text.strip():
                target = tmp / TEXTS / (name if name.endswith((".txt", ".md")) else name + ".txt")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
                written.append(name)
        sources_json = [{"name": n, "path": str(p.resolve())} for n, p in zip(names, paths)]
        clusters = [{**c, "members": [_member(u, result.units[u], texts, names, u in c["kept"])
                                      for u in c["members"]]} for c in result.clusters]
        (tmp / CLUSTERS).write_text(json.dumps({"config": asdict(config), "sources": sources_json,
                                                "clusters": clusters}, ensure_ascii=False, indent=1),
                                     encoding="utf-8")  # not the locale's: Russian under LC_ALL=C
        result.stats.update(documents=len(texts), documents_out=len(written))
        (tmp / REPORT).write_text(json.dumps(result.stats, indent=1), encoding="utf-8")
        fix_modes(tmp)
        if out.exists():
            raise ValueError(f"{out} appeared while deduplicating; nothing was overwritten")
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _member(u: int, unit: Unit, texts: Sequence[str], names: Sequence[str], kept: bool) -> dict:
    text = texts[unit.doc][unit.start:unit.end]
    return {"unit": u, "doc": names[unit.doc], "source": unit.doc, "start": unit.start, "end": unit.end,
            "sha1": hashlib.sha1(text.encode()).hexdigest(), "kept": kept, "preview": " ".join(text.split())[:80]}


def load_clusters(out_dir: str | Path) -> dict:
    """clusters.json of a dedup folder, checked as far as `lmlab data clusters` and open_cluster read it."""
    path = Path(out_dir) / CLUSTERS
    if not path.is_file():
        raise FileNotFoundError(f"no {CLUSTERS} in {out_dir}: not a folder written by lmlab data dedup")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        why = _clusters_problem(data)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        why = f"{type(exc).__name__}: {exc}"
    if why:
        raise ValueError(f"{path} is not a dedup clusters file ({why})")
    return data


_MEMBER = {"unit": int, "doc": str, "source": int, "start": int, "end": int, "sha1": str, "kept": bool,
           "preview": str}


def _clusters_problem(data: object) -> str | None:
    """What in `data` is not as dedup() writes clusters.json (the parts read back), or None."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    for key, kind in {"config": dict, "sources": list, "clusters": list}.items():
        if not isinstance(data.get(key), kind):
            return f'no "{key}" {"object" if kind is dict else "array"}'
    if not isinstance(data["config"].get("ngram"), int):
        return 'no "ngram" in its "config"'
    if not all(isinstance(s, dict) and isinstance(s.get("path"), str) for s in data["sources"]):
        return 'a source without its "path"'
    for c in data["clusters"]:
        if not (isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("kind"), str)
                and isinstance(c.get("members"), list) and c["members"]):
            return 'a cluster without its "id", "kind" or "members"'
        if not all(isinstance(m, dict) and all(isinstance(m.get(k), t) for k, t in _MEMBER.items())
                   and 0 <= m["source"] < len(data["sources"]) for m in c["members"]):
            return f"a member of cluster {c['id']} without its {', '.join(_MEMBER)} or its source"
    return None


def open_cluster(out_dir: str | Path, cluster_id: int, max_shingles: int = 20) -> dict:
    """A cluster's members with their texts (re-read from the sources, checked against the recorded SHA-1),
    each member's exact shingle Jaccard with the first, and the shingles every member shares."""
    data = load_clusters(out_dir)
    clusters = data["clusters"]
    if not 0 <= cluster_id < len(clusters):
        raise ValueError(f"no cluster {cluster_id} in {out_dir} (it has {len(clusters)}: 0..{len(clusters) - 1})")
    cluster, n = clusters[cluster_id], data["config"]["ngram"]
    cache: dict[int, str] = {}
    members = []
    for m in cluster["members"]:
        if m["source"] not in cache:
            cache[m["source"]] = read_document(data["sources"][m["source"]]["path"])
        text = cache[m["source"]][m["start"]:m["end"]]
        if hashlib.sha1(text.encode()).hexdigest() != m["sha1"]:
            raise ValueError(f"{data['sources'][m['source']]['path']} changed since it was deduplicated")
        members.append({**m, "text": text, "shingles": shingles(text, n)})
    first = members[0]["shingles"]
    shared = set.intersection(*(m["shingles"] for m in members))
    for m in members:
        s = m.pop("shingles")
        m["jaccard_with_first"] = round(len(s & first) / max(1, len(s | first)), 4)
        m["shingles"] = len(s)
    return {**cluster, "members": members, "shared_shingles": len(shared),
            "shared_examples": sorted(shared)[:max_shingles]}
