// "Does this look like a chest X-ray at all?": the distance maths of the out-of-distribution
// score, as pneumoscan/ood.py computes it in Python, from metadata.json's `ood` block as
// decision.js reads it (`readOod`; docs/metadata.md states every formula). decision.js turns the
// score into the flag (ood = ood_score > 1) with the rest of the verdict.
//
// The features come from the forward pass that gives the probability (forward.js reads the
// block's feature layer as one more output); colourfulness from the decoded RGB before luma and
// aspect from the decoded size (preprocess.js). All arithmetic is float64 on the stored float32
// numbers, as Python does it:
//   f         = the feature layer's output, pooled (`mean_std`: per-channel means, then
//               population standard deviations over the cells; `sqrt_mean_std`: the same of
//               sqrt(max(x, 0)) of each cell; `none`: flattened)
//   d2        = sum_i p_i^2 / variances_i + max(0, |z|^2 - |p|^2) / residual_variance,
//               z = f - mean, p = components z
//   ood_score = max(d2 / T_d2, colourfulness / T_colour, (aspect - 1) / (T_aspect - 1))
import { MetadataError } from './errors.js';

export const POOLINGS = ['mean_std', 'sqrt_mean_std', 'none'];

/** The poolings that reduce a feature map per channel to [means, standard deviations]. */
export const MAP_POOLINGS = ['mean_std', 'sqrt_mean_std'];

const fail = (message) => { throw new MetadataError(`metadata.json: ${message}`); };

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
 * The pooled features, float64: `values` the feature layer's output for one image (float32,
 * row-major, `shape` without the batch axis).
 */
export function poolFeatures(values, shape, pooling) {
  if (pooling === 'none') return Float64Array.from(values);
  if (pooling === 'sqrt_mean_std') values = Float64Array.from(values, (x) => Math.sqrt(Math.max(x, 0)));
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

/** The three parts of ood_score, each 1 at its threshold; ood_score is the largest
 * (decision.js's `verdict`, as ood.scores in Python). */
export function scoreParts(spec, f, colour, ratio) {
  return {
    mahalanobis: squaredDistance(spec, f) / spec.d2Threshold,
    colourfulness: colour / spec.colourThreshold,
    aspect: (ratio - 1) / (spec.aspectThreshold - 1),
  };
}
