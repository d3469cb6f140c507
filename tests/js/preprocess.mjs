// Run the page's preprocessing (src/pneumoscan/web/preprocess.js) in Node, for
// tests/test_preprocess_js.py: one process answers many files, one JSON line each.
//
// Usage: node tests/js/preprocess.mjs METADATA.json
//   The plan comes from METADATA.json through the page's own `readPlan`. Then each line of
//   stdin is a request {"path": FILE, "pixels": RAW, "width": W, "height": H}; `pixels` (a file
//   of W*H*4 RGBA bytes) stands in for the browser's JPEG decoder, which Node lacks: Python
//   gives the pixels Pillow decodes, before any orientation, and gets back the bytes the page
//   handed to the decoder, to check that they decode to the same pixels.
//   DICOM files go through the page's dicom.js with dicom-parser from node_modules; for a JPEG
//   baseline DICOM file, `pixels` are those of its frame, and `warnings` come back too.
// Each answer is one line: {"width", "height", "luma" (base64 uint8), "input" (base64
// little-endian float32, the model input), "jpeg" (base64, JPEGs only), "warnings"} or
// {"error", "kind"}.
// A request {"metadata": {...}} instead runs `readPlan` on it: {"plan": {...}} or {"error", "kind"}.
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import readline from 'node:readline';
import * as tf from '@tensorflow/tfjs';
import dicomParser from 'dicom-parser';
import {
  ImageError, MetadataError, decode, luma, readPlan, toModelInput,
} from '../../src/pneumoscan/web/preprocess.js';
import { readDecision } from '../../src/pneumoscan/web/decision.js';

globalThis.dicomParser = dicomParser; // as the page's <script> defines it

const base64 = (bytes) => Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('base64');

function checkMetadata(metadata) {
  try {
    const plan = readPlan(metadata);
    readDecision(metadata); // the page refuses a bundle whose decision it cannot apply, as well
    return { plan };
  } catch (error) {
    if (!(error instanceof MetadataError)) throw error;
    return { error: error.message, kind: 'MetadataError' };
  }
}

async function answer(request, plan) {
  if (request.metadata) return checkMetadata(request.metadata);
  const bytes = await readFile(request.path);
  const file = new File([bytes], path.basename(request.path));
  let handed = null;
  const standIn = async (blob) => {
    handed = new Uint8Array(await blob.arrayBuffer());
    if (!request.pixels) throw new Error('a JPEG needs "pixels" from Python');
    const rgba = new Uint8Array(await readFile(request.pixels));
    return { rgba, width: request.width, height: request.height };
  };
  try {
    const { rgba, width, height, warnings } = await decode(file, plan, standIn);
    const gray = luma(rgba, width, height);
    const input = toModelInput(tf, gray, width, height, plan);
    const values = input.dataSync();
    input.dispose();
    return {
      width, height, luma: base64(Uint8Array.from(gray)), input: base64(new Float32Array(values)),
      ...(handed ? { jpeg: base64(handed) } : {}), warnings,
    };
  } catch (error) {
    if (!(error instanceof ImageError)) throw error;
    return { error: error.message, kind: 'ImageError' };
  }
}

async function main([metadataPath]) {
  await tf.setBackend('cpu');
  await tf.ready();
  const plan = readPlan(JSON.parse(await readFile(metadataPath, 'utf8')));
  const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  for await (const line of lines) {
    if (!line.trim()) continue;
    process.stdout.write(`${JSON.stringify(await answer(JSON.parse(line), plan))}\n`);
  }
}

main(process.argv.slice(2)).catch((error) => {
  process.stderr.write(`preprocess.mjs: ${error && error.stack ? error.stack : error}\n`);
  process.exit(1);
});
