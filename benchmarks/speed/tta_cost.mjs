// The model's forward pass on TF.js's wasm backend in Node, one image against a batch of three
// (what three test-time copies would cost the page): node benchmarks/speed/tta_cost.mjs BUNDLE/tfjs
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const require = createRequire(path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'package.json'));
const tf = require('@tensorflow/tfjs');
const wasm = require('@tensorflow/tfjs-backend-wasm');

const dir = process.argv[2];
wasm.setWasmPaths(`${path.dirname(require.resolve('@tensorflow/tfjs-backend-wasm'))}/`);
await tf.setBackend('wasm');
await tf.ready();
const json = JSON.parse(fs.readFileSync(path.join(dir, 'model.json')));
const weights = fs.readFileSync(path.join(dir, json.weightsManifest[0].paths[0]));
const model = await tf.loadLayersModel(tf.io.fromMemory({
  modelTopology: json.modelTopology,
  weightSpecs: json.weightsManifest[0].weights,
  weightData: weights.buffer.slice(weights.byteOffset, weights.byteOffset + weights.byteLength),
}));
const [, height, width, channels] = model.inputs[0].shape;
for (const round of [1, 2]) {
  for (const batch of [1, 3]) {
    const x = tf.randomUniform([batch, height, width, channels], 0, 255);
    const call = async () => {
      const y = model.predict(x);
      await y.data();
      y.dispose();
    };
    for (let i = 0; i < 3; i += 1) await call(); // warm-up
    const calls = 30;
    const start = performance.now();
    for (let i = 0; i < calls; i += 1) await call();
    console.log(`round ${round}, ${tf.getBackend()}, batch ${batch}: ${((performance.now() - start) / calls).toFixed(1)} ms per call`);
    x.dispose();
  }
}
