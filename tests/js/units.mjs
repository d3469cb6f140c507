// Run single functions of the page's modules in Node on tables Python sends, for
// tests/test_heatmap_js.py and tests/test_dicom_js.py: one process answers many calls.
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
// A function that throws answers {"error": message}.
import readline from 'node:readline';
import { decodeRle } from '../../src/pneumoscan/web/dicom.js';
import * as tf from '@tensorflow/tfjs';
import {
  heatmapPeak, heatmapRgba, readTestTime, withCopies,
} from '../../src/pneumoscan/web/heatmap.js';

const base64 = (bytes) => Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('base64');
const bytes = (text) => new Uint8Array(Buffer.from(text, 'base64'));

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
