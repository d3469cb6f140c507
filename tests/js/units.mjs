// Run single functions of the page's modules in Node on tables Python sends, for
// tests/test_heatmap_js.py, tests/test_dicom_js.py and tests/test_decision_js.py: one process
// answers many calls.
//
// Usage: node tests/js/units.mjs; each line of stdin is a call, each line of stdout its answer:
//   {"call": "heatmapPeak", "values": [..], "height": H, "width": W}   -> {"peak": [x, y]}
//   {"call": "heatmapRgba", "values": [..], "height": H, "width": W, "outWidth": w,
//    "outHeight": h}                                                    -> {"rgba": base64}
//   {"call": "decodeRle", "frame": base64, "pixels": N, "samples": S, "bytesPerSample": B}
//                                                                       -> {"native": base64}
//   {"call": "withCopies", "values": [..], "height": H, "width": W, "testTime": {shifts, fill}
//    or null}                                        -> {"copies": [..], "shape": [k, H, W, 1]}
//   {"call": "readTestTime", "metadata": {..}, "height": H, "width": W} -> {"spec": .. or null}
// decision.js, arrays of numbers as base64 little-endian float64, so that every bit arrives:
//   {"call": "exactExp" | "exactLog" | "logit" | "sigmoid", "x": base64}  -> {"y": base64}
//   {"call": "calibrate", "p": base64, "calibration": {slope, intercept}} -> {"y": base64}
//   {"call": "verdicts", "metadata": {..}, "p": base64, "features": [[..], ..] or null,
//    "checks": [[colourfulness, aspect], ..] or null}  -> {"verdicts": [{label, probability,
//    threshold, borderline, ood, oodScore}, ..]} (probability and oodScore as base64 float64)
//   {"call": "poolFeatures", "values": base64 float32, "shape": [h, w, c], "pooling": name}
//                                                                      -> {"y": base64}
// A function that throws answers {"error": message}.
import readline from 'node:readline';
import { decodeRle } from '../../src/pneumoscan/web/dicom.js';
import * as tf from '@tensorflow/tfjs';
import {
  calibrate, exactExp, exactLog, logit, readBorderline, readDecision, readOod, sigmoid, verdict,
} from '../../src/pneumoscan/web/decision.js';
import { readTestTime, withCopies } from '../../src/pneumoscan/web/forward.js';
import { poolFeatures } from '../../src/pneumoscan/web/ood.js';
import { heatmapPeak, heatmapRgba } from '../../src/pneumoscan/web/heatmap.js';

const base64 = (bytes) => Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('base64');
const bytes = (text) => new Uint8Array(Buffer.from(text, 'base64'));

const toFloats = (text) => new Float64Array(bytes(text).slice().buffer); // float64, little-endian
const toBase64 = (values) => base64(Float64Array.from(values));
const each = (f) => (r) => ({ y: toBase64(Array.from(toFloats(r.x), f)) });

/** The model as readOod asks it: one layer, `features`, of the given size (flattened). */
const modelWithFeatures = (size) => ({
  getLayer(name) {
    if (name !== 'features') throw new Error(`no layer ${name}`);
    return { outputShape: [null, size] };
  },
});

function verdicts(r) {
  const decision = readDecision(r.metadata);
  decision.band = readBorderline(r.metadata);
  const size = r.features ? r.features[0].length : 0;
  decision.ood = r.metadata.ood ? readOod(r.metadata, modelWithFeatures(size)) : null;
  const out = Array.from(toFloats(r.p), (p, i) => {
    const features = r.features ? { values: Float32Array.from(r.features[i]), shape: [size] } : null;
    const [colour, aspect] = r.checks ? r.checks[i] : [0, 1];
    const v = verdict(decision, p, features, colour, aspect);
    return {
      label: v.label, probability: toBase64([v.probability]), threshold: v.threshold, borderline: v.borderline,
      ood: v.ood, oodScore: v.oodScore === null ? null : toBase64([v.oodScore]),
    };
  });
  return { verdicts: out };
}

const CALLS = {
  heatmapPeak: (r) => ({ peak: heatmapPeak(Float64Array.from(r.values), r.height, r.width) }),
  heatmapRgba: (r) => ({
    rgba: base64(heatmapRgba(Float64Array.from(r.values), r.height, r.width, r.outWidth, r.outHeight)),
  }),
  decodeRle: (r) => ({ native: base64(decodeRle(bytes(r.frame), r.pixels, r.samples, r.bytesPerSample)) }),
  withCopies: (r) => tf.tidy(() => {
    const batch = withCopies(tf, tf.tensor(r.values, [1, r.height, r.width, 1]), r.testTime);
    return { copies: Array.from(batch.dataSync()), shape: batch.shape };
  }),
  readTestTime: (r) => ({ spec: readTestTime(r.metadata, r.height, r.width) }),
  exactExp: each(exactExp),
  exactLog: each(exactLog),
  logit: each(logit),
  sigmoid: each(sigmoid),
  calibrate: (r) => ({ y: toBase64(Array.from(toFloats(r.p), (p) => calibrate(p, r.calibration))) }),
  verdicts,
  poolFeatures: (r) => ({
    y: toBase64(poolFeatures(new Float32Array(bytes(r.values).slice().buffer), r.shape, r.pooling)),
  }),
};

function answer(request) {
  try {
    return CALLS[request.call](request);
  } catch (error) {
    return { error: error.message };
  }
}

const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (line.trim()) process.stdout.write(`${JSON.stringify(answer(JSON.parse(line)))}\n`);
}
