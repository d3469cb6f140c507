// Run a model written by pneumoscan.tfjs.write_tfjs with @tensorflow/tfjs on the cpu backend.
//
// Usage: node tests/js/predict.mjs MODEL_DIR INPUT.f32 N H W C
//   INPUT.f32 holds N*H*W*C little-endian float32 values (NHWC).
// Prints {"outputs": [...], "backend": "cpu"} on stdout; errors go to stderr with exit code 1.
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';

async function loadModel(modelDir) {
  const modelJson = JSON.parse(await readFile(path.join(modelDir, 'model.json'), 'utf8'));
  const weightSpecs = [];
  const buffers = [];
  for (const group of modelJson.weightsManifest) {
    weightSpecs.push(...group.weights);
    for (const shard of group.paths) {
      buffers.push(await readFile(path.join(modelDir, shard)));
    }
  }
  const joined = Buffer.concat(buffers);
  const weightData = joined.buffer.slice(joined.byteOffset, joined.byteOffset + joined.byteLength);
  const handler = tf.io.fromMemory({
    modelTopology: modelJson.modelTopology,
    weightSpecs,
    weightData,
    format: modelJson.format,
    generatedBy: modelJson.generatedBy,
    convertedBy: modelJson.convertedBy,
  });
  return tf.loadLayersModel(handler);
}

async function readInput(inputPath, shape) {
  const bytes = await readFile(inputPath);
  const count = shape.reduce((a, b) => a * b, 1);
  if (bytes.byteLength !== count * 4) {
    throw new Error(`${inputPath} holds ${bytes.byteLength} bytes; shape ${shape} needs ${count * 4}.`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const values = new Float32Array(count);
  for (let i = 0; i < count; i++) values[i] = view.getFloat32(4 * i, true);
  return tf.tensor(values, shape, 'float32');
}

async function main(argv) {
  if (argv.length < 3) {
    throw new Error('usage: node tests/js/predict.mjs MODEL_DIR INPUT.f32 N H W C');
  }
  const [modelDir, inputPath, ...dims] = argv;
  const shape = dims.map((d) => Number.parseInt(d, 10));
  if (shape.some((d) => !Number.isInteger(d) || d <= 0)) {
    throw new Error(`shape must be positive integers, got ${dims.join(' ')}`);
  }
  await tf.setBackend('cpu');
  await tf.ready();
  const model = await loadModel(modelDir);
  const input = await readInput(inputPath, shape);
  const output = model.predict(input);
  const outputs = Array.isArray(output) ? output.map((t) => t.arraySync()) : output.arraySync();
  process.stdout.write(JSON.stringify({ outputs, backend: tf.getBackend() }) + '\n');
}

main(process.argv.slice(2)).catch((error) => {
  process.stderr.write(`predict.mjs: ${error && error.stack ? error.stack : error}\n`);
  process.exit(1);
});
