// File -> model input, following the `preprocessing` steps of the model's metadata.json
// (docs/metadata.md) exactly as pneumoscan/preprocess.py does in Python:
//   decode (JPEG/PNG, EXIF orientation by the rule below, no colour conversion, size limits)
//   -> to_uint8 -> grayscale (integer BT.601 luma) -> resize (bilinear, half-pixel centres)
//   -> model_input (NHWC float32 in [0, 255]).
// Beside the input, what the out-of-distribution score needs from before the luma step: the
// colourfulness of the RGB and the image's aspect (as preprocess.colourfulness and Decoded.aspect).
// Calibration and the decision are decision.js's.
// JPEGs are decoded by the browser; PNGs (interlaced or not) by the code below, because the
// canvas would round translucent pixels and 16-bit samples differently from Pillow.
//
// Orientation is read from the file's bytes here, as Python reads it (preprocess.py): the
// Orientation tag of IFD 0 of the first APP1 Exif segment of a JPEG or the first eXIf chunk
// of a PNG; XMP and PNG text chunks are ignored. The browser is given the JPEG without its
// APP1 segments, so that it cannot apply an orientation of its own.
//
// DICOM files (`*.dcm`, `*.dicom`, or the DICOM preamble) go to dicom.js, which follows the decode
// step's `dicom` contract and hands back 8-bit pixels like a decoded image's, without orientation.
//
// `readPlan` checks every step against what this file knows how to do, so a model whose
// metadata asks for anything else is refused instead of being fed a different input.
import { decodeDicom, dicomContract, isDicom } from './dicom.js';
import { ImageError, MetadataError, need } from './errors.js';

const SCHEMA_VERSION = 1;
const LUMA_FORMULA = '(19595*R + 38470*G + 7471*B + 32768) >> 16';
const STEP_ORDER = ['decode', 'to_uint8', 'grayscale', 'resize', 'model_input'];
const COLOUR_SAMPLE_SIDE = 256; // preprocess.COLOUR_SAMPLE_SIDE: sample every s-th row, column
const HEADER_BYTES = 64 * 1024; // enough to find a JPEG's frame header after EXIF/ICC blocks
// Where the orientation comes from (decode.orientation_sources); a bundle written before the
// key existed means the same.
const ORIENTATION_SOURCES = ['jpeg-app1-exif', 'png-exif'];
const ORIENTATION_TAG = 0x0112;
const EXIF_HEADER = [0x45, 0x78, 0x69, 0x66, 0, 0]; // "Exif\0\0"
const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

export { ImageError, MetadataError };

/**
 * Check metadata.json and turn its steps into the parameters `preprocess` uses.
 * @returns {{maxPixels: number, minSide: number, height: number, width: number,
 *            alignCorners: boolean, halfPixelCenters: boolean, dicom: object|null}}
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
  const sources = decode.orientation_sources === undefined ? ORIENTATION_SOURCES : decode.orientation_sources;
  need(Array.isArray(sources) && sources.length === ORIENTATION_SOURCES.length &&
    ORIENTATION_SOURCES.every((source) => sources.includes(source)),
  `decode.orientation_sources must be ${ORIENTATION_SOURCES.join(' and ')}; this page reads no others.`);
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
  return {
    maxPixels: decode.max_pixels,
    minSide: decode.min_side,
    height: input.height,
    width: input.width,
    alignCorners: resize.align_corners,
    halfPixelCenters: resize.half_pixel_centers,
    dicom: dicomContract(decode), // the DICOM contract, or null when DICOM is not a format
  };
}

// ---- decode ---------------------------------------------------------------------------

// Other formats Pillow names in its refusal ("is a GIF image; ..."): their first bytes.
const ANY = -1;
const BMP_HEADER_SIZES = [12, 40, 52, 56, 64, 108, 124]; // the DIB headers Pillow reads
const OTHER_FORMATS = [
  ['GIF', [0x47, 0x49, 0x46, 0x38, 0x37, 0x61]], ['GIF', [0x47, 0x49, 0x46, 0x38, 0x39, 0x61]],
  ['TIFF', [0x49, 0x49, 0x2a, 0x00]], ['TIFF', [0x4d, 0x4d, 0x00, 0x2a]],
  ['WEBP', [0x52, 0x49, 0x46, 0x46, ANY, ANY, ANY, ANY, 0x57, 0x45, 0x42, 0x50]],
  ...BMP_HEADER_SIZES.map((size) => ['BMP', [0x42, 0x4d, ...Array(12).fill(ANY), size, 0, 0, 0]]),
];
const startsWith = (bytes, signature) => signature.every((b, i) => b === ANY || bytes[i] === b);

/**
 * Format and size from the file's first bytes, so that a huge image is refused undecoded (as
 * file_headers.header_size does); `format` is 'png', 'jpeg' or the name of another format.
 */
export function sniffImage(bytes) {
  if (bytes.length >= 24 && startsWith(bytes, PNG_SIGNATURE)) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    return { format: 'png', width: view.getUint32(16), height: view.getUint32(20) };
  }
  if (bytes.length >= 3 && bytes[0] === 0xff && bytes[1] === 0xd8 && bytes[2] === 0xff) {
    return { format: 'jpeg', ...jpegSize(bytes) };
  }
  const other = OTHER_FORMATS.find(([, signature]) => startsWith(bytes, signature));
  return other ? { format: other[0] } : null;
}

function jpegSize(bytes) {
  // The first start-of-frame segment (SOF0..SOF15 except DHT/JPG/DAC) holds the size.
  for (const { marker, start } of jpegSegments(bytes)) {
    const isFrame = marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker);
    if (isFrame && start + 9 <= bytes.length) {
      const height = (bytes[start + 5] << 8) | bytes[start + 6];
      return { height, width: (bytes[start + 7] << 8) | bytes[start + 8] };
    }
  }
  return {}; // not found in these bytes: the decoder will tell
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
 * decode + to_uint8: the file's pixels as RGBA bytes, EXIF orientation applied by the rule
 * above and embedded colour profiles ignored (as Pillow does); a DICOM file's windowed pixels.
 * @param decodeJpeg (blob, name, plan) -> raw RGBA at natural size: the browser's decoder;
 *   the Node tests (tests/js/preprocess.mjs), which have none, pass Pillow's pixels instead.
 * @returns {Promise<{rgba: Uint8Array|Uint8ClampedArray, width: number, height: number,
 *   warnings: string[]}>} `warnings`: what a DICOM header says against the image (phrases).
 */
export async function decode(file, plan, decodeJpeg = decodeWithBrowser) {
  const name = file.name;
  if (file.size === 0) throw new ImageError(`${name}: the file is empty.`);
  const head = new Uint8Array(await file.slice(0, HEADER_BYTES).arrayBuffer());
  if (isDicom(name, head)) {
    const jpegFrame = (frame) => decodeJpeg(new Blob([withoutApp1(frame)], { type: 'image/jpeg' }), name, plan);
    return decodeDicom(new Uint8Array(await file.arrayBuffer()), name, plan, { checkSize, decodeJpeg: jpegFrame });
  }
  const sniffed = sniffImage(head);
  if (sniffed === null) throw new ImageError(`${name}: is not a JPEG, PNG or DICOM image.`);
  if (sniffed.format !== 'png' && sniffed.format !== 'jpeg') {
    throw new ImageError(`${name}: is a ${sniffed.format} image; only JPEG and PNG are supported.`);
  }
  if (sniffed.width !== undefined) checkSize(name, sniffed.width, sniffed.height, plan);
  const bytes = new Uint8Array(await file.arrayBuffer());
  let image;
  if (sniffed.format === 'png') {
    try {
      image = await decodePng(bytes);
    } catch (error) {
      // The decoder's words, unless they quote the file's bytes (a damaged chunk's type).
      const plain = /^[ -~]{1,200}$/.test(error.message) ? error.message : 'its data cannot be decoded';
      throw new ImageError(`${name}: is truncated or corrupt (${plain}).`);
    }
  } else {
    const size = jpegSize(bytes); // the frame header may lie past HEADER_BYTES
    if (size.width !== undefined) checkSize(name, size.width, size.height, plan);
    image = await decodeJpeg(new Blob([withoutApp1(bytes)], { type: 'image/jpeg' }), name, plan);
  }
  checkSize(name, image.width, image.height, plan);
  return { ...orient(image, exifOrientation(exifBlock(bytes))), warnings: [] };
}

async function decodeWithBrowser(blob, name, plan) {
  let bitmap;
  try {
    // No APP1 segment is left, so 'from-image' finds no orientation to apply.
    bitmap = await createImageBitmap(blob, {
      imageOrientation: 'from-image', colorSpaceConversion: 'none', premultiplyAlpha: 'none',
    });
  } catch (error) {
    throw new ImageError(`${name}: is truncated or corrupt (the browser could not decode it).`);
  }
  try {
    const { width, height } = bitmap;
    checkSize(name, width, height, plan);
    // Drawn 1:1 at natural size: the canvas never scales (resizing is the next step's job).
    const canvas = new OffscreenCanvas(width, height);
    const context = canvas.getContext('2d', { willReadFrequently: true, colorSpace: 'srgb' });
    context.drawImage(bitmap, 0, 0);
    return { rgba: context.getImageData(0, 0, width, height).data, width, height };
  } finally {
    bitmap.close();
  }
}

// ---- JPEG segments -------------------------------------------------------------------------

/** The marker segments before a JPEG's scan data: [{marker, start, end}] (end exclusive). */
function jpegSegments(bytes) {
  const segments = [];
  let i = 2;
  while (i + 4 <= bytes.length && bytes[i] === 0xff) {
    const marker = bytes[i + 1];
    if (marker === 0xff) { i += 1; continue; } // fill byte
    if (marker === 0xd9 || marker === 0xda) break; // end of image, start of scan
    const end = i + 2 + ((bytes[i + 2] << 8) | bytes[i + 3]);
    segments.push({ marker, start: i, end });
    i = end;
  }
  return segments;
}

/** The JPEG without its APP1 segments (EXIF, XMP): the same pixels, nothing to orient by. */
export function withoutApp1(bytes) {
  const app1 = jpegSegments(bytes).filter((segment) => segment.marker === 0xe1);
  if (app1.length === 0) return bytes;
  const parts = [];
  let from = 0;
  for (const segment of app1) {
    parts.push(bytes.subarray(from, segment.start));
    from = Math.min(segment.end, bytes.length);
  }
  parts.push(bytes.subarray(from));
  const out = new Uint8Array(parts.reduce((total, part) => total + part.length, 0));
  parts.reduce((at, part) => { out.set(part, at); return at + part.length; }, 0);
  return out;
}

/**
 * The TIFF structure holding a file's EXIF, by the orientation rule: the first APP1 Exif
 * segment of a JPEG, the first eXIf chunk of a PNG; null when there is none.
 */
export function exifBlock(bytes) {
  if (bytes[0] === 0xff && bytes[1] === 0xd8) {
    for (const { marker, start, end } of jpegSegments(bytes)) {
      if (marker === 0xe1 && startsWith(bytes.subarray(start + 4), EXIF_HEADER)) {
        return bytes.subarray(start + 10, end);
      }
    }
    return null;
  }
  if (!startsWith(bytes, PNG_SIGNATURE)) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let pos = 8; pos + 8 <= bytes.length;) {
    const length = view.getUint32(pos);
    const type = String.fromCharCode(...bytes.subarray(pos + 4, pos + 8));
    if (type === 'eXIf') return bytes.subarray(pos + 8, pos + 8 + length);
    if (type === 'IEND') return null;
    pos += 12 + length;
  }
  return null;
}

// ---- PNG, decoded as Pillow does ------------------------------------------------------------
// The browser's canvas premultiplies alpha (rounding the colour of translucent pixels) and
// reduces 16-bit samples its own way; Pillow ignores alpha, maps 16-bit grey by the to_uint8
// rule and keeps the high byte of 16-bit colour. So PNGs are decoded here, interlaced (Adam7)
// ones too: chunks -> inflate -> per pass: unfilter -> samples -> RGBA -> its place.

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
  for (let pos = 8; pos + 8 <= bytes.length || chunks.IDAT.length === 0;) {
    if (pos + 8 > bytes.length) throw new Error('no image data');
    const length = view.getUint32(pos);
    const type = String.fromCharCode(...bytes.subarray(pos + 4, pos + 8));
    // After the image data, an IEND header ends the file even if its checksum is cut (as Pillow).
    if (type === 'IEND' && chunks.IDAT.length > 0) return chunks;
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
  return chunks; // the file ends after the image data without IEND: Pillow reads it too
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

// Adam7: [first column, first row, column step, row step] of each of the seven passes.
const ADAM7 = [[0, 0, 8, 8], [4, 0, 8, 8], [0, 4, 4, 8], [2, 0, 4, 4], [0, 2, 2, 4], [1, 0, 2, 2],
  [0, 1, 1, 2]];

async function decodePng(bytes) {
  const chunks = pngChunks(bytes);
  if (!chunks.IHDR || chunks.IHDR.length !== 13) throw new Error('no valid IHDR chunk');
  const header = new DataView(chunks.IHDR.buffer, chunks.IHDR.byteOffset, 13);
  const width = header.getUint32(0);
  const height = header.getUint32(4);
  const [depth, colourType, , , interlace] = chunks.IHDR.subarray(8);
  const format = { depth, colourType, channels: PNG_CHANNELS[colourType], palette: chunks.PLTE };
  if (!format.channels || ![1, 2, 4, 8, 16].includes(depth) || interlace > 1) {
    throw new Error('unsupported PNG type');
  }
  if (colourType === 3 && !format.palette) throw new Error('no PLTE chunk');
  const raw = await inflate(chunks.IDAT);
  const rgba = interlace ? new Uint8Array(width * height * 4) : null; // the passes land here
  const pixels = interlace ? new Uint32Array(rgba.buffer) : null;
  let offset = 0;
  for (const [x0, y0, dx, dy] of interlace ? ADAM7 : [[0, 0, 1, 1]]) {
    const w = Math.ceil((width - x0) / dx);
    const h = Math.ceil((height - y0) / dy);
    if (w <= 0 || h <= 0) continue; // a pass with no pixels has no bytes either
    const stride = Math.ceil((w * format.channels * depth) / 8);
    if (raw.length < offset + h * (stride + 1)) throw new Error('the image data is cut short');
    const rows = unfilter(raw.subarray(offset), h, stride, Math.max(1, (format.channels * depth) >> 3));
    offset += h * (stride + 1);
    const pass = new Uint32Array(passToRgba(rows, w, h, stride, format).buffer);
    if (!interlace) return { rgba: new Uint8Array(pass.buffer), width, height };
    for (let y = 0; y < h; y += 1) {
      for (let x = 0; x < w; x += 1) pixels[(y0 + y * dy) * width + x0 + x * dx] = pass[y * w + x];
    }
  }
  return { rgba, width, height };
}

/** The unfiltered rows of one pass (w x h pixels) as RGBA bytes, samples read as Pillow does. */
function passToRgba(rows, width, height, stride, { depth, colourType, channels, palette }) {
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
  return rgba;
}

/**
 * The Orientation tag (1..8) of IFD 0 of an EXIF TIFF structure; 1 when it is absent, not one
 * SHORT, out of range, or the structure is malformed. Mirrors preprocess.exif_orientation.
 */
export function exifOrientation(exif) {
  if (!exif || exif.length < 8) return 1;
  const little = exif[0] === 0x49 && exif[1] === 0x49 && exif[2] === 0x2a && exif[3] === 0;
  const big = exif[0] === 0x4d && exif[1] === 0x4d && exif[2] === 0 && exif[3] === 0x2a;
  if (!little && !big) return 1;
  const view = new DataView(exif.buffer, exif.byteOffset, exif.byteLength);
  const ifd = view.getUint32(4, little);
  if (ifd + 2 > exif.length) return 1;
  const count = view.getUint16(ifd, little);
  for (let k = 0; k < count && ifd + 14 + 12 * k <= exif.length; k += 1) {
    const entry = ifd + 2 + 12 * k;
    if (view.getUint16(entry, little) === ORIENTATION_TAG) {
      const value = view.getUint16(entry + 8, little);
      const singleShort = view.getUint16(entry + 2, little) === 3 && view.getUint32(entry + 4, little) === 1;
      return singleShort && value >= 1 && value <= 8 ? value : 1;
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

/**
 * Every step from file to model input: `{input, width, height, gray, warnings, colourfulness}`
 * (dispose `input`); `gray` is the oriented luma the input was resized from, what the page
 * shows; `colourfulness` that of the RGB before luma, for the out-of-distribution score.
 */
export async function preprocess(tf, file, plan) {
  const { rgba, width, height, warnings } = await decode(file, plan);
  const gray = luma(rgba, width, height);
  return {
    input: toModelInput(tf, gray, width, height, plan), width, height, gray, warnings,
    colourfulness: colourfulness(rgba, width, height),
  };
}

// ---- the out-of-distribution checks ------------------------------------------------------

/**
 * Hasler and Süsstrunk's colourfulness of RGBA bytes (alpha ignored), on the pixels of every
 * s-th row and column from the first, s = ceil(max(width, height) / 256); 0 for grey pixels.
 */
export function colourfulness(rgba, width, height) {
  const step = Math.ceil(Math.max(width, height) / COLOUR_SAMPLE_SIDE);
  let grey = true;
  for (let y = 0; y < height && grey; y += step) {
    for (let x = 0, o = 4 * y * width; x < width; x += step, o += 4 * step) {
      if (rgba[o] !== rgba[o + 1] || rgba[o + 1] !== rgba[o + 2]) {
        grey = false;
        break;
      }
    }
  }
  if (grey) return 0;
  // Two passes (mean, then squared deviations), as NumPy's std.
  let n = 0;
  let sumRg = 0;
  let sumYb = 0;
  for (let y = 0; y < height; y += step) {
    for (let x = 0, o = 4 * y * width; x < width; x += step, o += 4 * step) {
      sumRg += rgba[o] - rgba[o + 1];
      sumYb += (rgba[o] + rgba[o + 1]) / 2 - rgba[o + 2];
      n += 1;
    }
  }
  const meanRg = sumRg / n;
  const meanYb = sumYb / n;
  let varRg = 0;
  let varYb = 0;
  for (let y = 0; y < height; y += step) {
    for (let x = 0, o = 4 * y * width; x < width; x += step, o += 4 * step) {
      varRg += (rgba[o] - rgba[o + 1] - meanRg) ** 2;
      varYb += ((rgba[o] + rgba[o + 1]) / 2 - rgba[o + 2] - meanYb) ** 2;
    }
  }
  return Math.sqrt(varRg / n + varYb / n) + 0.3 * Math.sqrt(meanRg ** 2 + meanYb ** 2);
}

/** The longer side over the shorter (preprocess.Decoded.aspect). */
export function aspect(width, height) {
  return Math.max(width, height) / Math.min(width, height);
}

