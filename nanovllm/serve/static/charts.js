// A small canvas line chart: a few series over a time window, y from 0, grid and labels.

const GRID_LINES = 4;
const PAD = { left: 46, right: 8, top: 8, bottom: 18 };

/** The smallest top of the axis >= value whose grid step is 1, 2 or 5 times a power of ten. */
function niceTop(value) {
  const rough = Math.max(value, 1e-9) / GRID_LINES;
  const power = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= rough);
  return step * GRID_LINES;
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

export class LineChart {
  /**
   * series: [{label, color (a CSS variable name)}]; format: value -> axis/legend text;
   * yMax: a fixed top of the axis (else from the data, at least minYMax).
   */
  constructor(canvas, legend, series, { format = String, yMax = null, minYMax = 1 } = {}) {
    Object.assign(this, { canvas, legend, series, format, yMax, minYMax });
  }

  /** lines[k] = [[t, value or null], ...] for series k; t in seconds within [t0, t1]. */
  draw(lines, t0, t1) {
    const { canvas } = this;
    const dpr = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    if (canvas.width !== Math.round(width * dpr)) canvas.width = Math.round(width * dpr);
    if (canvas.height !== Math.round(height * dpr)) canvas.height = Math.round(height * dpr);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);

    let top = this.yMax;
    if (top === null) {
      const max = Math.max(0, ...lines.flat().map(([, v]) => (Number.isFinite(v) ? v : 0)));
      top = niceTop(Math.max(max * 1.1, this.minYMax));
    }
    const plotW = width - PAD.left - PAD.right;
    const plotH = height - PAD.top - PAD.bottom;
    const x = (t) => PAD.left + ((t - t0) / Math.max(t1 - t0, 1e-9)) * plotW;
    const y = (v) => PAD.top + plotH - (Math.min(v, top) / top) * plotH;

    ctx.font = `11px ${cssVar("--font") || "sans-serif"}`;
    ctx.fillStyle = cssVar("--muted");
    ctx.strokeStyle = cssVar("--border");
    ctx.lineWidth = 1;
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    for (let g = 0; g <= GRID_LINES; g++) {
      const v = (top * g) / GRID_LINES;
      const gy = Math.round(y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(PAD.left, gy);
      ctx.lineTo(width - PAD.right, gy);
      ctx.stroke();
      ctx.fillText(this.format(v), PAD.left - 6, gy);
    }
    ctx.textBaseline = "alphabetic";
    ctx.textAlign = "left";
    ctx.fillText(`−${formatSpan(t1 - t0)}`, PAD.left, height - 4);
    ctx.textAlign = "right";
    ctx.fillText("now", width - PAD.right, height - 4);

    lines.forEach((points, k) => {
      const color = cssVar(this.series[k].color);
      ctx.strokeStyle = color;
      ctx.lineWidth = 2;
      ctx.lineJoin = "round";
      ctx.beginPath();
      let drawing = false;
      for (const [t, v] of points) {
        if (!Number.isFinite(v)) { drawing = false; continue; }
        if (drawing) ctx.lineTo(x(t), y(v));
        else { ctx.moveTo(x(t), y(v)); drawing = true; }
      }
      ctx.stroke();
    });
    this.updateLegend(lines);
  }

  updateLegend(lines) {
    const items = this.series.map((s, k) => {
      const last = lines[k].length ? lines[k][lines[k].length - 1][1] : null;
      const swatch = document.createElement("i");
      swatch.style.background = cssVar(s.color);
      const item = document.createElement("span");
      item.append(swatch, `${s.label} ${Number.isFinite(last) ? this.format(last) : "–"}`);
      return item;
    });
    this.legend.replaceChildren(...items);
  }
}

function formatSpan(seconds) {
  return seconds >= 120 ? `${Math.round(seconds / 60)} min` : `${Math.round(seconds)} s`;
}
