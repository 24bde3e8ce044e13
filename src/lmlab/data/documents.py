"""Reading books: files, folders and globs of .txt .md .html .epub .pdf, in whatever encoding they came.

Russian books often arrive in cp1251 or KOI8-R rather than UTF-8; we tell those apart by which decoding
yields ordinary Russian text (letter frequencies), not by guessing from the file name.
"""

from __future__ import annotations

import glob
import html
import math
import re
import unicodedata
import zipfile
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from xml.etree import ElementTree

SUFFIXES = (".txt", ".md", ".html", ".htm", ".xhtml", ".epub", ".pdf")

# Relative frequencies (%) of Russian letters in prose; the legacy code page whose decoding scores
# highest under them is the right one (a wrong one turns lower case into upper case and vice versa).
_RU_FREQ = dict(zip("оеаинтсрвлкмдпуяыьгзбчйхжшюцщэфъё",
                    [10.97, 8.45, 8.01, 7.35, 6.70, 6.26, 5.47, 4.73, 4.54, 4.40, 3.49, 3.21, 2.98, 2.81, 2.62,
                     2.01, 1.90, 1.74, 1.70, 1.65, 1.59, 1.44, 1.21, 0.97, 0.94, 0.73, 0.64, 0.48, 0.36, 0.32,
                     0.26, 0.04, 0.04]))
_LEGACY = ("cp1251", "koi8_r")


def find_documents(sources: Sequence[str | Path]) -> list[Path]:
    """Expand files, folders (recursively, supported suffixes only) and glob patterns, in a stable order."""
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        elif path.is_file():
            found.append(path)
        elif any(ch in str(source) for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(source), recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"no files match {source}")
            found += matches
        else:
            raise FileNotFoundError(f"no such file or folder: {source}")
    seen: set[Path] = set()
    return [p for p in found if not (p.resolve() in seen or seen.add(p.resolve()))]


def read_document(path: str | Path) -> str:
    """The normalised text of one document; ValueError (naming the file) if it cannot be read as text."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a document") from None
    suffix = path.suffix.lower()
    if suffix == ".epub":
        return normalize_text(_epub_text(path, data))
    if suffix == ".pdf":
        return normalize_text(_pdf_text(path))
    text = decode_bytes(data, path)
    if suffix in (".html", ".htm", ".xhtml"):
        text = html_to_text(text)
    return normalize_text(text)


def decode_bytes(data: bytes, name: str | Path = "<bytes>") -> str:
    """UTF-8 (with or without BOM), UTF-16 with BOM, else the best of cp1251 / KOI8-R."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    best, best_score = None, -math.inf
    for encoding in _LEGACY:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        score = _russian_score(text)
        if score > best_score:
            best, best_score = text, score
    # Real Russian prose scores ~6; text in the wrong code page or random bytes score ~1.5.
    controls = sum(b < 32 and b not in (9, 10, 13) for b in data[:65536])
    if best is None or best_score < 3.0 or controls > len(data[:65536]) // 100:
        raise ValueError(f"{name}: cannot decode the text (not UTF-8, UTF-16, cp1251 or KOI8-R)")
    return best


def _russian_score(text: str) -> float:
    """Mean frequency (%) of the Cyrillic letters in `text` counted as lower case Russian prose letters;
    upper case letters count for little, since prose is mostly lower case."""
    total = hits = 0.0
    for ch in text:
        if "\u0400" <= ch <= "\u04ff":
            total += 1
            hits += _RU_FREQ.get(ch, 0.0)
    return hits / total if total else 0.0


def normalize_text(text: str) -> str:
    """NFC; LF line ends; no BOM or control characters (tab and newline stay); at most two blank lines."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    return re.sub(r"\n{4,}", "\n\n\n", text)


class _TextExtractor(HTMLParser):
    _BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article",
              "blockquote", "pre", "hr", "title", "dd", "dt"}
    _SKIP = {"script", "style", "head", "noscript", "svg"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self._SKIP:
            self.skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """Visible text of an HTML page: scripts and styles dropped, block elements on their own lines."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    lines = (line.strip() for line in html.unescape("".join(parser.parts)).split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def _epub_text(path: Path, data: bytes) -> str:
    """The spine documents of an EPUB, in reading order (container.xml -> OPF -> spine)."""
    try:
        with zipfile.ZipFile(path) as z:
            container = ElementTree.fromstring(z.read("META-INF/container.xml"))
            rootfile = next(el for el in container.iter() if el.tag.endswith("rootfile")).attrib["full-path"]
            opf = ElementTree.fromstring(z.read(rootfile))
            base = PurePosixPath(rootfile).parent
            manifest = {el.attrib["id"]: el.attrib["href"] for el in opf.iter() if el.tag.endswith("}item")}
            spine = [el.attrib["idref"] for el in opf.iter() if el.tag.endswith("}itemref")]
            chapters = [z.read(str(base / manifest[idref])) for idref in spine]
    except (zipfile.BadZipFile, KeyError, StopIteration, ElementTree.ParseError) as exc:
        raise ValueError(f"{path}: not a readable EPUB ({type(exc).__name__}: {exc})") from None
    return "\n".join(html_to_text(decode_bytes(c, path)) for c in chapters)


def _pdf_text(path: Path) -> str:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:
        raise ValueError(f"{path}: reading PDF needs the pypdf package (pip install pypdf)") from None
    try:
        return "\n".join(page.extract_text() or "" for page in PdfReader(path).pages)
    except (PdfReadError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable PDF ({exc})") from None
