"""One self-contained HTML page for an inspect report (:func:`lmforge.evaluate.inspect.inspect`).

No external URL: styles, script and data are inline, so the page opens offline and makes no request.
It stays usable on big reports (512 tokens of a 30-layer, 9-head model: 270 maps of 512 x 512) because
nothing is drawn before it is looked at: the attention maps travel as one gzip-compressed block of bytes
per layer (weight w stored as round(255 sqrt(w)): small weights stay visible), inflated by the browser's
own ``DecompressionStream`` when a layer's row of thumbnails scrolls into view, and every view is built
the first time its tab is opened. Exact values are in the JSON report.

The page (markup, style and script) is ``inspect_page.html`` beside this module, with two holes: %TITLE%
and %DATA%. ``render_html(report)`` returns the page as a string, so ``lmforge serve`` can send it as it is.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
from importlib import resources
from typing import Any

import numpy as np

from .inspect import report_json


def _pack_attention(att: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in att.items() if k != "kinds"}
    out["kinds"] = {}
    for kind, d in att["kinds"].items():
        layers = []
        for m in d["maps"]:  # (heads, dest, src) float32
            q = np.round(255 * np.sqrt(np.clip(m, 0, 1))).astype(np.uint8)
            layers.append(base64.b64encode(gzip.compress(q.tobytes(), compresslevel=6, mtime=0)).decode("ascii"))
        out["kinds"][kind] = {"causal": d["causal"], "dest_tokens": d["dest_tokens"], "src_tokens": d["src_tokens"],
                              "shape": list(d["maps"][0].shape) if d["maps"] else [0, 0, 0], "gz": layers}
    return out


def page_data(report: dict[str, Any]) -> dict[str, Any]:
    """What the page embeds: the report as JSON, attention packed as gzip'd bytes, lens rounded."""
    light = {k: v for k, v in report.items() if k != "attention"}
    data = report_json(light, decimals=5)
    if "attention" in report:
        data["attention"] = _pack_attention(report["attention"])
    return data


def render_html(report: dict[str, Any], title: str | None = None) -> str:
    data = json.dumps(page_data(report), ensure_ascii=False, separators=(",", ":"))
    data = data.replace("<", "\\u003c")  # nothing in the data can close the script element
    title = title or f"lmforge inspect: {report['model']['name']}"
    head, tail = resources.files(__package__).joinpath("inspect_page.html").read_text(encoding="utf-8").split("%DATA%")
    return head.replace("%TITLE%", html.escape(title)) + data + tail
