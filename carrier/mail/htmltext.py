"""HTML mail to readable plain text, with the standard library's HTML parser (no I/O, no network).

Scripts, styles and the head are dropped; block elements become line breaks, list items get a
dash, table cells a `` | ``, links keep their target after the text (``text <url>``) so a reader
sees where a link points; nothing here ever fetches anything.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_SKIP = frozenset({"script", "style", "head", "title", "template", "noscript", "svg", "object", "iframe"})
_BLOCK = frozenset(
    {
        "p",
        "div",
        "section",
        "article",
        "header",
        "footer",
        "main",
        "nav",
        "aside",
        "blockquote",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "ul",
        "ol",
        "dl",
        "dt",
        "dd",
        "table",
        "tr",
        "form",
        "fieldset",
        "address",
        "figure",
        "figcaption",
        "hr",
        "center",
    }
)
_VOID = frozenset({"br", "hr", "img", "meta", "link", "input", "wbr", "col", "area", "base", "source"})
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_BLANKS = re.compile(r"\n{3,}")
_PRE_SPACE, _PRE_TAB = "\x01", "\x02"


class _TextBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0
        self.links: list[str | None] = []
        self.link_text_start: list[int] = []

    def _newline(self, count: int = 1) -> None:
        self.out.append("\n" * count)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            if tag not in _VOID:
                self.skip_depth += 1
            return
        if self.skip_depth:
            return
        if tag == "br":
            self.out.append("\n")
        elif tag == "hr":
            self._newline(2)
            self.out.append("-" * 20)
            self._newline(2)
        elif tag == "li":
            self._newline()
            self.out.append("- ")
        elif tag in ("td", "th"):
            self.out.append(" | ")
        elif tag == "pre":
            self.pre_depth += 1
            self._newline(2)
        elif tag == "a":
            self.links.append(dict(attrs).get("href"))
            self.link_text_start.append(len(self.out))
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt:
                self.out.append(f"[{alt}]")
        elif tag in _BLOCK:
            self._newline(2 if tag in ("p", "blockquote", "table", "ul", "ol") or tag[0] == "h" else 1)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
            return
        if self.skip_depth:
            return
        if tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)
            self._newline(2)
        elif tag == "a" and self.links:
            href = self.links.pop()
            start = self.link_text_start.pop()
            text = "".join(self.out[start:]).strip()
            if href and not href.lower().startswith(("javascript:", "mailto:", "#")) and href != text:
                self.out.append(f" <{href}>")
        elif tag in _BLOCK:
            self._newline(2 if tag in ("p", "blockquote", "table", "ul", "ol") or tag[0] == "h" else 1)

    def handle_data(self, data: str) -> None:
        if self.skip_depth:
            return
        if self.pre_depth:  # spaces kept: sentinels survive the final whitespace collapse
            self.out.append(data.replace("\r\n", "\n").replace(" ", _PRE_SPACE).replace("\t", _PRE_TAB))
        else:
            # Source line breaks are just spaces in HTML.
            self.out.append(re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """Readable text for ``html``; never raises on malformed markup."""
    builder = _TextBuilder()
    try:
        builder.feed(html)
        builder.close()
    except (AssertionError, ValueError):  # very malformed declarations; keep what was read
        pass
    text = "".join(builder.out)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines).replace(_PRE_SPACE, " ").replace(_PRE_TAB, "\t")
    return _BLANKS.sub("\n\n", text).strip()
