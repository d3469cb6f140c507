// "Does this look like a chest X-ray at all?" and "is the answer borderline?", computed in the
// page as pneumoscan/ood.py and calibrate.py compute them in Python, from metadata.json's `ood`
// and `borderline` blocks (docs/metadata.md states every formula).
//
// The features come from the forward pass that gives the probability (heatmap.js's explainer
// reads the block's feature layer as a second output); colourfulness from the decoded RGB
// before luma; aspect from the decoded size. All arithmetic is float64 on the stored float32
// numbers, as Python does it:
//   f         = the feature layer's output, pooled (`mean_std`: per-channel means, then
//               population standard deviations over the cells; `none`: flattened)
//   d2        = sum_i p_i^2 / variances_i + max(0, |z|^2 - |p|^2) / residual_variance,
//               z = f - mean, p = components z
//   ood_score = max(d2 / T_d2, colourfulness / T_colour, (aspect - 1) / (T_aspect - 1))
//   ood       = ood_score > 1;   borderline = low < probability < high
//
// `readOod` and `readBorderline` check a block against what this file computes and the model
// it will be read from; a block they cannot follow throws MetadataError, which the page says
// once, showing no flag rather than a guessed one.
import { MetadataError } from './errors.js';

export const POOLINGS = ['mean_std', 'none'];
const COLOUR_SAMPLE_SIDE = 256; // preprocess.COLOUR_SAMPLE_SIDE: sample every s-th row, column

const fail = (message) => { throw new MetadataError(`metadata.json: ${message}`); };
const finite = (x) => typeof x === 'number' && Number.isFinite(x);

/** A float32 array packed as ood.pack writes it ({dtype, byte_order, shape, base64}), as float64. */
export function unpack(packed, key) {
  if (!packed || packed.dtype !== 'float32' || packed.byte_order !== 'little' || !Array.isArray(packed.shape) ||
    typeof packed.base64 !== 'string') {
    fail(`${key} must be a little-endian float32 array ({dtype, byte_order, shape, base64}).`);
  }
  let binary;
  try {
    binary = atob(packed.base64);
  } catch (error) {
    fail(`${key}.base64 is not base64.`);
  }
  const count = packed.shape.reduce((a, b) => a * b, 1);
  if (binary.length !== 4 * count) fail(`${key} holds ${binary.length} bytes, not 4 x ${packed.shape.join(' x ')}.`);
  const view = new DataView(new ArrayBuffer(binary.length));
  for (let i = 0; i < binary.length; i += 1) view.setUint8(i, binary.charCodeAt(i));
  const out = new Float64Array(count);
  for (let i = 0; i < count; i += 1) out[i] = view.getFloat32(4 * i, true);
  return out;
}

/**
 * metadata.json's `ood` block, checked against the model, as the numbers `oodScore` uses; null
 * for a bundle without one (made before the flag).
 * @throws MetadataError: a pooling this page does not compute, a layer the model lacks, or
 *   arrays and numbers that do not fit together.
 */
export function readOod(metadata, model) {
  const block = metadata.ood;
  if (block === undefined || block === null) return null;
  if (!POOLINGS.includes(block.feature_pooling)) {
    fail(`ood.feature_pooling "${block.feature_pooling}" is not one this page computes (${POOLINGS.join(', ')}).`);
  }
  let layer;
  try {
    layer = model.getLayer(block.feature_layer);
  } catch (error) {
    fail(`ood.feature_layer ${block.feature_layer} is not a layer of the model.`);
  }
  const shape = layer.outputShape;
  if (!Array.isArray(shape) || Array.isArray(shape[0])) fail(`ood.feature_layer ${block.feature_layer} has several outputs.`);
  const size = block.feature_pooling === 'mean_std'
    ? (shape.length === 4 ? 2 * shape[3] : fail(`ood.feature_layer ${block.feature_layer} does not output a feature map, which mean_std pools.`))
    : shape.slice(1).reduce((a, b) => a * b, 1);
  const m = block.mahalanobis || {};
  const mean = unpack(m.mean, 'ood.mahalanobis.mean');
  const components = unpack(m.components, 'ood.mahalanobis.components');
  const variances = Array.isArray(m.variances) ? Float64Array.from(m.variances) : null;
  const k = variances ? variances.length : 0;
  if (mean.length !== size) fail(`ood.mahalanobis.mean has ${mean.length} values; the features have ${size}.`);
  if (!variances || components.length !== k * size || !variances.every((v) => v > 0)) {
    fail(`ood.mahalanobis needs positive variances, one per row of components (k x ${size}).`);
  }
  const thresholds = [m.threshold, m.residual_variance, block.colourfulness && block.colourfulness.threshold,
    block.aspect && block.aspect.threshold];
  if (!thresholds.every((x) => finite(x) && x > 0) || !(block.aspect.threshold > 1)) {
    fail('ood needs positive mahalanobis.threshold and residual_variance, colourfulness.threshold, and aspect.threshold above 1.');
  }
  return {
    featureLayer: block.feature_layer, pooling: block.feature_pooling, size, mean, components, variances, k,
    residualVariance: m.residual_variance, d2Threshold: m.threshold,
    colourThreshold: block.colourfulness.threshold, aspectThreshold: block.aspect.threshold,
  };
}

/** metadata.json's `borderline` band as `{low, high}`; null for a bundle without one.
 * @throws MetadataError: bounds that are not 0 <= low <= high <= 1. */
export function readBorderline(metadata) {
  const band = metadata.borderline;
  if (band === undefined || band === null) return null;
  if (!finite(band.low) || !finite(band.high) || !(band.low >= 0 && band.low <= band.high && band.high <= 1)) {
    fail('borderline needs low and high with 0 <= low <= high <= 1.');
  }
  return { low: band.low, high: band.high };
}

/** borderline = low < probability < high (the calibrated probability). */
export function isBorderline(probability, band) {
  return band.low < probability && probability < band.high;
}

/**
 * The pooled features, float64: `values` the feature layer's output for one image (float32,
 * row-major, `shape` without the batch axis).
 */
export function poolFeatures(values, shape, pooling) {
  if (pooling === 'none') return Float64Array.from(values);
  const channels = shape[shape.length - 1];
  const cells = values.length / channels;
  const out = new Float64Array(2 * channels);
  for (let c = 0; c < channels; c += 1) {
    let sum = 0;
    for (let i = c; i < values.length; i += channels) sum += values[i];
    const mean = sum / cells;
    let squares = 0;
    for (let i = c; i < values.length; i += channels) squares += (values[i] - mean) ** 2;
    out[c] = mean;
    out[channels + c] = Math.sqrt(squares / cells);
  }
  return out;
}

/** The Mahalanobis part's d2 of pooled features `f`, by the block's formula. */
export function squaredDistance(spec, f) {
  const { mean, components, variances, k, size } = spec;
  const z = new Float64Array(size);
  let total = 0;
  for (let j = 0; j < size; j += 1) {
    z[j] = f[j] - mean[j];
    total += z[j] * z[j];
  }
  let exact = 0;
  let projected = 0;
  for (let i = 0; i < k; i += 1) {
    let p = 0;
    for (let j = 0, o = i * size; j < size; j += 1, o += 1) p += components[o] * z[j];
    exact += (p * p) / variances[i];
    projected += p * p;
  }
  return exact + Math.max(0, total - projected) / spec.residualVariance;
}

/**
 * Hasler and Süsstrunk's colourfulness of RGBA bytes (alpha ignored), on the pixels of every
 * s-th row and column from the first, s = ceil(max(width, height) / 256); 0 for grey pixels.
 */
export function colourfulness(rgba, width, height) {
  const step = Math.ceil(Math.max(width, height) / COLOUR_SAMPLE_SIDE);
  let grey = true;
  for (let y = 0; y < height && grey; y += step) {
    for (let x = 0, o = 4 * y * width; x < width; x += step, o += 4 * step) {
      if (rgba[o] !== rgba[o + 1] || rgba[o + 1] !== rgba[o + 2]) {
        grey = false;
        break;
      }
    }
  }
  if (grey) return 0;
  // Two passes (mean, then squared deviations), as NumPy's std.
  let n = 0;
  let sumRg = 0;
  let sumYb = 0;
  for (let y = 0; y < height; y += step) {
    for (let x = 0, o = 4 * y * width; x < width; x += step, o += 4 * step) {
      sumRg += rgba[o] - rgba[o + 1];
      sumYb += (rgba[o] + rgba[o + 1]) / 2 - rgba[o + 2];
      n += 1;
    }
  }
  const meanRg = sumRg / n;
  const meanYb = sumYb / n;
  let varRg = 0;
  let varYb = 0;
  for (let y = 0; y < height; y += step) {
    for (let x = 0, o = 4 * y * width; x < width; x += step, o += 4 * step) {
      varRg += (rgba[o] - rgba[o + 1] - meanRg) ** 2;
      varYb += ((rgba[o] + rgba[o + 1]) / 2 - rgba[o + 2] - meanYb) ** 2;
    }
  }
  return Math.sqrt(varRg / n + varYb / n) + 0.3 * Math.sqrt(meanRg ** 2 + meanYb ** 2);
}

/** The longer side over the shorter. */
export function aspect(width, height) {
  return Math.max(width, height) / Math.min(width, height);
}

/** `{score, ood, parts}`: ood_score and its three parts, each 1 at its threshold. */
export function oodScore(spec, f, colour, ratio) {
  const parts = {
    mahalanobis: squaredDistance(spec, f) / spec.d2Threshold,
    colourfulness: colour / spec.colourThreshold,
    aspect: (ratio - 1) / (spec.aspectThreshold - 1),
  };
  const score = Math.max(parts.mahalanobis, parts.colourfulness, parts.aspect);
  return { score, ood: score > 1, parts };
}
