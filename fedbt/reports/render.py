"""One renderer for every report: a page is a list of blocks, written once as Markdown and
once as HTML beside the figures it names.

A block is ("h1" | "h2" | "p", text), ("table", (header, rows)), ("img", (title, file name)) or
("links", [(title, path relative to the page), ...]).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from fedbt.fileio import write_text

Block = tuple[str, Any]
STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}"
)


def num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def mcnemar_text(paired: dict | None) -> str:
    """A McNemar test (fedbt.eval.clinical.mcnemar's) as 'p (A right only / B right only)'."""
    if paired is None:
        return "not run"
    return f"{paired['p_value']:.2g} ({paired['a_right_b_wrong']} / {paired['a_wrong_b_right']})"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def to_markdown(blocks: list[Block]) -> str:
    render = {
        "h1": lambda text: f"# {text}",
        "h2": lambda text: f"## {text}",
        "p": lambda text: text,
        "table": lambda table: markdown_table(*table),
        "img": lambda fig: f"![{fig[0]}]({fig[1]})",
        "links": lambda links: "\n".join(f"- [{title}]({href})" for title, href in links),
    }
    return "\n\n".join(render[kind](content) for kind, content in blocks) + "\n"


def to_html(blocks: list[Block], title: str) -> str:
    render = {
        "h1": lambda text: f"<h1>{html.escape(text)}</h1>",
        "h2": lambda text: f"<h2>{html.escape(text)}</h2>",
        "p": lambda text: f"<p>{html.escape(text)}</p>",
        "table": lambda table: html_table(*table),
        "img": lambda fig: f"<img src='{html.escape(fig[1])}' alt='{html.escape(fig[0])}'>",
        "links": lambda links: (
            "<ul>"
            + "".join(f"<li><a href='{html.escape(href)}'>{html.escape(title)}</a></li>" for title, href in links)
            + "</ul>"
        ),
    }
    body = "".join(render[kind](content) for kind, content in blocks)
    return f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>{body}"


def write_pages(blocks: list[Block], out: Path, title: str) -> Path:
    """report.md and report.html in out; returns the Markdown page."""
    write_text(out / "report.md", to_markdown(blocks))
    write_text(out / "report.html", to_html(blocks, title))
    return out / "report.md"
