// The Prometheus text format -> numbers, and histogram percentiles from bucket deltas,
// interpolated within a bucket as PromQL's histogram_quantile does.

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?$/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

function parseValue(text) {
  if (text === "+Inf" || text === "Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  return Number(text);  // "NaN" -> NaN
}

/** Map of metric name -> [{labels, value}] for every sample line of `text`. */
export function parsePrometheus(text) {
  const samples = new Map();
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const m = SAMPLE.exec(line);
    if (!m) continue;
    const labels = {};
    for (const [, name, value] of (m[2] || "").matchAll(LABEL)) {
      labels[name] = value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    if (!samples.has(m[1])) samples.set(m[1], []);
    samples.get(m[1]).push({ labels, value: parseValue(m[3]) });
  }
  return samples;
}

/** Sum of a metric over all its label sets; null when the server does not export it. */
export function total(samples, name) {
  const list = samples.get(name);
  if (!list) return null;
  return list.reduce((sum, s) => sum + (Number.isFinite(s.value) ? s.value : 0), 0);
}

/** Cumulative buckets of histogram `name` summed over label sets: {bounds, counts}, bounds ascending. */
export function histogram(samples, name) {
  const list = samples.get(`${name}_bucket`);
  if (!list) return null;
  const byBound = new Map();
  for (const s of list) {
    const bound = parseValue(s.labels.le);
    byBound.set(bound, (byBound.get(bound) || 0) + s.value);
  }
  const bounds = [...byBound.keys()].sort((a, b) => a - b);
  return { bounds, counts: bounds.map((b) => byBound.get(b)) };
}

/** Observations between two scrapes of one histogram; `older` null (or a reset) gives `newer`. */
export function histogramDelta(newer, older) {
  if (!newer) return null;
  if (!older || older.bounds.length !== newer.bounds.length) return newer;
  const counts = newer.counts.map((c, i) => c - older.counts[i]);
  return counts.some((c) => c < 0) ? newer : { bounds: newer.bounds, counts };
}

/** The q-quantile (0..1) of cumulative buckets; null without observations. */
export function quantile(q, hist) {
  if (!hist || !hist.counts.length) return null;
  const { bounds, counts } = hist;
  const count = counts[counts.length - 1];
  if (!(count > 0)) return null;
  const rank = q * count;
  const i = counts.findIndex((c) => c >= rank);
  if (bounds[i] === Infinity) return bounds.length > 1 ? bounds[bounds.length - 2] : null;  // above every bound
  const lower = i === 0 ? 0 : bounds[i - 1];
  const below = i === 0 ? 0 : counts[i - 1];
  const inBucket = counts[i] - below;
  return inBucket > 0 ? lower + ((bounds[i] - lower) * (rank - below)) / inBucket : bounds[i];
}
