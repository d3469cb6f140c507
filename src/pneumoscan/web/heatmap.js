// Where the model looked: each image's class activation map, computed in the page as
// pneumoscan/heatmap.py computes it in Python (metadata.json's `heatmap` block says how).
//
// `cam` (pneumonet: global average pooling, then one dense unit): the cells of the feature
// layer's output times the dense kernel, whose mean plus the bias is the logit; computed in the
// same forward pass as the probability (forward.js's `makeForward`, given `makeMap`'s map).
// `grad-cam` (the paper's CNN): ReLU(sum_c alpha_c F_c), alpha_c the mean over the grid of
// d(sigmoid output)/dF_c, the gradient taken through the layers after the feature layer applied
// to the features themselves; only a chain of layers is supported there (a branch or a shared
// layer after the feature layer means no heatmap, said once on the page).
//
// `heatmapPeak` summarises a map as one point, as heatmap.heatmap_peak does; `paintHeatmap`
// draws it as explain.save_overlay does: less its minimum, over its maximum, stretched
// bilinearly over the whole image (cell centres at (j + 0.5) / w), inferno colours, alpha 0.6 v.
import { MetadataError } from './errors.js';

const METHODS = ['cam', 'grad-cam'];
const ALPHA = 0.6; // explain.save_overlay's opacity at the map's maximum
// matplotlib's inferno colour map, its 256 colours as RRGGBB.
const INFERNO_HEX =
  '00000401000501010601010802010a02020c02020e03021004031204031405041706041907051b08051d09061f0a0722' +
  '0b07240c08260d08290e092b10092d110a30120a32140b34150b37160b39180c3c190c3e1b0c411c0c431e0c451f0c48' +
  '210c4a230c4c240c4f260c51280b53290b552b0b572d0b592f0a5b310a5c320a5e340a5f3609613809623909633b0964' +
  '3d09653e0966400a67420a68440a68450a69470b6a490b6a4a0c6b4c0c6b4d0d6c4f0d6c510e6c520e6d540f6d550f6d' +
  '57106e59106e5a116e5c126e5d126e5f136e61136e62146e64156e65156e67166e69166e6a176e6c186e6d186e6f196e' +
  '71196e721a6e741a6e751b6e771c6d781c6d7a1d6d7c1d6d7d1e6d7f1e6c801f6c82206c84206b85216b87216b88226a' +
  '8a226a8c23698d23698f24699025689225689326679526679727669827669a28659b29649d29649f2a63a02a63a22b62' +
  'a32c61a52c60a62d60a82e5fa92e5eab2f5ead305dae305cb0315bb1325ab3325ab43359b63458b73557b93556ba3655' +
  'bc3754bd3853bf3952c03a51c13a50c33b4fc43c4ec63d4dc73e4cc83f4bca404acb4149cc4248ce4347cf4446d04545' +
  'd24644d34743d44842d54a41d74b3fd84c3ed94d3dda4e3cdb503bdd513ade5238df5337e05536e15635e25734e35933' +
  'e45a31e55c30e65d2fe75e2ee8602de9612bea632aeb6429eb6628ec6726ed6925ee6a24ef6c23ef6e21f06f20f1711f' +
  'f1731df2741cf3761bf37819f47918f57b17f57d15f67e14f68013f78212f78410f8850ff8870ef8890cf98b0bf98c0a' +
  'f98e09fa9008fa9207fa9407fb9606fb9706fb9906fb9b06fb9d07fc9f07fca108fca309fca50afca60cfca80dfcaa0f' +
  'fcac11fcae12fcb014fcb216fcb418fbb61afbb81dfbba1ffbbc21fbbe23fac026fac228fac42afac62df9c72ff9c932' +
  'f9cb35f8cd37f8cf3af7d13df7d340f6d543f6d746f5d949f5db4cf4dd4ff4df53f4e156f3e35af3e55df2e661f2e865' +
  'f2ea69f1ec6df1ed71f1ef75f1f179f2f27df2f482f3f586f3f68af4f88ef5f992f6fa96f8fb9af9fc9dfafda1fcffa4';
const INFERNO = Uint8Array.from({ length: 3 * 256 }, (_, k) => parseInt(INFERNO_HEX.substr(2 * k, 2), 16)); // RGB RGB ...

/**
 * `[x, y]` in [0, 1]: the centre of mass of the cells where the map less its minimum is at
 * least half its maximum, cell (i, j) of an (h, w) grid sitting at ((j + 0.5)/w, (i + 0.5)/h).
 * A flat map gives the centre. `values`: the grid row by row.
 */
export function heatmapPeak(values, height, width) {
  let low = Infinity;
  let high = -Infinity;
  for (const v of values) {
    if (v < low) low = v;
    if (v > high) high = v;
  }
  const top = high - low;
  if (!(top > 0)) return [0.5, 0.5];
  let total = 0;
  let x = 0;
  let y = 0;
  for (let i = 0; i < height; i += 1) {
    for (let j = 0; j < width; j += 1) {
      const shifted = values[i * width + j] - low;
      if (shifted >= 0.5 * top) {
        total += shifted;
        x += ((j + 0.5) / width) * shifted;
        y += ((i + 0.5) / height) * shifted;
      }
    }
  }
  return [x / total, y / total];
}

// ---- which map, from metadata.json or from the model itself ---------------------------------

const className = (layer) => layer.getClassName();

/**
 * metadata.json's `heatmap` block checked against the model, or (a bundle written before it)
 * the same derived from the model as model.heatmap_spec does: `{method, featureLayer,
 * weightsLayer}` (weightsLayer for `cam` only).
 * @throws MetadataError: an unknown method, or layers the model does not have.
 */
export function heatmapSpec(metadata, model) {
  const spec = metadata.heatmap ? fromMetadata(metadata.heatmap) : derive(model);
  const layer = (name, key) => {
    try {
      return model.getLayer(name);
    } catch (error) {
      throw new MetadataError(`metadata.json: heatmap.${key} ${name} is not a layer of the model.`);
    }
  };
  const features = layer(spec.featureLayer, 'feature_layer');
  if (features.outputShape.length !== 4) {
    throw new MetadataError(`metadata.json: heatmap.feature_layer ${spec.featureLayer} does not output a feature map.`);
  }
  if (spec.method === 'cam') {
    const weights = layer(spec.weightsLayer, 'weights_layer');
    const kernel = className(weights) === 'Dense' && weights.getWeights()[0].shape;
    if (!kernel || kernel[1] !== 1 || kernel[0] !== features.outputShape[3]) {
      throw new MetadataError(`metadata.json: heatmap.weights_layer ${spec.weightsLayer} is not one dense ` +
        `unit over the ${features.outputShape[3]} channels of ${spec.featureLayer}.`);
    }
  }
  return spec;
}

function fromMetadata(block) {
  if (!METHODS.includes(block.method)) {
    throw new MetadataError(`metadata.json: heatmap.method must be ${METHODS.join(' or ')}; ` +
      `this page computes no "${block.method}" maps.`);
  }
  return { method: block.method, featureLayer: block.feature_layer, weightsLayer: block.weights_layer };
}

function derive(model) {
  const { layers } = model;
  const output = layers[layers.length - 1];
  const pools = layers.flatMap((layer, i) => (className(layer) === 'GlobalAveragePooling2D' ? [i] : []));
  if (pools.length && className(output) === 'Dense' && output.units === 1) {
    const last = pools[pools.length - 1];
    if (layers.slice(last + 1, -1).every((layer) => className(layer) === 'Dropout')) {
      const features = layers[last].inboundNodes[0].inboundLayers[0];
      return { method: 'cam', featureLayer: features.name, weightsLayer: output.name };
    }
  }
  const maps = layers.filter((layer) => !Array.isArray(layer.outputShape[0]) && layer.outputShape.length === 4);
  return { method: 'grad-cam', featureLayer: maps[maps.length - 1].name };
}

/** The layers after `features` when they form a chain to the model's one output, else null. */
function chainAfter(model, features) {
  const chain = model.layers.slice(model.layers.indexOf(features) + 1);
  let previous = features;
  for (const layer of chain) {
    const nodes = layer.inboundNodes;
    if (previous.outboundNodes.length !== 1 || nodes.length !== 1 ||
      nodes[0].inboundLayers.length !== 1 || nodes[0].inboundLayers[0] !== previous) return null;
    previous = layer;
  }
  return model.outputs.length === 1 && model.outputs[0] === previous.output ? chain : null;
}

// ---- the map, computed in the forward pass (forward.js) --------------------------------------

/**
 * The map of `spec` (`heatmapSpec`) as the forward pass computes it: `{describe, unavailable,
 * map}`, `map` being `{layer, of}` for forward.js's `makeForward` (`of` turns the film's (1, h,
 * w, c) output of `layer` into the (h, w) map), or null where the map cannot be computed
 * (`unavailable` then says why, once).
 */
export function makeMap(tf, model, spec) {
  const features = model.getLayer(spec.featureLayer);
  const describe = `${spec.method === 'cam' ? 'class activation map' : 'Grad-CAM'} of ${spec.featureLayer}`;
  if (spec.method === 'cam') {
    const kernel = model.getLayer(spec.weightsLayer).getWeights()[0]; // (c, 1)
    const of = (f) => { // (1, h, w, c) -> (h, w)
      const [, h, w, c] = f.shape;
      return f.reshape([h * w, c]).matMul(kernel).reshape([h, w]);
    };
    return { describe, unavailable: null, map: { layer: spec.featureLayer, of } };
  }
  const chain = chainAfter(model, features);
  if (chain === null) {
    return {
      describe: null,
      unavailable: `no heatmap: the layers after ${spec.featureLayer} are not a simple chain, which ` +
        'the page does not differentiate (`pneumoscan explain` does)',
      map: null,
    };
  }
  const head = (f) => chain.reduce((x, layer) => layer.apply(x, { training: false }), f);
  const gradient = tf.grad(head); // d(sigmoid output)/dF, (1, h, w, c)
  const of = (f) => {
    const alpha = gradient(f).mean([1, 2], true); // (1, 1, 1, c)
    return tf.relu(f.mul(alpha).sum(-1)).squeeze([0]); // (h, w)
  };
  return { describe, unavailable: null, map: { layer: spec.featureLayer, of } };
}

// ---- drawing --------------------------------------------------------------------------------

/**
 * The map as RGBA bytes of `width` x `height` pixels: less its minimum, over its maximum,
 * bilinearly stretched over the whole image (half-pixel centres, edges held), inferno colours
 * with alpha 0.6 v, as explain.save_overlay draws it. A flat map is transparent.
 */
export function heatmapRgba(grid, gridHeight, gridWidth, width, height) {
  let low = Infinity;
  let high = -Infinity;
  for (const v of grid) {
    if (v < low) low = v;
    if (v > high) high = v;
  }
  const rgba = new Uint8ClampedArray(width * height * 4);
  if (!(high > low)) return rgba;
  // Each grid row stretched across the width first (gridHeight x width values in [0, 1]),
  // then each output row between the two stretched rows around it.
  const columns = stretch(width, gridWidth);
  const rows = stretch(height, gridHeight);
  const across = new Float64Array(gridHeight * width);
  for (let i = 0; i < gridHeight; i += 1) {
    for (let x = 0; x < width; x += 1) {
      const a = grid[i * gridWidth + columns.from[x]];
      const b = grid[i * gridWidth + columns.to[x]];
      across[i * width + x] = (a + columns.t[x] * (b - a) - low) / (high - low);
    }
  }
  for (let y = 0, o = 0; y < height; y += 1) {
    const top = rows.from[y] * width;
    const bottom = rows.to[y] * width;
    const t = rows.t[y];
    for (let x = 0; x < width; x += 1, o += 4) {
      const v = across[top + x] + t * (across[bottom + x] - across[top + x]);
      const colour = 3 * Math.round(v * 255);
      rgba[o] = INFERNO[colour]; rgba[o + 1] = INFERNO[colour + 1]; rgba[o + 2] = INFERNO[colour + 2];
      rgba[o + 3] = Math.round(255 * ALPHA * v);
    }
  }
  return rgba;
}

/** Bilinear sampling of `cells` cells over `size` pixels, half-pixel centres, edges held: for
 * each pixel, the two cells around it and the weight of the second. */
function stretch(size, cells) {
  const from = new Int32Array(size);
  const to = new Int32Array(size);
  const t = new Float64Array(size);
  for (let o = 0; o < size; o += 1) {
    const u = Math.min(Math.max(((o + 0.5) / size) * cells - 0.5, 0), cells - 1);
    from[o] = Math.min(Math.floor(u), Math.max(cells - 2, 0));
    to[o] = Math.min(from[o] + 1, cells - 1);
    t[o] = u - from[o];
  }
  return { from, to, t };
}

/** Draw the map over what `context` holds (its canvas's full size), alpha-blended. */
export function paintHeatmap(context, map) {
  const { width, height } = context.canvas;
  const layer = new OffscreenCanvas(width, height);
  layer.getContext('2d').putImageData(
    new ImageData(heatmapRgba(map.grid, map.gridHeight, map.gridWidth, width, height), width, height), 0, 0);
  context.drawImage(layer, 0, 0);
}
