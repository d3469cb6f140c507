// The model's forward pass on the page, as forward.Forward runs it in Python (Bundle.forward_features): the film
// and its test-time copies (metadata.json's `test_time`, made as forward.shifted makes them) in
// one batch, the mean of their raw outputs, and from the same pass the outputs of the inner
// layers the heatmap (heatmap.js) and the out-of-distribution score (decision.js, ood.js) read,
// the film's own. app.js runs one `makeForward` per model, with the map heatmap.js makes.
import { MetadataError } from './errors.js';

const COMBINE = 'mean of raw outputs';

/**
 * metadata.json's `test_time` block as `{shifts, fill}`, or null without one (one copy: the
 * film). `shifts` are [dy, dx] pixel pairs, content moved down by dy and right by dx, the first
 * [0, 0]; the model's output is the mean of its outputs on the copies (Bundle.forward).
 * @throws MetadataError: a block the page cannot follow (it would show another probability).
 */
export function readTestTime(metadata, height, width) {
  const block = metadata.test_time;
  if (block === undefined || block === null) return null;
  const pair = (s) => Array.isArray(s) && s.length === 2 && s.every(Number.isInteger) &&
    Math.abs(s[0]) < height && Math.abs(s[1]) < width;
  if (!Array.isArray(block.shifts) || block.shifts.length === 0 || !block.shifts.every(pair) ||
    block.shifts[0][0] !== 0 || block.shifts[0][1] !== 0) {
    throw new MetadataError('metadata.json: test_time.shifts must be [dy, dx] pixel pairs smaller ' +
      'than the input, the first [0, 0].');
  }
  if (block.combine !== COMBINE || typeof block.fill !== 'number') {
    throw new MetadataError(`metadata.json: test_time must combine by "${COMBINE}" with a number fill; ` +
      `this page does not compute "${block.combine}".`);
  }
  return { shifts: block.shifts, fill: block.fill };
}

/** The (1, h, w, 1) input and its test-time copies as one batch, film first, as
 * forward.shifted makes them (zero-padding by `fill`, then the window back); the input alone
 * when `testTime` is null. Call inside tf.tidy. */
export function withCopies(tf, input, testTime) {
  if (testTime === null) return input;
  const [, height, width] = input.shape;
  return tf.concat(testTime.shifts.map(([dy, dx]) => {
    if (dy === 0 && dx === 0) return input;
    const padded = tf.pad(input, [[0, 0], [Math.max(dy, 0), Math.max(-dy, 0)],
      [Math.max(dx, 0), Math.max(-dx, 0)], [0, 0]], testTime.fill);
    return padded.slice([0, Math.max(-dy, 0), Math.max(-dx, 0), 0], [-1, height, width, -1]);
  }), 0);
}

/**
 * The page's one forward pass: `run(input)` resolves to `{p, grid, gridHeight, gridWidth,
 * features}`, `p` the model's raw output (the mean over the test-time copies with `testTime`,
 * `readTestTime`), `grid` (Float32Array, row by row) `map.of` applied to the film's output of
 * `map.layer`, or null without a map; `features` the film's output of `extraLayer` (the
 * out-of-distribution block's feature layer) as `{values: Float32Array, shape}` without the batch
 * axis, or null without one.
 * @param map `{layer, of}` from heatmap.js's `makeMap`, or null: `of` turns the (1, h, w, c)
 *   feature map into the (h, w) map inside tf.tidy.
 */
export function makeForward(tf, model, { map = null, extraLayer = null, testTime = null } = {}) {
  const mapLayer = map ? map.layer : null;
  const sameLayer = extraLayer !== null && extraLayer === mapLayer;
  const outputs = [model.outputs[0],
    ...(mapLayer !== null ? [model.getLayer(mapLayer).output] : []),
    ...(extraLayer !== null && !sameLayer ? [model.getLayer(extraLayer).output] : [])];
  const probe = outputs.length === 1 ? model : tf.model({ inputs: model.inputs, outputs });
  return {
    async run(input) {
      const [output, grid, kept] = tf.tidy(() => {
        const result = probe.predict(withCopies(tf, input, testTime));
        const [raw, ...inner] = Array.isArray(result) ? result : [result];
        const mapped = mapLayer === null ? null : film(inner.shift());
        const extra = extraLayer === null ? null : (sameLayer ? mapped : film(inner.shift()));
        return [raw.mean(), mapped && map.of(mapped), extra];
      });
      try {
        const [p, values, featureValues] = await Promise.all([output.data(), grid && grid.data(), kept && kept.data()]);
        return {
          p: p[0], grid: grid ? values : null, gridHeight: grid ? grid.shape[0] : undefined,
          gridWidth: grid ? grid.shape[1] : undefined,
          features: kept && { values: featureValues, shape: kept.shape.slice(1) },
        };
      } finally {
        for (const t of [output, grid, kept]) if (t) t.dispose();
      }
    },
  };
}

/** The first of a batch: the film itself among its test-time copies. */
function film(t) {
  return t.shape[0] === 1 ? t : t.slice([0], [1]);
}
