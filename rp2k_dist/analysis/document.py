"""The report document: Markdown with its self-contained HTML twin (inline styles, images as
``data:`` URIs, no scripts or links), and Markdown tables from rows."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import run_folder
from ..storage import RunStorage



def _inline(text: str) -> str:
    """Escaped HTML of one line of text with Markdown's **bold** and `code`."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def markdown_table_html(markdown: str) -> str:
    """An HTML table from a Markdown pipe table (header, alignment row, body rows)."""
    rows = [[cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
            for line in markdown.strip().splitlines()]
    header, alignment, body = rows[0], rows[1], rows[2:]
    align = ["right" if a.endswith(":") else "left" for a in alignment]

    def cells(row: list[str], tag: str) -> str:
        return "".join(f'<{tag} style="text-align:{a}">{_inline(c)}</{tag}>' for c, a in zip(row, align))

    lines = [f"<tr>{cells(header, 'th')}</tr>"] + [f"<tr>{cells(row, 'td')}</tr>" for row in body]
    return "<table>\n" + "\n".join(lines) + "\n</table>"


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 8px}th{background:#f3f3f3}
pre{background:#f6f6f6;padding:1em;overflow:auto}img{max-width:100%}code{background:#f3f3f3}"""


@dataclass
class Document:
    """A report written as Markdown (images linked) and HTML (images embedded) at once."""

    title: str
    md: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)  # PNGs by the name the Markdown links

    def __post_init__(self) -> None:
        self.md.append(f"# {self.title}\n")
        self.html.append(f"<h1>{html.escape(self.title)}</h1>")

    def heading(self, text: str, level: int = 2) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{_inline(text)}</h{level}>")

    def para(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{_inline(text)}</p>")

    def table(self, markdown: str) -> None:
        self.md.append(markdown.strip() + "\n")
        self.html.append(markdown_table_html(markdown))

    def code(self, text: str, language: str = "") -> None:
        self.md.append(f"```{language}\n{text.rstrip()}\n```\n")
        self.html.append(f"<pre><code>{html.escape(text.rstrip())}</code></pre>")

    def image(self, png: bytes, name: str, alt: str) -> None:
        """A PNG: linked as ``name`` (a path relative to the document) in the Markdown,
        embedded in the HTML; :meth:`write` puts the file at ``name``."""
        self.images[name] = png
        self.md.append(f"![{alt}]({name})\n")
        data = base64.b64encode(png).decode("ascii")
        self.html.append(f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>')

    def markdown(self) -> str:
        return "\n".join(self.md)

    def page(self) -> str:
        """The self-contained HTML page (styles and images inline, no scripts, no links)."""
        return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
                f"<style>{_STYLE}</style></head>\n<body>\n" + "\n".join(self.html) + "\n</body></html>\n")

    def write(self, out_dir: str | Path, stem: str = run_folder.REPORT, images: bool = True) -> tuple[str, str]:
        """Write ``<stem>.md``, ``<stem>.html`` and (``images``) the PNGs the Markdown links
        into the folder ``out_dir`` (local or a URI); returns the two documents' locations."""
        folder = RunStorage.at(out_dir)
        for name, png in self.images.items() if images else ():
            folder.write_bytes(name, png)
        folder.write_text(f"{stem}.md", self.markdown())
        folder.write_text(f"{stem}.html", self.page())
        return folder.location(f"{stem}.md"), folder.location(f"{stem}.html")


def markdown_rows(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """A Markdown pipe table: the first ``text_columns`` columns left-aligned, the rest
    (numbers) right-aligned."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    alignment = "|" + "---|" * text_columns + "---:|" * (len(header) - text_columns)
    return "\n".join([line(header), alignment] + [line(r) for r in rows]) + "\n"
