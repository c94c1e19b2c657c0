"""A map as ONE self-contained HTML file: canvas, plain JS, thumbnails inline.

Nothing is fetched from the network: the data (coordinates, ids, labels and
base64 JPEG thumbnails) sit in a JSON block of the page and the script is
inline. Hovering a point shows its thumbnail, slide, cell id and label; the
checkboxes filter points by category (the colour categories, or the labels when
the colouring is numeric); the wheel zooms and dragging pans. Opening the page
with ``?selftest=1`` runs a hover and a filter and writes the result into
``<pre id="selftest">`` (used by the tests through headless Chromium).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from cytostore.errors import InputError
from cytostore.maps.data import MapData, fetch_thumbnails
from cytostore.maps.render import category_colors

DEFAULT_MAX_POINTS = 20_000  # an HTML map draws at most this many cells unless --sample says otherwise


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(round(float(c) * 255)):02x}" for c in rgb[:3])


def _index(values: list[str]) -> tuple[list[int], list[str]]:
    names = sorted(set(values))
    pos = {n: i for i, n in enumerate(names)}
    return [pos[v] for v in values], names


def page_data(data: MapData, thumbs: dict[int, bytes], title: str) -> dict[str, Any]:
    """The JSON the page embeds."""
    from matplotlib import colormaps

    slide_idx, slides = _index(data.slide_id)
    label_idx, labels = _index(data.label)
    out: dict[str, Any] = {
        "title": title, "by": data.color.by, "numeric": bool(data.color.numeric),
        "x": np.round(data.x.astype(np.float64), 4).tolist(), "y": np.round(data.y.astype(np.float64), 4).tolist(),
        "uid": [str(int(u)) for u in data.uid], "cell": list(data.cell_id),
        "slide": slide_idx, "slides": slides, "label": label_idx, "labels": labels,
        "thumb": [base64.b64encode(thumbs[int(u)]).decode() if int(u) in thumbs else "" for u in data.uid],
    }
    if data.color.numeric:
        v = data.values
        ok = np.isfinite(v)
        lo, hi = (float(v[ok].min()), float(v[ok].max())) if ok.any() else (0.0, 1.0)
        out.update({"v": [float(a) if f else None for a, f in zip(v.tolist(), ok.tolist())], "vmin": lo, "vmax": hi,
                    "ramp": [_hex(colormaps["viridis"](i / 63)) for i in range(64)]})
    else:
        out.update({"v": data.values.tolist(), "categories": list(data.categories),
                    "colors": [_hex(c) for c in category_colors(data.categories)]})
    return out


def render_html(data: MapData, out: str | Path, store=None, title: str | None = None,
                thumbnails: dict[int, bytes] | None = None) -> dict[str, Any]:
    """Writes the interactive map of ``data`` to one self-contained HTML file.

    Args:
        data: from ``load_map_data`` (draw at most ~20k points for a fluid page).
        out: the .html file.
        store: the store the thumbnails are read from (unless ``thumbnails`` is given).
        title: page title; default names the table, cell count and colouring.
        thumbnails: uid -> JPEG bytes, when already at hand.

    Returns:
        ``{"out", "points", "thumbnails", "bytes"}``.
    """
    out = Path(out)
    if out.suffix.lower() not in {".html", ".htm"}:
        raise InputError(f"{out}: an HTML map needs a .html file name")
    if thumbnails is None:
        if store is None:
            raise InputError("render_html needs the store (or the thumbnails) to embed the cell thumbnails")
        thumbnails = fetch_thumbnails(store, data.uid, data.table)
    shown_of = f"{data.n} of {data.total_cells}" if data.n < data.total_cells else f"{data.n}"
    title = title or f"{data.table}: {shown_of} cells, coloured by {data.color.by}"
    payload = json.dumps(page_data(data, thumbnails, title), separators=(",", ":")).replace("</", "<\\/")
    meta = data.umap_meta
    note = (f"UMAP ({meta.get('umap_metric')}, n_neighbors {meta.get('params', {}).get('n_neighbors')}) fitted on "
            f"{meta.get('fitted_cells')} of {meta.get('cells')} cells; table version {meta.get('table_version')}")
    page = (_PAGE.replace("%TITLE%", html.escape(title)).replace("%NOTE%", html.escape(note))
            .replace("%DATA%", payload).replace("%SCRIPT%", _SCRIPT))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return {"out": str(out), "points": int(data.n), "thumbnails": int(sum(1 for u in data.uid if int(u) in thumbnails)),
            "bytes": out.stat().st_size}


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>%TITLE%</title>
<style>
body{margin:0;font:13px system-ui,sans-serif;color:#222;display:flex;height:100vh;overflow:hidden}
#side{width:250px;padding:10px;border-right:1px solid #ddd;overflow-y:auto;box-sizing:border-box}
#side h1{font-size:14px;margin:0 0 6px}#side .note{color:#777;font-size:11px;margin-bottom:8px}
#main{flex:1;position:relative}canvas{display:block;width:100%;height:100%;cursor:crosshair}
label.cat{display:flex;align-items:center;gap:5px;padding:1px 0;white-space:nowrap}
.sw{display:inline-block;width:10px;height:10px;border-radius:50%;flex:none}
.n{color:#888;margin-left:auto}button{font-size:11px;margin:0 4px 6px 0}
#tip{position:absolute;display:none;pointer-events:none;background:#fff;border:1px solid #999;border-radius:4px;
padding:6px;box-shadow:0 2px 6px rgba(0,0,0,.25);font-size:12px;line-height:1.35;z-index:2}
#tip img{width:96px;height:96px;image-rendering:auto;display:block;margin-bottom:4px;background:#eee}
#bar{height:10px;margin:4px 0}#count{margin:6px 0;color:#555}#selftest{display:none}
</style></head><body>
<div id="side"><h1>%TITLE%</h1><div class="note">%NOTE%<br>Hover a point for its cell; wheel zooms, drag pans,
double-click resets.</div><div id="count"></div><div id="legend"></div></div>
<div id="main"><canvas id="cv"></canvas><div id="tip"></div></div>
<pre id="selftest"></pre>
<script type="application/json" id="data">%DATA%</script>
<script>%SCRIPT%</script>
</body></html>
"""

_SCRIPT = r"""
(function(){
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const N = D.x.length, cv = document.getElementById("cv"), ctx = cv.getContext("2d");
const tip = document.getElementById("tip"), main = document.getElementById("main");
// Filtering is by colour category, or by label when the colouring is numeric.
const fKey = D.numeric ? D.label : D.v, fNames = D.numeric ? D.labels : D.categories;
const on = fNames.map(() => true);
let colorIdx, palette;
if (D.numeric) {
  palette = D.ramp.concat(["#c7c7c7"]);
  const span = (D.vmax - D.vmin) || 1;
  colorIdx = D.v.map(v => v === null ? 64 : Math.min(63, Math.max(0, Math.floor((v - D.vmin) / span * 63.999))));
} else { palette = D.colors; colorIdx = D.v; }
let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
for (let i = 0; i < N; i++) { x0 = Math.min(x0, D.x[i]); x1 = Math.max(x1, D.x[i]); y0 = Math.min(y0, D.y[i]); y1 = Math.max(y1, D.y[i]); }
let W = 0, H = 0, zoom = 1, panX = 0, panY = 0, hovered = -1, drawn = 0;
const sx = new Float32Array(N), sy = new Float32Array(N), visible = new Uint8Array(N);
let grid = new Map();
const CELL = 8, PICK = 8;
function base(i) {  // data -> screen, before zoom and pan
  const pad = 20, s = Math.min((W - 2 * pad) / ((x1 - x0) || 1), (H - 2 * pad) / ((y1 - y0) || 1));
  const ox = (W - s * (x1 - x0)) / 2, oy = (H - s * (y1 - y0)) / 2;
  return [ox + (D.x[i] - x0) * s, H - (oy + (D.y[i] - y0) * s)];
}
function draw() {
  const dpr = window.devicePixelRatio || 1;
  W = main.clientWidth; H = main.clientHeight;
  cv.width = Math.round(W * dpr); cv.height = Math.round(H * dpr);
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, H);
  grid = new Map(); drawn = 0;
  const byColor = palette.map(() => []);
  for (let i = 0; i < N; i++) {
    const b = base(i);
    sx[i] = b[0] * zoom + panX; sy[i] = b[1] * zoom + panY;
    visible[i] = on[fKey[i]] && sx[i] > -5 && sy[i] > -5 && sx[i] < W + 5 && sy[i] < H + 5 ? 1 : 0;
    if (!on[fKey[i]]) continue;
    byColor[colorIdx[i]].push(i);
    if (!visible[i]) continue;
    drawn++;
    const k = Math.floor(sx[i] / CELL) + "," + Math.floor(sy[i] / CELL);
    const g = grid.get(k); if (g) g.push(i); else grid.set(k, [i]);
  }
  const r = Math.min(4, Math.max(1.5, Math.min(3.5, 3 * Math.sqrt(3000 / Math.max(N, 1)))) * Math.sqrt(zoom));
  for (let c = 0; c < palette.length; c++) {
    if (!byColor[c].length) continue;
    ctx.fillStyle = palette[c]; ctx.beginPath();
    for (const i of byColor[c]) { ctx.moveTo(sx[i] + r, sy[i]); ctx.arc(sx[i], sy[i], r, 0, 6.2832); }
    ctx.fill();
  }
  if (hovered >= 0 && visible[hovered]) {
    ctx.strokeStyle = "#000"; ctx.lineWidth = 2; ctx.beginPath();
    ctx.arc(sx[hovered], sy[hovered], r + 4, 0, 6.2832); ctx.stroke();
  }
  document.getElementById("count").textContent = "showing " + drawn + " of " + N + " cells";
}
function pick(mx, my) {
  let best = -1, bd = PICK * PICK;
  const gx = Math.floor(mx / CELL), gy = Math.floor(my / CELL), reach = Math.ceil(PICK / CELL);
  for (let a = gx - reach; a <= gx + reach; a++) for (let b = gy - reach; b <= gy + reach; b++) {
    const g = grid.get(a + "," + b); if (!g) continue;
    for (const i of g) { const d = (sx[i] - mx) ** 2 + (sy[i] - my) ** 2; if (d <= bd) { bd = d; best = i; } }
  }
  return best;
}
function esc(s) { return String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }
function showTip(i, mx, my) {
  if (i < 0) { tip.style.display = "none"; tip.dataset.cell = ""; return; }
  const val = D.numeric ? (D.v[i] === null ? "none" : (+D.v[i]).toPrecision(4)) : D.categories[D.v[i]];
  tip.innerHTML = (D.thumb[i] ? '<img alt="cell" src="data:image/jpeg;base64,' + D.thumb[i] + '">' : "") +
    "<b>" + esc(D.labels[D.label[i]]) + "</b><br>slide " + esc(D.slides[D.slide[i]]) + "<br>cell " + esc(D.cell[i]) +
    (D.by !== "label" ? "<br>" + esc(D.by) + ": " + esc(val) : "") + '<br><span style="color:#888">uid ' + D.uid[i] + "</span>";
  tip.dataset.cell = D.cell[i];
  tip.style.display = "block";
  const tw = tip.offsetWidth, th = tip.offsetHeight;
  tip.style.left = (mx + 14 + tw > W ? mx - 14 - tw : mx + 14) + "px";
  tip.style.top = Math.max(0, Math.min(H - th, my - th / 2)) + "px";
}
function onMove(ev) {
  const rc = cv.getBoundingClientRect(), mx = ev.clientX - rc.left, my = ev.clientY - rc.top;
  if (drag) { panX = drag.px + mx - drag.x; panY = drag.py + my - drag.y; hovered = -1; showTip(-1); draw(); return; }
  const i = pick(mx, my);
  if (i !== hovered) { hovered = i; draw(); }
  showTip(i, mx, my);
}
let drag = null;
cv.addEventListener("mousemove", onMove);
cv.addEventListener("mouseleave", () => { hovered = -1; showTip(-1); draw(); });
cv.addEventListener("mousedown", ev => { const rc = cv.getBoundingClientRect(); drag = {x: ev.clientX - rc.left, y: ev.clientY - rc.top, px: panX, py: panY}; });
window.addEventListener("mouseup", () => { drag = null; });
cv.addEventListener("dblclick", () => { zoom = 1; panX = 0; panY = 0; draw(); });
cv.addEventListener("wheel", ev => {
  ev.preventDefault();
  const rc = cv.getBoundingClientRect(), mx = ev.clientX - rc.left, my = ev.clientY - rc.top;
  const f = Math.exp(-ev.deltaY * 0.0015), nz = Math.min(200, Math.max(0.5, zoom * f)), k = nz / zoom;
  panX = mx - (mx - panX) * k; panY = my - (my - panY) * k; zoom = nz; draw();
}, {passive: false});
window.addEventListener("resize", draw);
// Legend with filter checkboxes.
const counts = fNames.map(() => 0); for (let i = 0; i < N; i++) counts[fKey[i]]++;
const legend = document.getElementById("legend");
const head = document.createElement("div");
head.innerHTML = "<b>" + esc(D.numeric ? "label" : D.by) + "</b><br>";
const all = document.createElement("button"); all.textContent = "all";
const none = document.createElement("button"); none.textContent = "none";
head.appendChild(all); head.appendChild(none); legend.appendChild(head);
if (D.numeric) {
  const bar = document.createElement("div"); bar.id = "bar";
  bar.style.background = "linear-gradient(to right," + D.ramp.join(",") + ")";
  const lab = document.createElement("div");
  lab.textContent = D.by + ": " + (+D.vmin).toPrecision(4) + " \u2013 " + (+D.vmax).toPrecision(4);
  legend.insertBefore(lab, head); legend.insertBefore(bar, head);
}
const boxes = fNames.map((name, k) => {
  const row = document.createElement("label"); row.className = "cat";
  const cb = document.createElement("input"); cb.type = "checkbox"; cb.checked = true; cb.dataset.k = k;
  cb.addEventListener("change", () => { on[k] = cb.checked; hovered = -1; showTip(-1); draw(); });
  const sw = document.createElement("span"); sw.className = "sw";
  sw.style.background = D.numeric ? "#999" : D.colors[k];
  const nm = document.createElement("span"); nm.textContent = name;
  const n = document.createElement("span"); n.className = "n"; n.textContent = counts[k];
  row.append(cb, sw, nm, n); legend.appendChild(row); return cb;
});
function setAll(v) { boxes.forEach((cb, k) => { cb.checked = v; on[k] = v; }); hovered = -1; showTip(-1); draw(); }
all.addEventListener("click", () => setAll(true)); none.addEventListener("click", () => setAll(false));
draw();
// ?selftest=1: hover a point, then filter its category away, and report what happened.
if (/[?&]selftest=1/.test(location.search)) {
  const r = {points: N, thumbs: D.thumb.filter(t => t).length, categories: fNames.length};
  let i = -1;
  for (let j = 0; j < N; j++) if (visible[j]) { i = j; break; }
  const rc = cv.getBoundingClientRect();
  const ev = (x, y) => cv.dispatchEvent(new MouseEvent("mousemove", {clientX: rc.left + x, clientY: rc.top + y, bubbles: true}));
  const px = sx[i], py = sy[i];
  ev(px, py);
  r.hover_index = hovered;
  r.hover_same_place = hovered >= 0 && Math.abs(sx[hovered] - px) < 1.5 && Math.abs(sy[hovered] - py) < 1.5;
  r.tip_shown = tip.style.display === "block";
  r.tip_cell = tip.dataset.cell || "";
  r.tip_expected_cell = hovered >= 0 ? D.cell[hovered] : null;
  r.tip_has_jpeg = !!tip.querySelector("img") && tip.querySelector("img").src.indexOf("data:image/jpeg;base64,") === 0;
  r.tip_text = tip.innerText;
  const k = fKey[hovered >= 0 ? hovered : i];
  r.filtered_category = fNames[k];
  r.drawn_before = drawn;
  let inK = 0; for (let j = 0; j < N; j++) if (visible[j] && fKey[j] === k) inK++;
  boxes[k].click();
  r.drawn_after = drawn;
  r.expected_after = r.drawn_before - inK;
  ev(px, py);
  r.after_filter_hover_category = hovered >= 0 ? fNames[fKey[hovered]] : null;
  r.external_refs = Array.from(document.querySelectorAll("[src],[href]")).filter(e => /^https?:/.test(e.getAttribute("src") || e.getAttribute("href") || "")).length;
  boxes[k].click();
  ev(px, py);  // leave the tooltip up, so a screenshot of ?selftest=1 shows it
  r.ok = r.hover_same_place && r.tip_shown && r.tip_cell === r.tip_expected_cell && r.tip_has_jpeg &&
    r.drawn_after === r.expected_after && r.after_filter_hover_category !== r.filtered_category && drawn === r.drawn_before &&
    r.external_refs === 0;
  const out = document.getElementById("selftest"); out.textContent = JSON.stringify(r); out.dataset.ok = String(r.ok);
}
})();
"""
