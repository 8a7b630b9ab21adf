"""Matplotlib figures as inline SVG that is safe to paste into the page unescaped.

Why this module exists: the SVG is the one piece of markup the template marks ``|safe``, and its
labels carry untrusted text (adjectives, group names, model names from configs). So:

* text is drawn as SVG ``<text>`` (``svg.fonttype = none``) — readable, searchable, and escaped by
  matplotlib's writer — and labels are pre-cleaned by :func:`label` (no mathtext, no control chars);
* each figure gets its own id salt, so ids of clip paths never collide between figures on one page;
* :func:`check_svg` parses the result and refuses anything but plain drawing elements: no script,
  no event handlers, no external references. A label can never become markup.
"""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager

import matplotlib
from matplotlib.figure import Figure

#: Okabe–Ito colours: distinguishable with the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]

_ALLOWED_TAGS = {"svg", "g", "path", "defs", "clipPath", "use", "rect", "text", "tspan", "style", "line",
                 "polyline", "polygon", "circle", "ellipse", "linearGradient", "stop", "title", "desc",
                 "mask", "pattern", "image"}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_RC = {"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
       "text.usetex": False, "svg.image_inline": True}


def label(text: object, limit: int = 48) -> str:
    """A plot label from untrusted text: one line, no control characters, no mathtext, bounded."""
    s = _CONTROL.sub("", " ".join(str(text).split()))
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("$", r"\$")  # an unescaped pair of $ would switch matplotlib to mathtext


def model_colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


@contextmanager
def figure(plot_id: str, width: float, height: float) -> Iterator[Figure]:
    """A pyplot-free figure (no global state, no GUI backend) with the report's style."""
    with matplotlib.rc_context({**_RC, "svg.hashsalt": plot_id}):
        fig = Figure(figsize=(width, height), layout="constrained")
        yield fig


def to_svg(fig: Figure, plot_id: str) -> str:
    """Render, strip the XML prologue and metadata, and check the markup before it is embedded."""
    buffer = io.StringIO()
    with matplotlib.rc_context({**_RC, "svg.hashsalt": plot_id}):
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None,
                                                   "Type": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    check_svg(svg)
    return svg.replace("<svg ", f'<svg role="img" aria-labelledby="{plot_id}-caption" ', 1)


def check_svg(svg: str) -> None:
    """Refuse SVG with anything that could run or load: the last line of defence for ``|safe``."""
    try:
        root = ET.fromstring(svg)
    except ET.ParseError as exc:
        raise RuntimeError(f"plot SVG is not well-formed XML ({exc}); refusing to embed it") from None
    for element in root.iter():
        tag = element.tag.rsplit("}", 1)[-1]
        if tag not in _ALLOWED_TAGS:
            raise RuntimeError(f"plot SVG contains a <{tag}> element; refusing to embed it")
        for name, value in element.attrib.items():
            local = name.rsplit("}", 1)[-1].lower()
            if local.startswith("on"):
                raise RuntimeError(f"plot SVG has an event attribute {local!r}; refusing to embed it")
            if local == "href" and not (value.startswith("#") or value.startswith("data:image/png;base64,")):
                raise RuntimeError("plot SVG references an external resource; refusing to embed it")
        if tag == "style" and re.search(r"@import|url\((?!#)", element.text or ""):
            raise RuntimeError("plot SVG style loads an external resource; refusing to embed it")
