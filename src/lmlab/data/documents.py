"""Reading books: files, folders and globs of .txt .md .html .htm .epub .fb2 .pdf, in whatever encoding they came.

Russian books often arrive in cp1251 or KOI8-R rather than UTF-8. Both code pages decode any byte string, so
we decide by which decoding reads as Russian: the log-likelihood of its letters under Russian letter
frequencies, case-folded so that ALL-CAPS text scores like prose, with penalties for what only a wrong code
page produces (a lower-case letter followed by a capital inside a word, Cyrillic glued to Latin, box-drawing
characters). On the prose in tests/test_data.py every sentence decides correctly by >= 0.5 nats/letter.

EPUB and PDF are compressed, so a small file can unpack to gigabytes (a "zip bomb", see David Fifield, "A better
zip bomb", https://www.bamsoftware.com/hacks/zipbomb/). Reading them is bounded: EPUB members are read through a
reader that stops at EPUB_MAX_INFLATED bytes for the whole book and at EPUB_MAX_RATIO times a member's packed
size; PDF streams through pypdf's own output limits (pypdf.Configuration), set to PDF_MAX_STREAM; the text of
either may not pass MAX_TEXT_CHARS. War and Peace is about 3.2 million characters (6 MB of UTF-8 in Russian),
so real books pass every limit by a factor of ten or more. Past a limit: TooLarge, a ValueError naming the file.

The server runs this file alone in a child process (server/extract.py): it may import the standard library,
and pypdf inside _pdf_text, nothing else.
"""

from __future__ import annotations

import codecs
import glob
import logging
import math
import os
import posixpath
import re
import unicodedata
import zipfile
import zlib
from collections import Counter
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote
from xml.etree import ElementTree

try:
    from lzma import LZMAError
except ImportError:  # a Python built without lzma: zipfile refuses LZMA members itself (NotImplementedError)
    LZMAError = zlib.error

SUFFIXES = (".txt", ".md", ".html", ".htm", ".xhtml", ".epub", ".fb2", ".pdf")
_MARKUP = (".html", ".htm", ".xhtml", ".fb2")

# Relative frequencies (%) of Russian letters in prose.
_RU_FREQ = dict(zip("оеаинтсрвлкмдпуяыьгзбчйхжшюцщэфъё",
                    [10.97, 8.45, 8.01, 7.35, 6.70, 6.26, 5.47, 4.73, 4.54, 4.40, 3.49, 3.21, 2.98, 2.81, 2.62,
                     2.01, 1.90, 1.74, 1.70, 1.65, 1.59, 1.44, 1.21, 0.97, 0.94, 0.73, 0.64, 0.48, 0.36, 0.32,
                     0.26, 0.04, 0.04]))
_LOGP = {ch: math.log(f / 100) for ch, f in _RU_FREQ.items()}
_TYPOGRAPHY = set("«»—–…“”„‘’№•·§©°\u00a0")  # shared by the Windows code pages: plausible in any text
_LEGACY = ("cp1251", "koi8_r")
# Measured (see test_decoding_decides_every_sentence): Russian prose scores about -3.0 to -3.3 nats/char,
# random high bytes about -5, UTF-8 Cyrillic read as a legacy code page -5.3 or lower.
_MIN_SCORE = -4.2
_CAMEL = re.compile(r"[а-яё][А-ЯЁ]")
_MIXED = re.compile(r"[A-Za-z][\u0400-\u04ff]|[\u0400-\u04ff][A-Za-z]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CHARSET = re.compile(rb"""(?:charset|encoding)\s*=\s*["']?([A-Za-z0-9_.:-]+)""")
# Python codecs a page may name that are no character set its bytes could be in: escape and transform codecs
# ("unicode_escape" made lone surrogates of "\ud800", "undefined" raised), and UTF-16/32, which a file of 8-bit
# bytes (a BOM or NULs were dealt with first) cannot be (browsers read such a page as UTF-8 too: WHATWG Encoding).
_NOT_CHARSETS = {"undefined", "unicode-escape", "raw-unicode-escape", "idna", "punycode", "utf-7", "charmap",
                 "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"}
_SURROGATE = re.compile("[\ud800-\udfff]")

MAX_TEXT_CHARS = 64 * 2**20        # text of one EPUB or PDF
EPUB_MAX_INFLATED = 128 * 2**20    # bytes unpacked from one EPUB, all members read together
# Deflate cannot pack better than about 1032:1; (X)HTML packs 3-10:1. Members that unpack to less than
# _RATIO_FLOOR are not held to the ratio (a tiny container.xml may pack oddly).
EPUB_MAX_RATIO = 100
_RATIO_FLOOR = 2**20
PDF_MAX_STREAM = 32 * 2**20        # bytes one PDF stream may unpack to (pypdf's default is 75 MB)
# What a damaged EPUB raises from zipfile and its decompressors (fuzzing, one to three bytes changed in a small
# EPUB: zlib.error, EOFError, NotImplementedError "zip file version 16.4", OSError EINVAL from a seek,
# UnicodeDecodeError from a member name flagged UTF-8 that is not) and from our look-ups in a container.xml or OPF
# without the parts named. Nothing of ours in that block raises these (decode_bytes raises its own ValueError).
_BROKEN_EPUB = (zipfile.BadZipFile, zlib.error, LZMAError, EOFError, NotImplementedError, OSError,
                UnicodeDecodeError, KeyError, StopIteration, ElementTree.ParseError)
# What pypdf raises on a malformed PDF besides PdfReadError (fuzzing mutated small PDFs: RecursionError on 100,000
# nested arrays, NotImplementedError on an unknown /Filter, TypeError and AttributeError on objects of the wrong
# type). Only pypdf runs inside the reading loop, so there they are the file's fault, not a bug of ours.
_BROKEN_PDF = (ValueError, KeyError, OSError, RecursionError, NotImplementedError, TypeError, AttributeError)


class TooLarge(ValueError):
    """A document that unpacks or extracts past one of the limits above."""


def as_sources(sources: str | Path | Sequence[str | Path]) -> list[str | Path]:
    """`sources` as a list: one path given alone (a str or a Path) is that one source. Iterated as it was, a str
    was read a character at a time, each a path: "/data/books" walked "/", every document on the machine."""
    if isinstance(sources, (str, os.PathLike)):
        return [sources]
    return list(sources)


def find_documents(sources: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns, each in sorted order, without duplicates.
    Folders and globs yield only supported suffixes and skip hidden names (".DS_Store", "._book.txt");
    a file named explicitly is always taken (read as text unless its suffix says otherwise). One path given
    alone is one source (as_sources)."""
    found: list[Path] = []
    for source in as_sources(sources):
        if isinstance(source, str) and not source.strip():  # Path("") is the current folder: all of it was read
            raise ValueError("a source is empty; name a file, folder or glob")
        path = Path(source)
        if path.is_file():
            found.append(path)
        elif path.is_dir():  # a folder of nothing to read is refused like a glob that matches nothing: the
            docs = _walk(path)  # commands took it for an empty corpus (contamination said every item was clean)
            if not docs:
                raise FileNotFoundError(f"no documents ({' '.join(SUFFIXES)}) in the folder {source}")
            found += docs
        elif any(ch in str(source) for ch in "*?["):
            before = len(found)
            for match in sorted(glob.glob(str(source), recursive=True)):
                p = Path(match)
                if p.is_dir():
                    found += _walk(p)
                elif p.suffix.lower() in SUFFIXES and not p.name.startswith("."):
                    found.append(p)
            if len(found) == before:
                raise FileNotFoundError(f"no documents ({' '.join(SUFFIXES)}) match {source}")
        else:
            raise FileNotFoundError(f"no such file or folder: {source}")
    seen: set[Path] = set()
    return [p for p in found if not (p.resolve() in seen or seen.add(p.resolve()))]


def _walk(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_document(path: str | Path) -> str:
    """The normalised text of one document; ValueError (naming the file) if it cannot be read as text."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a document")
    suffix = path.suffix.lower()
    if suffix in (".epub", ".pdf"):
        text = _epub_text(path) if suffix == ".epub" else _pdf_text(path)
        _check_length(path, len(text))
    else:
        data = path.read_bytes()
        text = decode_bytes(data, path, declared=_declared_charset(data) if suffix in _MARKUP else None)
        text = html_to_text(text) if suffix in _MARKUP else text
    bad = _SURROGATE.search(text)
    if bad:  # half of a UTF-16 pair: not encodable, so tokenizer training, dedup and the filters failed on it later
        raise ValueError(f"{path}: the text holds a lone surrogate (U+{ord(bad.group()):04X}) at character "
                         f"{bad.start() + 1}, which is not Unicode text; refused")
    return normalize_text(text)


def _check_length(path: Path, chars: int) -> None:
    if chars > MAX_TEXT_CHARS:
        raise TooLarge(f"{path}: the text is longer than {MAX_TEXT_CHARS:,} characters; refused")


def decode_bytes(data: bytes, name: str | Path = "<bytes>", declared: str | None = None) -> str:
    """UTF-8 (with or without BOM), UTF-16 with BOM, then a charset the markup `declared`, then whichever
    of cp1251 / KOI8-R reads as Russian. ValueError naming `name` for anything else."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name}: broken UTF-16 ({exc.reason} at byte {exc.start})") from None
    head = data[:65536]
    if head.count(0) > len(head) // 1000:  # NUL bytes: binary, or UTF-16 without a BOM
        raise ValueError(f"{name}: looks binary (NUL bytes), not text; UTF-16 files need a byte order mark")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        utf8_error = f"byte 0x{data[exc.start]:02x} at offset {exc.start} is not UTF-8"
    declared_text = None
    codec = _charset_codec(declared)
    if codec:
        try:
            declared_text = data.decode(codec)
        except UnicodeError:
            pass
    score, text = max(((_russian_score(t), t) for t in (data.decode(e, "replace") for e in _LEGACY)),
                      key=lambda st: st[0])
    # Old Russian pages often declare iso-8859-1 over cp1251 bytes: believe the declaration unless it makes
    # mojibake where a legacy Russian code page makes prose.
    if declared_text is not None and not (score >= _MIN_SCORE > _russian_score(declared_text)):
        return declared_text
    if score >= _MIN_SCORE or _only_typography(text):
        return text
    raise ValueError(f"{name}: cannot decode the text ({utf8_error}, and it does not read as cp1251 or "
                     "KOI8-R Russian); convert it to UTF-8")


def _charset_codec(declared: str | None) -> str | None:
    """Python's name of the codec a page's declared charset names, or None: unknown, or not a character set."""
    try:
        codec = codecs.lookup(declared).name if declared else None
    except LookupError:
        return None
    return None if codec in _NOT_CHARSETS else codec


def encoding_label(data: bytes, suffix: str = ".txt") -> str:
    """Which encoding `read_document` reads `data` in: utf-16, utf-8-sig (a BOM), utf-8, the charset a page
    (`suffix` .html .htm .xhtml .fb2) declares where it was believed (iso8859-1), or the legacy Russian code page
    chosen (cp1251, koi8_r); "epub" and "pdf" for those containers, "unknown" if none reads."""
    if suffix in (".epub", ".pdf"):
        return suffix[1:]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    if data.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    try:
        data.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    declared = _declared_charset(data) if suffix in _MARKUP else None
    try:
        best = decode_bytes(data, declared=declared)
    except ValueError:
        return "unknown"
    codec = _charset_codec(declared)
    if codec and _decodes_to(data, codec, best):
        return codec
    return next((e for e in _LEGACY if _decodes_to(data, e, best)), "legacy")


def _decodes_to(data: bytes, encoding: str, text: str) -> bool:
    try:
        return data.decode(encoding) == text
    except UnicodeError:
        return False


def _russian_score(text: str) -> float:
    """Mean log-probability (nats) per non-ASCII character of `text` read as Russian prose."""
    text = text[:200_000]
    total = logp = 0.0
    for ch, n in Counter(text).items():
        if ch < "\x80":
            continue
        low = ch.lower()
        if low in _LOGP:
            lp = _LOGP[low]
        elif ch in _TYPOGRAPHY:
            lp = math.log(1e-2)
        elif "\u0400" <= ch <= "\u04ff":  # Ukrainian/Belarusian/old letters: possible, rare
            lp = math.log(1e-3)
        else:  # box drawing, U+FFFD and the like: what a wrong code page makes
            lp = math.log(1e-4)
        logp += n * lp
        total += n
    if not total:
        return -math.inf
    return (logp - 5.0 * (len(_CAMEL.findall(text)) + len(_MIXED.findall(text)))) / total


def _only_typography(text: str) -> bool:
    """Latin text whose only non-ASCII bytes are Windows punctuation (“ ” — …), identical in cp1251/cp1252."""
    return all(ch < "\x80" or ch in _TYPOGRAPHY for ch in set(text[:200_000]))


def _declared_charset(data: bytes) -> str | None:
    match = _CHARSET.search(data[:4096])
    return match.group(1).decode("ascii") if match else None


def normalize_text(text: str) -> str:
    """NFC; LF line ends; no BOM or control characters (tab and newline stay); at most two blank lines in a
    row (whitespace-only lines count as blank). Case, punctuation and spaces are kept."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = _CONTROL.sub("", text)
    return re.sub(r"\n(?:[ \t]*\n){3,}", "\n\n\n", text)


class _TextExtractor(HTMLParser):
    # Paragraph-like elements end with a blank line; line-like ones (a <br>, a list item) with a newline.
    _BLOCK = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "blockquote", "pre", "hr",
              "table", "ul", "ol", "dl", "header", "footer", "main", "aside", "figure", "figcaption", "nav",
              "body", "title", "subtitle", "epigraph", "poem", "stanza", "empty-line"}  # last row: FB2
    _LINE = {"br", "li", "tr", "dt", "dd", "caption", "v", "text-author"}
    _SKIP = {"script", "style", "head", "noscript", "svg", "template", "binary", "description"}  # FB2 metadata

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def _boundary(self, tag: str) -> None:
        if tag in self._BLOCK:
            self.parts.append("\n\n")
        elif tag in self._LINE:
            self.parts.append("\n")

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self._SKIP:
            self.skipping += 1
        elif not self.skipping:
            self._boundary(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if not self.skipping and tag not in self._SKIP:  # <br/>, <empty-line/>: one boundary, not two
            self._boundary(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif not self.skipping and tag not in self._LINE:
            self._boundary(tag)

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(re.sub(r"\s+", " ", data))

    def parse_marked_section(self, i: int, report: int = 1) -> int:
        try:
            return super().parse_marked_section(i, report)
        except AssertionError:  # "<![a]>", "<![ CDATA[x]]>": the stdlib asserts where a browser (HTML5's
            return self.parse_bogus_comment(i)  # tokenizer) reads a bogus comment up to the next ">"


def html_to_text(markup: str) -> str:
    """Visible text of an HTML/XHTML/FB2 page: scripts, styles and metadata dropped; paragraphs separated by
    a blank line, <br> and list items by a newline. (Whitespace inside <pre> is collapsed too.)"""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = re.sub(r" *\n *", "\n", "".join(parser.parts))  # charrefs are already decoded: no unescape
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _epub_text(path: Path) -> str:
    """The spine documents of an EPUB, in reading order (container.xml -> OPF manifest -> spine)."""
    budget = [EPUB_MAX_INFLATED]
    with open(path, "rb") as file:  # a file that cannot be opened stays an OSError about the path, not the EPUB's
        try:
            with zipfile.ZipFile(file) as z:
                if "META-INF/encryption.xml" in z.namelist():
                    raise ValueError(f"{path}: the EPUB is encrypted (DRM); only DRM-free books can be read")
                container = ElementTree.fromstring(_read_member(z, "META-INF/container.xml", path, budget))
                rootfile = next(el for el in container.iter() if el.tag.endswith("rootfile")).attrib["full-path"]
                opf = ElementTree.fromstring(_read_member(z, rootfile, path, budget))
                base = posixpath.dirname(rootfile)
                manifest = {el.attrib["id"]: el.attrib for el in opf.iter() if el.tag.endswith("}item")}
                chapters = []
                for ref in (el.attrib["idref"] for el in opf.iter() if el.tag.endswith("}itemref")):
                    item = manifest[ref]
                    if "html" not in item.get("media-type", "html"):
                        continue  # an image or SVG page in the spine has no text
                    href = posixpath.normpath(posixpath.join(base, unquote(item["href"].split("#")[0])))
                    c = _read_member(z, href, path, budget)
                    chapters.append(html_to_text(decode_bytes(c, path, declared=_declared_charset(c))))
        except _BROKEN_EPUB as exc:
            raise ValueError(f"{path}: not a readable EPUB ({_reason(exc)})") from None
    return "\n\n".join(chapters)



def _reason(exc: BaseException) -> str:
    """The exception's type and its first line, if it says anything (EOFError says nothing)."""
    message = str(exc).splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _read_member(z: zipfile.ZipFile, name: str, path: Path, budget: list[int]) -> bytes:
    """One member, unpacked only as far as the limits allow: never more than the book's remaining budget
    (budget[0], decreased here) nor EPUB_MAX_RATIO times its packed size. Sizes are counted as unpacked,
    not taken from the zip's headers, which a crafted file can fill with anything."""
    info = z.getinfo(name)
    if info.flag_bits & 0x1:  # zipfile would raise RuntimeError asking for a password
        raise ValueError(f"{path}: {name} is encrypted; only DRM-free books can be read")
    allowed = min(budget[0], max(_RATIO_FLOOR, EPUB_MAX_RATIO * info.compress_size))
    with z.open(info) as f:
        data = f.read(allowed + 1)
    if len(data) > allowed:
        if allowed < budget[0]:
            raise TooLarge(f"{path}: {name} unpacks to more than {EPUB_MAX_RATIO} times its packed size "
                           f"({info.compress_size} bytes); refused as a decompression bomb")
        raise TooLarge(f"{path}: the EPUB unpacks to more than {EPUB_MAX_INFLATED / 2**20:g} MiB; refused")
    budget[0] -= len(data)
    return data


def _pdf_text(path: Path) -> str:
    try:
        from pypdf import PdfReader, apply_configuration
        from pypdf.errors import LimitReachedError, PdfReadError
    except ImportError:
        raise ValueError(f"{path}: reading PDF needs pypdf >= 6.18 (pip install -U pypdf)") from None
    limits = {k: PDF_MAX_STREAM for k in ("zlib_maximum_output_length", "lzw_maximum_output_length",
                                          "run_length_maximum_output_length", "maximum_declared_stream_length",
                                          "array_based_stream_maximum_output_length")}
    pages, total = [], 0
    quiet = logging.getLogger("pypdf")  # its warnings ("EOF marker not found") went to stderr beside our error
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with apply_configuration(**limits):
            for page in PdfReader(path).pages:
                pages.append(page.extract_text() or "")
                total += len(pages[-1])
                _check_length(path, total)  # page by page: a few pages can hold gigabytes of text
    except TooLarge:
        raise
    except LimitReachedError as exc:
        raise TooLarge(f"{path}: the PDF goes past one of pypdf's reading limits; refused (a stream "
                       f"may unpack to at most {PDF_MAX_STREAM // 2**20} MiB; pypdf: {exc})") from None
    except _BROKEN_PDF + (PdfReadError,) as exc:
        raise ValueError(f"{path}: not a readable PDF ({_reason(exc)})") from None
    finally:
        quiet.setLevel(level)
    return "\n".join(pages)
