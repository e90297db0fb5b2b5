"""The report's HTML: its style, tables, figures and the page around them."""

from __future__ import annotations

import html
import re
from pathlib import Path

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 9px; text-align: right; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; } .note { color: #555; font-size: 0.9em; }
.warn { color: #a40; font-weight: bold; }
"""


def html_table(header: list[str], rows: list[list[str]], left: int = 0) -> str:
    def cells(tag, row):
        return "".join(
            f"<{tag}{' class=l' if i < left else ''}>{html.escape(str(c))}</{tag}>" for i, c in enumerate(row)
        )

    return (
        "<table><tr>"
        + cells("th", header)
        + "</tr>"
        + "".join("<tr>" + cells("td", r) + "</tr>" for r in rows)
        + "</table>"
    )


def write_page(page: Path, title: str, parts: list[str]) -> Path:
    """An HTML page of `parts` (already escaped), in the report's style."""
    page.write_text(
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n",
        encoding="utf-8",
    )
    return page


def html_figure(src: str, caption: str) -> str:
    return (
        f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "group"
