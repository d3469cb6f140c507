// The page's decode step (web/preprocess.js, web/dicom.js) on damaged files, in Node, for
// benchmarks/robustness/fuzz_decode.py and tests/test_fuzz.py.
//
// Usage: node benchmarks/robustness/fuzz_decode.mjs METADATA.json; each line of stdin is a
// file's path, each line of stdout its outcome: {"decoded": [width, height]}, {"refused":
// sentence} (an ImageError) or {"crashed": "Type: message"} (anything else). Node has no JPEG
// decoder: a JPEG (file or DICOM frame) that reaches it is refused as the browser's failure would
// be, so what runs is everything the page does before and around the browser's decoder.
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import readline from 'node:readline';
import dicomParser from 'dicom-parser';
import { ImageError, decode, readPlan } from '../../src/pneumoscan/web/preprocess.js';

globalThis.dicomParser = dicomParser; // as the page's <script> defines it

const noJpegDecoder = async (blob, name) => {
  throw new ImageError(`${name}: is truncated or corrupt (the browser could not decode it).`);
};

async function outcome(file, plan) {
  try {
    const { width, height } = await decode(file, plan, noJpegDecoder);
    return { decoded: [width, height] };
  } catch (error) {
    if (error instanceof ImageError) return { refused: error.message };
    return { crashed: `${error && error.name}: ${error && error.message}` };
  }
}

const plan = readPlan(JSON.parse(await readFile(process.argv[2], 'utf8')));
const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (!line.trim()) continue;
  const file = new File([await readFile(line)], path.basename(line));
  process.stdout.write(`${JSON.stringify(await outcome(file, plan))}\n`);
}
