// File -> model input, following the `preprocessing` steps of the model's metadata.json
// (docs/metadata.md) exactly as pneumoscan/preprocess.py does in Python:
//   decode (JPEG/PNG, EXIF orientation, no colour conversion, size limits)
//   -> to_uint8 -> grayscale (integer BT.601 luma) -> resize (bilinear, half-pixel centres)
//   -> model_input (NHWC float32 in [0, 255]).
// Then calibration and the decision threshold, in float64, by the formulas of the same page.
// JPEGs are decoded by the browser; PNGs by the code below, because the canvas would round
// translucent pixels and 16-bit samples differently from Pillow.
//
// `readPlan` checks every step against what this file knows how to do, so a model whose
// metadata asks for anything else is refused instead of being fed a different input.

const SCHEMA_VERSION = 1;
const LUMA_FORMULA = '(19595*R + 38470*G + 7471*B + 32768) >> 16';
const STEP_ORDER = ['decode', 'to_uint8', 'grayscale', 'resize', 'model_input'];
const CALIBRATION_METHODS = ['none', 'temperature', 'platt'];
const EPSILON = 1e-7;
const HEADER_BYTES = 64 * 1024; // enough to find a JPEG's frame header after EXIF/ICC blocks

/** A problem with one file; `message` is one sentence naming it, shown on its card. */
export class ImageError extends Error {}

/** A model bundle this page cannot run faithfully. */
export class MetadataError extends Error {}

function need(condition, message) {
  if (!condition) throw new MetadataError(`metadata.json: ${message}`);
}

/**
 * Check metadata.json and turn its steps into the parameters `preprocess` uses.
 * @returns {{maxPixels: number, minSide: number, height: number, width: number,
 *            alignCorners: boolean, halfPixelCenters: boolean}}
 */
export function readPlan(metadata) {
  need(metadata && metadata.schema_version === SCHEMA_VERSION,
    `schema_version ${metadata && metadata.schema_version} is not ${SCHEMA_VERSION}.`);
  const steps = metadata.preprocessing;
  need(Array.isArray(steps) && steps.map((s) => s.op).join() === STEP_ORDER.join(),
    `preprocessing must be the steps ${STEP_ORDER.join(', ')}; this page cannot run others.`);
  const [decode, , grayscale, resize, modelInput] = steps;
  const input = metadata.input;
  need(decode.exif_orientation === true, 'decode.exif_orientation must be true.');
  need(Number.isInteger(decode.max_pixels) && Number.isInteger(decode.min_side),
    'decode needs integer max_pixels and min_side.');
  need(grayscale.formula === LUMA_FORMULA, `grayscale.formula must be "${LUMA_FORMULA}".`);
  need(resize.method === 'bilinear' && resize.antialias === false,
    'resize must be bilinear without antialias.');
  need(typeof resize.half_pixel_centers === 'boolean' && typeof resize.align_corners === 'boolean',
    'resize needs boolean half_pixel_centers and align_corners.');
  need(input.channels === 1 && input.color_mode === 'grayscale' && input.dtype === 'float32',
    'input must be float32 grayscale with 1 channel.');
  need(modelInput.layout === 'NHWC' && modelInput.channels === 1, 'model_input must be NHWC, 1 channel.');
  const size = resize.size || [input.height, input.width];
  need(size[0] === input.height && size[1] === input.width,
    `resize.size ${size} differs from input ${input.height}x${input.width}.`);
  readCalibration(metadata.calibration);
  need(Array.isArray(metadata.class_names) && metadata.class_names.length === 2,
    'class_names must hold two names.');
  const threshold = metadata.threshold && metadata.threshold.value;
  need(Number.isFinite(threshold) && threshold >= 0 && threshold <= 1,
    'threshold.value must be a number in [0, 1].');
  return {
    maxPixels: decode.max_pixels,
    minSide: decode.min_side,
    height: input.height,
    width: input.width,
    alignCorners: resize.align_corners,
    halfPixelCenters: resize.half_pixel_centers,
  };
}

function readCalibration(calibration) {
  need(calibration && CALIBRATION_METHODS.includes(calibration.method),
    `calibration.method must be one of ${CALIBRATION_METHODS.join(', ')}.`);
  need(Number.isFinite(calibration.slope) && Number.isFinite(calibration.intercept),
    'calibration slope and intercept must be finite numbers.');
  return calibration;
}

// ---- decode ---------------------------------------------------------------------------

/** Format and size from the file's first bytes, so that a huge image is refused undecoded. */
export function sniffImage(bytes) {
  const png = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
  if (bytes.length >= 24 && png.every((b, i) => bytes[i] === b)) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    return { format: 'png', width: view.getUint32(16), height: view.getUint32(20) };
  }
  if (bytes.length >= 3 && bytes[0] === 0xff && bytes[1] === 0xd8 && bytes[2] === 0xff) {
    return { format: 'jpeg', ...jpegSize(bytes) };
  }
  return null;
}

function jpegSize(bytes) {
  // Walk the marker segments to the first start-of-frame (SOF0..SOF15 except DHT/JPG/DAC).
  let i = 2;
  while (i + 9 < bytes.length) {
    if (bytes[i] !== 0xff) return {};
    const marker = bytes[i + 1];
    if (marker === 0xff) { i += 1; continue; } // fill byte
    const length = (bytes[i + 2] << 8) | bytes[i + 3];
    const isFrame = marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker);
    if (isFrame) {
      return { height: (bytes[i + 5] << 8) | bytes[i + 6], width: (bytes[i + 7] << 8) | bytes[i + 8] };
    }
    i += 2 + length;
  }
  return {}; // not found in the header bytes: the decoder will tell
}

function checkSize(name, width, height, plan) {
  if (width * height > plan.maxPixels) {
    throw new ImageError(`${name}: ${width}x${height} pixels is over the ` +
      `${Math.floor(plan.maxPixels / 1e6)} MP limit.`);
  }
  if (Math.min(width, height) < plan.minSide) {
    throw new ImageError(`${name}: ${width}x${height} pixels is too small to be a chest X-ray ` +
      `(at least ${plan.minSide} px a side).`);
  }
}

/**
 * decode + to_uint8: the file's pixels as RGBA bytes at natural size, EXIF orientation applied
 * and embedded colour profiles ignored (as Pillow does).
 * @returns {Promise<{rgba: Uint8Array|Uint8ClampedArray, width: number, height: number}>}
 */
export async function decode(file, plan) {
  const name = file.name;
  if (file.size === 0) throw new ImageError(`${name}: the file is empty.`);
  const head = new Uint8Array(await file.slice(0, HEADER_BYTES).arrayBuffer());
  const sniffed = sniffImage(head);
  if (sniffed === null) throw new ImageError(`${name}: is not a JPEG or PNG image.`);
  if (sniffed.width !== undefined) checkSize(name, sniffed.width, sniffed.height, plan);
  if (sniffed.format === 'png' && head[28] === 0) { // not interlaced: decoded here, bit-exact
    let image;
    try {
      image = await decodePng(new Uint8Array(await file.arrayBuffer()));
    } catch (error) {
      throw new ImageError(`${name}: is truncated or corrupt (${error.message}).`);
    }
    checkSize(name, image.width, image.height, plan);
    return image;
  }
  return decodeWithBrowser(file, plan);
}

async function decodeWithBrowser(file, plan) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, {
      imageOrientation: 'from-image', colorSpaceConversion: 'none', premultiplyAlpha: 'none',
    });
  } catch (error) {
    throw new ImageError(`${file.name}: is truncated or corrupt (the browser could not decode it).`);
  }
  try {
    const { width, height } = bitmap; // after EXIF orientation
    checkSize(file.name, width, height, plan);
    // Drawn 1:1 at natural size: the canvas never scales (resizing is the next step's job).
    const canvas = new OffscreenCanvas(width, height);
    const context = canvas.getContext('2d', { willReadFrequently: true, colorSpace: 'srgb' });
    context.drawImage(bitmap, 0, 0);
    return { rgba: context.getImageData(0, 0, width, height).data, width, height };
  } finally {
    bitmap.close();
  }
}

// ---- PNG, decoded as Pillow does ------------------------------------------------------------
// The browser's canvas premultiplies alpha (rounding the colour of translucent pixels) and
// reduces 16-bit samples its own way; Pillow ignores alpha, maps 16-bit grey by the to_uint8
// rule and keeps the high byte of 16-bit colour. So PNGs are decoded here (interlaced ones,
// rare, are left to the browser): chunks -> inflate -> unfilter -> samples -> RGBA.

const PNG_CHANNELS = { 0: 1, 2: 3, 3: 1, 4: 2, 6: 4 };
const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k += 1) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i += 1) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function pngChunks(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const chunks = { IDAT: [] };
  for (let pos = 8; pos + 12 <= bytes.length;) {
    const length = view.getUint32(pos);
    const type = String.fromCharCode(...bytes.subarray(pos + 4, pos + 8));
    if (pos + 12 + length > bytes.length) throw new Error(`the ${type} chunk is cut short`);
    if (crc32(bytes.subarray(pos + 4, pos + 8 + length)) !== view.getUint32(pos + 8 + length)) {
      throw new Error(`bad checksum in the ${type} chunk`);
    }
    const data = bytes.subarray(pos + 8, pos + 8 + length);
    if (type === 'IDAT') chunks.IDAT.push(data);
    else if (!(type in chunks)) chunks[type] = data;
    if (type === 'IEND') return chunks;
    pos += 12 + length;
  }
  throw new Error('no IEND chunk');
}

async function inflate(parts) {
  const stream = new Blob(parts).stream().pipeThrough(new DecompressionStream('deflate'));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** Undo the per-row filters in place; returns the rows without their filter bytes. */
function unfilter(data, height, stride, bpp) {
  const out = new Uint8Array(height * stride);
  for (let y = 0; y < height; y += 1) {
    const filter = data[y * (stride + 1)];
    const row = data.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    const at = y * stride;
    for (let x = 0; x < stride; x += 1) {
      const a = x >= bpp ? out[at + x - bpp] : 0;
      const b = y > 0 ? out[at - stride + x] : 0;
      const c = x >= bpp && y > 0 ? out[at - stride + x - bpp] : 0;
      let predictor = 0;
      if (filter === 1) predictor = a;
      else if (filter === 2) predictor = b;
      else if (filter === 3) predictor = (a + b) >> 1;
      else if (filter === 4) {
        const p = a + b - c;
        const pa = Math.abs(p - a); const pb = Math.abs(p - b); const pc = Math.abs(p - c);
        predictor = pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
      } else if (filter !== 0) throw new Error(`unknown PNG filter ${filter}`);
      out[at + x] = (row[x] + predictor) & 0xff;
    }
  }
  return out;
}

async function decodePng(bytes) {
  const chunks = pngChunks(bytes);
  const header = new DataView(chunks.IHDR.buffer, chunks.IHDR.byteOffset, 13);
  const width = header.getUint32(0);
  const height = header.getUint32(4);
  const depth = chunks.IHDR[8];
  const colourType = chunks.IHDR[9];
  const channels = PNG_CHANNELS[colourType];
  if (!channels || ![1, 2, 4, 8, 16].includes(depth)) throw new Error('unsupported PNG type');
  const stride = Math.ceil((width * channels * depth) / 8);
  const raw = await inflate(chunks.IDAT);
  if (raw.length < height * (stride + 1)) throw new Error('the image data is cut short');
  const rows = unfilter(raw, height, stride, Math.max(1, (channels * depth) >> 3));
  const sample = (y, i) => { // the i-th sample of row y, as 8 bits the way Pillow reads it
    if (depth === 16) {
      const v = (rows[y * stride + 2 * i] << 8) | rows[y * stride + 2 * i + 1];
      return colourType === 0 ? Math.floor((v * 255 + 32767) / 65535) : v >> 8;
    }
    if (depth === 8) return rows[y * stride + i];
    const bit = i * depth;
    const v = (rows[y * stride + (bit >> 3)] >> (8 - depth - (bit & 7))) & ((1 << depth) - 1);
    return colourType === 3 ? v : Math.round((v * 255) / ((1 << depth) - 1)); // grey 1/2/4-bit
  };
  const palette = chunks.PLTE;
  const rgba = new Uint8Array(width * height * 4);
  for (let y = 0, o = 0; y < height; y += 1) {
    for (let x = 0; x < width; x += 1, o += 4) {
      const s = x * channels;
      if (colourType === 3) {
        const index = 3 * sample(y, s);
        rgba[o] = palette[index]; rgba[o + 1] = palette[index + 1]; rgba[o + 2] = palette[index + 2];
      } else if (channels <= 2) { // grey, grey + alpha
        rgba[o] = rgba[o + 1] = rgba[o + 2] = sample(y, s);
      } else {
        rgba[o] = sample(y, s); rgba[o + 1] = sample(y, s + 1); rgba[o + 2] = sample(y, s + 2);
      }
      rgba[o + 3] = 255; // alpha ignored
    }
  }
  return orient({ rgba, width, height }, exifOrientation(chunks.eXIf));
}

/** The EXIF orientation tag (1..8) of an eXIf chunk (a TIFF structure); 1 when absent. */
export function exifOrientation(exif) {
  if (!exif || exif.length < 8) return 1;
  const view = new DataView(exif.buffer, exif.byteOffset, exif.byteLength);
  const little = exif[0] === 0x49; // "II" Intel, else "MM" Motorola
  const ifd = view.getUint32(4, little);
  if (ifd + 2 > exif.length) return 1;
  const count = view.getUint16(ifd, little);
  for (let k = 0; k < count && ifd + 14 + 12 * k <= exif.length; k += 1) {
    const entry = ifd + 2 + 12 * k;
    if (view.getUint16(entry, little) === 0x0112) {
      const value = view.getUint16(entry + 8, little);
      return value >= 1 && value <= 8 ? value : 1;
    }
  }
  return 1;
}

/** Apply an EXIF orientation (as Pillow's `exif_transpose`), moving whole RGBA pixels. */
export function orient(image, orientation) {
  if (orientation === 1) return image;
  const { width: w, height: h } = image;
  const swap = orientation >= 5;
  const [width, height] = swap ? [h, w] : [w, h];
  const source = new Uint32Array(image.rgba.buffer, image.rgba.byteOffset, w * h);
  const out = new Uint32Array(w * h);
  const from = [null, null,
    (x, y) => [w - 1 - x, y], (x, y) => [w - 1 - x, h - 1 - y], (x, y) => [x, h - 1 - y],
    (x, y) => [y, x], (x, y) => [y, h - 1 - x], (x, y) => [w - 1 - y, h - 1 - x],
    (x, y) => [w - 1 - y, x]][orientation];
  for (let y = 0; y < height; y += 1) {
    for (let x = 0; x < width; x += 1) {
      const [sx, sy] = from(x, y);
      out[y * width + x] = source[sy * w + sx];
    }
  }
  return { rgba: new Uint8Array(out.buffer), width, height };
}

// ---- grayscale ------------------------------------------------------------------------

/** grayscale: ITU-R BT.601 luma in 16-bit fixed point, exactly as Python; alpha ignored. */
export function luma(rgba, width, height) {
  const out = new Float32Array(width * height);
  for (let i = 0, j = 0; j < out.length; i += 4, j += 1) {
    out[j] = (19595 * rgba[i] + 38470 * rgba[i + 1] + 7471 * rgba[i + 2] + 32768) >> 16;
  }
  return out; // integers 0..255, grey images unchanged (R = G = B = v gives v)
}

// ---- resize + model_input ---------------------------------------------------------------

/** resize + model_input: a (1, H, W, 1) float32 tensor in [0, 255]; the caller disposes it. */
export function toModelInput(tf, gray, width, height, plan) {
  return tf.tidy(() => {
    const image = tf.tensor3d(gray, [height, width, 1], 'float32');
    const resized = tf.image.resizeBilinear(
      image, [plan.height, plan.width], plan.alignCorners, plan.halfPixelCenters);
    return resized.expandDims(0);
  });
}

/** Every step from file to model input: `{input, width, height}` (dispose `input`). */
export async function preprocess(tf, file, plan) {
  const { rgba, width, height } = await decode(file, plan);
  const gray = luma(rgba, width, height);
  return { input: toModelInput(tf, gray, width, height, plan), width, height };
}

// ---- calibration and decision -----------------------------------------------------------

/** sigmoid(slope * logit(clip(p)) + intercept) in float64, as docs/metadata.md writes it. */
export function calibrate(p, calibration) {
  const q = Math.min(Math.max(p, EPSILON), 1 - EPSILON);
  const z = Math.log(q / (1 - q));
  return 1 / (1 + Math.exp(-(calibration.slope * z + calibration.intercept)));
}

/** The label for a calibrated probability: class_names[1] at or above the threshold. */
export function decide(probability, metadata) {
  return probability >= metadata.threshold.value ? metadata.class_names[1] : metadata.class_names[0];
}
