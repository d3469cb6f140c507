// The verdict on a film, as pneumoscan/decision.py gives it in Python: metadata.json's
// calibration, threshold, borderline band and out-of-distribution rule, read once
// (`readDecision`, `readBorderline`, `readOod`) and applied in one place (`verdict`). The
// formulas are docs/metadata.md's:
//   probability = sigmoid(slope * logit(clip(p, 1e-7, 1 - 1e-7)) + intercept)
//   label       = class_names[1] if probability >= threshold else class_names[0]
//   borderline  = low < probability < high (an end at 0 or 1 takes in 0 or 1 itself)
//   ood         = ood_score > 1 (ood_score: ood.js, the distance maths)
//
// exp and log are written out (`exactExp`, `exactLog`: fdlibm's algorithms in float64
// operations, which IEEE 754 rounds alike everywhere) exactly as pneumoscan/calibrate.py writes
// them, so the calibrated probability is the same number, bit for bit, on both sides; Math.exp
// and NumPy's exp differ by an ulp on about one argument in ten. tests/test_decision_js.py
// compares them.
import { MetadataError, need } from './errors.js';
import { MAP_POOLINGS, POOLINGS, poolFeatures, scoreParts, unpack } from './ood.js';

const CALIBRATION_METHODS = ['none', 'temperature', 'platt'];
const EPSILON = 1e-7; // probabilities are clipped to [EPSILON, 1 - EPSILON] before the logit
export const OOD_ABOVE = 1; // ood = ood_score > 1: each part is 1 at its own threshold

const fail = (message) => { throw new MetadataError(`metadata.json: ${message}`); };
const finite = (x) => typeof x === 'number' && Number.isFinite(x);

// ---- exp and log, as calibrate.py writes them -------------------------------------------------

const LN2_HI = 6.93147180369123816490e-01;
const LN2_LO = 1.90821492927058770002e-10;
const INV_LN2 = 1.44269504088896338700e+00;
const [P1, P2, P3, P4, P5] = [1.66666666666666019037e-01, -2.77777777770155933842e-03,
  6.61375632143793436117e-05, -1.65339022054652515390e-06, 4.13813679705723846039e-08];
const [LG1, LG2, LG3, LG4, LG5, LG6, LG7] = [6.666666666666735130e-01, 3.999999999940941908e-01,
  2.857142874366239149e-01, 2.222219843214978396e-01, 1.818357216161805012e-01,
  1.531383769920937332e-01, 1.479819860511658591e-01];
const EXP_OVER = 7.09782712893383973096e+02;
const EXP_UNDER = -7.45133219101941108420e+02;
const TWO_M1000 = 9.33263618503218878990e-302; // 2 ** -1000
const TWO_54 = 1.80143985094819840000e+16; // 2 ** 54

const word = new DataView(new ArrayBuffer(8));
/** The high 32 bits of a float64 (sign, exponent, top of the mantissa). */
function highWord(x) {
  word.setFloat64(0, x);
  return word.getInt32(0);
}
function withHighWord(x, high) {
  word.setFloat64(0, x);
  word.setInt32(0, high);
  return word.getFloat64(0);
}

/** e ** x by fdlibm's algorithm (calibrate.exact_exp). */
export function exactExp(x) {
  if (Number.isNaN(x)) return x;
  if (x > EXP_OVER) return Infinity;
  if (x < EXP_UNDER) return 0;
  const magnitude = highWord(x) & 0x7fffffff;
  if (magnitude < 0x3e300000) return 1 + x; // |x| < 2 ** -28
  const negative = x < 0;
  let k = 0;
  let hi = 0;
  let lo = 0;
  let r = x;
  if (magnitude > 0x3fd62e42) { // |x| > 0.5 ln2: x = k ln2 + r, ln2 in two parts
    if (magnitude < 0x3ff0a2b2) {
      hi = x - (negative ? -LN2_HI : LN2_HI);
      lo = negative ? -LN2_LO : LN2_LO;
      k = negative ? -1 : 1;
    } else {
      k = Math.trunc(INV_LN2 * x + (negative ? -0.5 : 0.5));
      hi = x - k * LN2_HI;
      lo = k * LN2_LO;
    }
    r = hi - lo;
  }
  const t = r * r;
  const c = r - t * (P1 + t * (P2 + t * (P3 + t * (P4 + t * P5))));
  if (k === 0) return 1 - ((r * c) / (c - 2) - r);
  const y = 1 - ((lo - (r * c) / (2 - c)) - hi);
  if (k >= -1021) return withHighWord(y, highWord(y) + k * 1048576);
  return withHighWord(y, highWord(y) + (k + 1000) * 1048576) * TWO_M1000;
}

/** The natural logarithm by fdlibm's algorithm (calibrate.exact_log): log(0) = -Infinity,
 * log(Infinity) = Infinity, NaN for NaN and negative numbers. */
export function exactLog(x) {
  if (!(x > 0 && x < Infinity)) return x === 0 ? -Infinity : (x === Infinity ? Infinity : NaN);
  const subnormal = x < 2.2250738585072014e-308;
  const scaled = subnormal ? x * TWO_54 : x; // exact: subnormals made normal, k made up below
  const high = highWord(scaled);
  const mantissa = high & 0x000fffff;
  const i = (mantissa + 0x95f64) & 0x100000;
  const f = withHighWord(scaled, mantissa | (i ^ 0x3ff00000)) - 1; // in [sqrt(2)/2 - 1, sqrt(2) - 1)
  const dk = (high >> 20) - 1023 - (subnormal ? 54 : 0) + (i >> 20);
  if ((0x000fffff & (2 + mantissa)) < 3) { // |f| < 2 ** -20
    if (f === 0) return dk * LN2_HI + dk * LN2_LO;
    const small = f * f * (0.5 - 0.33333333333333333 * f);
    return dk * LN2_HI - ((small - dk * LN2_LO) - f);
  }
  const s = f / (2 + f);
  const z = s * s;
  const w = z * z;
  const r = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7))) + w * (LG2 + w * (LG4 + w * LG6));
  const halfSquare = 0.5 * f * f;
  if (((mantissa - 0x6147a) | (0x6b851 - mantissa)) > 0) {
    return dk * LN2_HI - ((halfSquare - (s * (halfSquare + r) + dk * LN2_LO)) - f);
  }
  return dk * LN2_HI - ((s * (f - r) - dk * LN2_LO) - f);
}

/** log(q / (1 - q)), q = clip(p, 1e-7, 1 - 1e-7) (calibrate.logit). */
export function logit(p) {
  const q = Math.min(Math.max(p, EPSILON), 1 - EPSILON);
  return exactLog(q / (1 - q));
}

/** 1 / (1 + e) for z >= 0, e / (1 + e) below, e = exp(-|z|) (calibrate._sigmoid). */
export function sigmoid(z) {
  const e = exactExp(-Math.abs(z));
  return z >= 0 ? 1 / (1 + e) : e / (1 + e);
}

/** sigmoid(slope * logit(p) + intercept), the calibrated probability (calibrate.apply_calibration). */
export function calibrate(p, calibration) {
  return sigmoid(calibration.slope * logit(p) + calibration.intercept);
}

// ---- metadata.json's blocks, read once ----------------------------------------------------------

/** A finite number as Python's repr(float(x)) writes it: 2 -> "2.0", 1e-05, 1e+16. */
export function pythonFloat(x) {
  if (Object.is(x, -0)) return '-0.0';
  const [digits, power] = x.toExponential().split('e'); // the shortest digits that round-trip
  const exponent = Number(power);
  if (exponent < -4 || exponent >= 16) {
    const sign = exponent < 0 ? '-' : '+';
    return `${digits}e${sign}${String(Math.abs(exponent)).padStart(2, '0')}`;
  }
  const text = String(x); // plain notation in this range, same digits
  return text.includes('.') ? text : `${text}.0`;
}

function readCalibration(calibration) {
  need(calibration && CALIBRATION_METHODS.includes(calibration.method),
    `calibration.method must be one of ${CALIBRATION_METHODS.join(', ')}.`);
  const { slope, intercept } = calibration;
  need(Number.isFinite(slope) && Number.isFinite(intercept),
    'calibration slope and intercept must be finite numbers.');
  // The sentence of Python's calibrate.apply_calibration, numbers written as Python writes them.
  need(calibration.method !== 'none' || (slope === 1 && intercept === 0),
    "calibration method 'none' needs slope 1 and intercept 0; " +
    `got ${pythonFloat(slope)}, ${pythonFloat(intercept)}`);
  return { method: calibration.method, slope, intercept };
}

/**
 * The calibration, threshold and class names every bundle has, as `verdict` uses them:
 * `{classNames, calibration: {method, slope, intercept}, threshold}`; `band` and `ood` start
 * null (`readBorderline`, `readOod` give them).
 * @throws MetadataError: a calibration, threshold or class names this page cannot apply.
 */
export function readDecision(metadata) {
  const calibration = readCalibration(metadata.calibration);
  need(Array.isArray(metadata.class_names) && metadata.class_names.length === 2,
    'class_names must hold two names.');
  const threshold = metadata.threshold && metadata.threshold.value;
  need(Number.isFinite(threshold) && threshold >= 0 && threshold <= 1,
    'threshold.value must be a number in [0, 1].');
  return { classNames: metadata.class_names, calibration, threshold, band: null, ood: null };
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

/**
 * metadata.json's `ood` block, checked against the model, as the numbers `scoreParts` uses;
 * null for a bundle without one (made before the flag).
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
  const size = MAP_POOLINGS.includes(block.feature_pooling)
    ? (shape.length === 4 ? 2 * shape[3] : fail(`ood.feature_layer ${block.feature_layer} does not output a feature map, which ${block.feature_pooling} pools.`))
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

// ---- the verdict ------------------------------------------------------------------------------

/** borderline = low < probability < high, an end at 0 or 1 taking in 0 or 1 (calibrate.in_band). */
export function inBand(probability, band) {
  return (band.low < probability || band.low <= 0) && (probability < band.high || band.high >= 1);
}

/** The label for a calibrated probability: classNames[1] at or above the threshold. */
export function decide(probability, decision) {
  return probability >= decision.threshold ? decision.classNames[1] : decision.classNames[0];
}

/**
 * What a film gets (decision.Verdict): `{label, probability, threshold, borderline, ood,
 * oodScore, oodParts}` from the model's raw output `p` and, for the out-of-distribution score,
 * the feature layer's output `features` ({values, shape}), the decoded RGB's colourfulness and
 * the image's aspect. `borderline` is null without a band, `ood`, `oodScore` and `oodParts`
 * null without an `ood` rule.
 */
export function verdict(decision, p, features = null, colourfulness = 0, aspect = 1) {
  const probability = calibrate(p, decision.calibration);
  const rule = decision.ood;
  const parts = rule && features
    ? scoreParts(rule, poolFeatures(features.values, features.shape, rule.pooling), colourfulness, aspect)
    : null;
  const score = parts && Math.max(parts.mahalanobis, parts.colourfulness, parts.aspect);
  return {
    label: decide(probability, decision),
    probability,
    threshold: decision.threshold,
    borderline: decision.band ? inBand(probability, decision.band) : null,
    ood: parts ? score > OOD_ABOVE : null,
    oodScore: parts ? score : null,
    oodParts: parts,
  };
}
