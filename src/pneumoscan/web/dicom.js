// DICOM files in the page: the decode step's `dicom` contract of metadata.json
// (docs/metadata.md), followed as pneumoscan/dicom.py follows it in Python.
//
// dicom-parser (served from /vendor/, a global `dicomParser`) reads the header and finds the
// pixel data; the page decodes it: uncompressed (little or big endian), RLE Lossless (PS3.5
// Annex G, `decodeRle` below) and JPEG baseline (the frame's JPEG bytes go to the browser's
// decoder, as JPEG files do). Then the window of dicom.py: modality LUT, the VOI LUT sequence,
// else the first window, else the stored range, to 0..255 rounded half up, MONOCHROME1
// inverted; colour keeps the high byte of wider samples and goes to luma like any colour image.
// Multi-frame images, objects without pixel data and other transfer syntaxes get one sentence.
//
// Nothing about the patient is read: the attributes below are the only ones this file asks
// dicom-parser for, and no message quotes the header beyond the modality, view and body part.
import { ImageError, need } from './errors.js';

const PREAMBLE = 128; // bytes before the "DICM" prefix of a DICOM Part 10 file
const SUFFIXES = ['.dcm', '.dicom'];
const IMPLICIT_LITTLE = '1.2.840.10008.1.2';
const BIG_ENDIAN = '1.2.840.10008.1.2.2';
const RLE = '1.2.840.10008.1.2.5';
const JPEG_BASELINE = '1.2.840.10008.1.2.4.50';
// The rule texts of pneumoscan/dicom.py and preprocess.py, word for word: a bundle whose
// contract says anything else is refused.
export const WINDOW_RULE = 'modality LUT (rescale slope, intercept); then the VOI LUT sequence, ' +
  'else the first window (PS3.3 C.11.2.1.2.1 LINEAR, LINEAR_EXACT or SIGMOID), else the range of ' +
  'the stored bits, to 0..255 rounded half up; MONOCHROME1 inverted; colour to RGB, then luma';
export const FILES_RULE = "*.dcm, *.dicom, or any file whose bytes 128-131 are 'DICM'";
// What this file decodes (uid -> name), the most a bundle's `transfer_syntaxes` may list.
export const TRANSFER_SYNTAXES = {
  [IMPLICIT_LITTLE]: 'Implicit VR Little Endian',
  '1.2.840.10008.1.2.1': 'Explicit VR Little Endian',
  [BIG_ENDIAN]: 'Explicit VR Big Endian',
  [RLE]: 'RLE Lossless',
  [JPEG_BASELINE]: 'JPEG Baseline (Process 1)',
};
// Names of the syntaxes a refusal may have to name.
const OTHER_SYNTAXES = {
  '1.2.840.10008.1.2.1.99': 'Deflated Explicit VR Little Endian',
  '1.2.840.10008.1.2.4.51': 'JPEG Extended (Process 2 and 4)',
  '1.2.840.10008.1.2.4.57': 'JPEG Lossless, Non-Hierarchical (Process 14)',
  '1.2.840.10008.1.2.4.70': 'JPEG Lossless, Non-Hierarchical, First-Order Prediction',
  '1.2.840.10008.1.2.4.80': 'JPEG-LS Lossless Image Compression',
  '1.2.840.10008.1.2.4.81': 'JPEG-LS Lossy (Near-Lossless) Image Compression',
  '1.2.840.10008.1.2.4.90': 'JPEG 2000 Image Compression (Lossless Only)',
  '1.2.840.10008.1.2.4.91': 'JPEG 2000 Image Compression',
  '1.2.840.10008.1.2.4.201': 'High-Throughput JPEG 2000 Image Compression (Lossless Only)',
  '1.2.840.10008.1.2.4.203': 'High-Throughput JPEG 2000 Image Compression',
};
// The views and body parts of pneumoscan/dicom.py that a frontal chest X-ray is not.
const LATERAL_VIEWS = ['LL', 'RL', 'LATERAL', 'LAT', 'LLD', 'RLD', 'XCL'];
const CHEST_PARTS = ['CHEST', 'THORAX', 'LUNG', 'CHEST_TO_PELVIS'];
const TAG = {
  transferSyntax: 'x00020010', modality: 'x00080060', sopClass: 'x00080016',
  bodyPart: 'x00180015', view: 'x00185101', samples: 'x00280002', photometric: 'x00280004',
  planar: 'x00280006', frames: 'x00280008', rows: 'x00280010', columns: 'x00280011',
  bitsAllocated: 'x00280100', bitsStored: 'x00280101', signed: 'x00280103',
  windowCentre: 'x00281050', windowWidth: 'x00281051', intercept: 'x00281052', slope: 'x00281053',
  voiFunction: 'x00281056', modalityLut: 'x00283000', voiLut: 'x00283010', lutDescriptor: 'x00283002', lutData: 'x00283006',
  pixelData: 'x7fe00010',
};

// The value representations the attributes above may have (PS3.6), and their value sizes: an
// explicit VR file that says otherwise is damaged (pydicom refuses to read such a value too).
const US = { US: 2 };
const VALUE_REPRESENTATIONS = {
  transferSyntax: { UI: 1 }, modality: { CS: 1 }, sopClass: { UI: 1 }, bodyPart: { CS: 1 }, view: { CS: 1 },
  samples: US, photometric: { CS: 1 }, planar: US, frames: { IS: 1 }, rows: US, columns: US,
  bitsAllocated: US, bitsStored: US, signed: US, windowCentre: { DS: 1 }, windowWidth: { DS: 1 },
  intercept: { DS: 1 }, slope: { DS: 1 }, voiFunction: { CS: 1 }, modalityLut: { SQ: 1 }, voiLut: { SQ: 1 },
  lutDescriptor: { US: 2, SS: 2 }, lutData: { US: 2, OW: 2 }, pixelData: { OB: 1, OW: 1 },
};

/** Throws an ImageError when an attribute this page reads has a VR or a length it cannot have. */
function checkValueRepresentations(ds, name) {
  const sets = [ds];
  for (const key of ['voiLut', 'modalityLut']) {
    const element = ds.elements[TAG[key]];
    if (element && element.items) sets.push(...element.items.map((item) => item.dataSet));
  }
  for (const set of sets) {
    for (const [key, allowed] of Object.entries(VALUE_REPRESENTATIONS)) {
      const element = set.elements[TAG[key]];
      if (!element || element.vr === undefined) continue; // absent, or implicit VR: nothing to check
      const size = allowed[element.vr];
      const undefinedLength = element.length === 0xffffffff || element.hadUndefinedLength;
      if (size === undefined || (!undefinedLength && element.length % size !== 0)) {
        throw new ImageError(`${name}: is not a readable DICOM file (an attribute's value representation ` +
          'or length is damaged).');
      }
    }
  }
}

/**
 * The decode step's DICOM contract as this page follows it: `{syntaxes}` (uid -> name, what
 * both Python and the page decode), or null when the bundle's `formats` leave DICOM out.
 * A decode step without `formats` or `dicom` (a bundle written before DICOM) means the rule
 * above. Anything this file cannot follow throws a MetadataError.
 */
export function dicomContract(decode) {
  const formats = decode.formats === undefined ? ['jpeg', 'png', 'dicom'] : decode.formats;
  need(Array.isArray(formats) && formats.every((f) => ['jpeg', 'png', 'dicom'].includes(f)),
    `decode.formats ${JSON.stringify(formats)} names a format this page does not read ` +
    '(it reads jpeg, png and dicom).');
  if (!formats.includes('dicom')) return null;
  const contract = decode.dicom === undefined ? {} : decode.dicom;
  need(contract.window === undefined || contract.window === WINDOW_RULE,
    `decode.dicom.window must be "${WINDOW_RULE}"; this page windows no other way.`);
  need(contract.files === undefined || contract.files === FILES_RULE,
    `decode.dicom.files must be "${FILES_RULE}".`);
  const syntaxes = contract.transfer_syntaxes === undefined ? TRANSFER_SYNTAXES : contract.transfer_syntaxes;
  need(syntaxes && typeof syntaxes === 'object', 'decode.dicom.transfer_syntaxes must be an object.');
  const unknown = Object.keys(syntaxes).filter((uid) => !(uid in TRANSFER_SYNTAXES));
  need(unknown.length === 0, `decode.dicom.transfer_syntaxes lists ${unknown[0]} ` +
    `(${syntaxes[unknown[0]]}), which this page cannot decode.`);
  return { syntaxes: Object.fromEntries(Object.keys(syntaxes).map((uid) => [uid, TRANSFER_SYNTAXES[uid]])) };
}

/** A `.dcm`/`.dicom` file, or any file whose bytes 128-131 are `DICM` (`head`: its first bytes). */
export function isDicom(name, head) {
  const lower = name.toLowerCase();
  return SUFFIXES.some((suffix) => lower.endsWith(suffix)) || hasPreamble(head);
}

function hasPreamble(bytes) {
  return bytes.length >= PREAMBLE + 4 && String.fromCharCode(...bytes.subarray(PREAMBLE, PREAMBLE + 4)) === 'DICM';
}

// ---- the file -> its single frame's 8-bit pixels ---------------------------------------------

/**
 * A DICOM file's pixels as 8-bit RGBA (grey: R = G = B, the windowed value), and the phrases
 * of the warnings its header raises.
 * @param checkSize (name, width, height, plan) throws an ImageError for a size out of bounds.
 * @param decodeJpeg (bytes, name, plan) -> {rgba, width, height}: a JPEG's pixels, undecoded
 *   EXIF orientation (the decoder of preprocess.js).
 * @returns {Promise<{rgba: Uint8Array, width: number, height: number, warnings: string[]}>}
 * @throws ImageError: one sentence, without patient data.
 */
export async function decodeDicom(bytes, name, plan, { checkSize, decodeJpeg }) {
  try {
    return await decodeOrRefuse(bytes, name, plan, { checkSize, decodeJpeg });
  } catch (error) {
    if (error instanceof ImageError) throw error;
    // A damaged file can make dicom-parser or the code below throw anything (a RangeError, a
    // TypeError): it is one sentence, quoting none of it (it could hold header values).
    throw new ImageError(`${name}: is not a readable DICOM file (its data could not be decoded).`);
  }
}

async function decodeOrRefuse(bytes, name, plan, { checkSize, decodeJpeg }) {
  if (plan.dicom === null) {
    throw new ImageError(`${name}: is a DICOM file, and this model's metadata.json does not list DICOM among its formats.`);
  }
  const { ds, bare } = parse(bytes, name, plan.dicom.syntaxes);
  if (!hasPreamble(bytes) && !ds.elements[TAG.sopClass] && !ds.elements[TAG.pixelData]) {
    throw new ImageError(`${name}: is not a readable DICOM file (no DICOM preamble, no known attributes).`);
  }
  if (bare) { // pydicom cannot decode such pixels either: nothing says how they are encoded
    throw new ImageError(`${name}: is not a readable DICOM file (it has no file meta information to ` +
      'give its transfer syntax).');
  }
  checkValueRepresentations(ds, name);
  const syntax = ds.string(TAG.transferSyntax);
  const pixelData = ds.elements[TAG.pixelData];
  if (!pixelData) {
    const kind = codeString(ds.string(TAG.modality)) || 'object';
    throw new ImageError(`${name}: is a DICOM ${kind} without pixel data (a report or plan, not an image).`);
  }
  const frames = ds.intString(TAG.frames) || 1;
  if (frames > 1) {
    throw new ImageError(`${name}: is a multi-frame DICOM image (${frames} frames); give one frame a file.`);
  }
  if (!(syntax in plan.dicom.syntaxes)) throw new ImageError(unreadableSyntax(name, syntax));
  const layout = readLayout(ds, name, syntax);
  if (ds.elements[TAG.modalityLut]) {
    throw new ImageError(`${name}: its modality LUT is a table (a Modality LUT Sequence), which this page ` +
      'does not apply; `pneumoscan predict` does.');
  }
  checkSize(name, layout.columns, layout.rows, plan);
  const warnings = headerWarnings(ds);
  if (syntax === JPEG_BASELINE) {
    const image = await decodeJpeg(encapsulatedFrame(ds, pixelData, name), name, plan);
    if (image.width !== layout.columns || image.height !== layout.rows) {
      throw new ImageError(`${name}: its JPEG frame is ${image.width}x${image.height} pixels, the header says ` +
        `${layout.columns}x${layout.rows}.`);
    }
    return { rgba: fromDecodedJpeg(image.rgba, ds, layout), width: layout.columns, height: layout.rows, warnings };
  }
  const native = nativeBytes(ds, pixelData, syntax, layout, name);
  const samples = readSamples(native, layout, syntax === BIG_ENDIAN);
  const rgba = layout.samples === 3 ? colourToRgba(samples, layout) : greyToRgba(window8(samples, ds, layout), layout.photometric);
  return { rgba, width: layout.columns, height: layout.rows, warnings };
}

/**
 * The data set, and whether it came without a file meta group (so without a transfer syntax).
 * A data set the parser cannot read in a syntax this page does not decode (deflated: the
 * browser build has no inflater) is refused by its syntax, named from the file meta group.
 */
function parse(bytes, name, syntaxes) {
  // A file named .dcm without the preamble is read as pydicom's `force` reads it: from its file
  // meta group if it starts with one, else as a bare data set (implicit VR little endian).
  let data = bytes;
  let bare = false;
  if (!hasPreamble(bytes)) {
    if (bytes[0] === 0x02 && bytes[1] === 0x00) {
      data = new Uint8Array(PREAMBLE + 4 + bytes.length);
      data.set([0x44, 0x49, 0x43, 0x4d], PREAMBLE); // "DICM"
      data.set(bytes, PREAMBLE + 4);
    } else {
      bare = true;
    }
  }
  try {
    const ds = globalThis.dicomParser.parseDicom(data, {
      TransferSyntaxUID: bare ? IMPLICIT_LITTLE : undefined,
      vrCallback: (tag) => (tag === TAG.voiLut || tag === TAG.modalityLut ? 'SQ' : undefined),
    });
    return { ds, bare };
  } catch (error) {
    // dicom-parser throws strings, Errors and {exception, dataSet}; none of it is shown (it
    // could hold header values), only that the file could not be parsed.
    const syntax = bare ? null : metaSyntax(data);
    if (syntax && !(syntax in syntaxes)) throw new ImageError(unreadableSyntax(name, syntax));
    throw new ImageError(`${name}: is not a readable DICOM file (its header could not be parsed).`);
  }
}

function metaSyntax(data) {
  try {
    return globalThis.dicomParser.readPart10Header(data).string(TAG.transferSyntax) || null;
  } catch (error) {
    return null;
  }
}

/** The one frame of encapsulated pixel data (JPEG, RLE): its fragments joined. */
function encapsulatedFrame(ds, element, name) {
  if (!element.encapsulatedPixelData) {
    throw new ImageError(`${name}: its pixel data is not encapsulated, as its transfer syntax says it is.`);
  }
  try {
    return globalThis.dicomParser.readEncapsulatedPixelDataFromFragments(ds, element, 0, element.fragments.length);
  } catch (error) {
    throw new ImageError(`${name}: its pixel data is corrupt (its fragments cannot be read).`);
  }
}

function unreadableSyntax(name, uid) {
  const syntax = OTHER_SYNTAXES[uid] || TRANSFER_SYNTAXES[uid] || 'an unknown transfer syntax';
  const quoted = /^[0-9.]{1,64}$/.test(uid) ? uid : 'an unreadable UID'; // never a damaged header's bytes
  return `${name}: its pixel data is ${syntax} (${quoted}), which this page cannot decode; try ` +
    '`pneumoscan predict`, which also reads JPEG extended, JPEG 2000 and deflated files.';
}

function readLayout(ds, name, syntax) {
  const layout = {
    rows: ds.uint16(TAG.rows), columns: ds.uint16(TAG.columns),
    samples: ds.uint16(TAG.samples) || 1,
    photometric: (ds.string(TAG.photometric) || 'MONOCHROME2').toUpperCase(),
    bitsAllocated: ds.uint16(TAG.bitsAllocated), planar: ds.uint16(TAG.planar) || 0,
    signed: ds.uint16(TAG.signed) === 1, bigEndian: syntax === BIG_ENDIAN, name,
  };
  layout.bitsStored = ds.uint16(TAG.bitsStored) || layout.bitsAllocated;
  const grey = layout.samples === 1 && ['MONOCHROME1', 'MONOCHROME2'].includes(layout.photometric);
  // Colour JPEG frames may be YBR: the browser's decoder hands them over as RGB.
  const colour = layout.samples === 3 &&
    (layout.photometric === 'RGB' || (syntax === JPEG_BASELINE && layout.photometric.startsWith('YBR_FULL')));
  if (!(grey || colour) || ![8, 16].includes(layout.bitsAllocated) || !layout.rows || !layout.columns ||
    layout.bitsStored > layout.bitsAllocated) {
    throw new ImageError(`${name}: has a pixel layout this page does not read (${codeString(layout.photometric)}, ` +
      `${layout.samples} samples, ${layout.bitsAllocated} bits); \`pneumoscan predict\` may.`);
  }
  return layout;
}

/** Uncompressed or RLE pixel data as the native byte layout: samples interleaved (RLE) or as stored. */
function nativeBytes(ds, element, syntax, layout, name) {
  const bytesPerSample = layout.bitsAllocated / 8;
  const length = layout.rows * layout.columns * layout.samples * bytesPerSample;
  if (syntax === RLE) {
    const frame = encapsulatedFrame(ds, element, name);
    try {
      return decodeRle(frame, layout.rows * layout.columns, layout.samples, bytesPerSample);
    } catch (error) {
      throw new ImageError(`${name}: its RLE Lossless pixel data is corrupt (${error.message}).`);
    }
  }
  if (element.encapsulatedPixelData) {
    throw new ImageError(`${name}: its pixel data is compressed, which its transfer syntax does not allow.`);
  }
  if (element.dataOffset + length > ds.byteArray.length || element.length < length) {
    throw new ImageError(`${name}: its pixel data is cut short (${element.length} of ${length} bytes).`);
  }
  let data = ds.byteArray.subarray(element.dataOffset, element.dataOffset + length);
  if (syntax === BIG_ENDIAN && bytesPerSample === 1 && element.vr === 'OW') {
    // 8-bit samples in 16-bit words of a big endian file: each pair of bytes swapped (pydicom's
    // `be_swap_ow`); an odd length's padding byte comes first in its word.
    const words = ds.byteArray.subarray(element.dataOffset, element.dataOffset + length + (length % 2));
    const swapped = new Uint8Array(words.length);
    for (let i = 0; i + 1 < words.length; i += 2) { swapped[i] = words[i + 1]; swapped[i + 1] = words[i]; }
    data = swapped.subarray(0, length);
  }
  return layout.samples === 3 && layout.planar === 1
    ? interleave(data, layout.rows * layout.columns, bytesPerSample) : data;
}

/** Colour planes (all R, then all G, then all B) -> samples interleaved, each `width` bytes. */
function interleave(planes, pixels, width) {
  const out = new Uint8Array(planes.length);
  for (let i = 0; i < pixels; i += 1) {
    for (let s = 0; s < 3; s += 1) {
      for (let k = 0; k < width; k += 1) out[(3 * i + s) * width + k] = planes[(s * pixels + i) * width + k];
    }
  }
  return out;
}

/**
 * RLE Lossless (DICOM PS3.5 Annex G): a 64-byte header (the number of segments, then up to 15
 * offsets, uint32 little endian) and one PackBits segment per byte of each sample, most
 * significant byte first: segment s * bytesPerSample + k holds byte k (0 = high) of sample s.
 * @param pixels rows * columns.
 * @returns {Uint8Array} the samples interleaved, each little endian (the native layout).
 * @throws Error saying what is wrong.
 */
export function decodeRle(frame, pixels, samples, bytesPerSample) {
  if (frame.length < 64) throw new Error('no RLE header');
  const view = new DataView(frame.buffer, frame.byteOffset, frame.byteLength);
  const count = view.getUint32(0, true);
  const expected = samples * bytesPerSample;
  if (count !== expected) throw new Error(`${count} segments, ${expected} expected`);
  const offsets = Array.from({ length: count }, (_, k) => view.getUint32(4 + 4 * k, true));
  const out = new Uint8Array(pixels * expected);
  for (let k = 0; k < count; k += 1) {
    const start = offsets[k];
    const end = k + 1 < count ? offsets[k + 1] : frame.length;
    if (start < 64 || end > frame.length || end < start) throw new Error(`segment ${k + 1} lies outside the frame`);
    const sample = Math.floor(k / bytesPerSample);
    const significance = bytesPerSample - 1 - (k % bytesPerSample); // 0 = low byte
    const { segment, length } = unpackBits(frame.subarray(start, end), pixels);
    if (length < pixels) throw new Error(`segment ${k + 1} holds ${length} of ${pixels} bytes`);
    for (let i = 0, o = sample * bytesPerSample + significance; i < pixels; i += 1, o += expected) out[o] = segment[i];
  }
  return out;
}

/** PackBits: n in 0..127 copies the next n + 1 bytes, -127..-1 repeats the next byte 1 - n
 * times, -128 does nothing. `{segment, length}`: at most `limit` bytes, and how many came. */
function unpackBits(data, limit) {
  const out = new Uint8Array(limit);
  let o = 0;
  for (let i = 0; i < data.length && o < limit;) {
    const n = (data[i] << 24) >> 24;
    i += 1;
    if (n >= 0) {
      const run = Math.min(n + 1, limit - o, data.length - i);
      out.set(data.subarray(i, i + run), o);
      o += run;
      i += n + 1;
    } else if (n !== -128) {
      if (i >= data.length) break;
      const run = Math.min(1 - n, limit - o);
      out.fill(data[i], o, o + run);
      o += run;
      i += 1;
    }
  }
  return { segment: out, length: o };
}

/** The stored samples as numbers: masked to BitsStored, sign-extended when signed (as pydicom). */
function readSamples(native, { bitsAllocated, bitsStored, signed }, bigEndian) {
  if (bitsAllocated === 8) {
    const out = new Int32Array(native.length);
    const mask = (1 << bitsStored) - 1;
    const shift = 32 - bitsStored;
    for (let i = 0; i < native.length; i += 1) out[i] = signed ? (native[i] << shift) >> shift : native[i] & mask;
    return out;
  }
  const out = new Int32Array(native.length / 2);
  const [high, low] = bigEndian ? [0, 1] : [1, 0];
  const mask = (1 << bitsStored) - 1;
  const shift = 32 - bitsStored;
  for (let i = 0; i < out.length; i += 1) {
    const v = (native[2 * i + high] << 8) | native[2 * i + low];
    out[i] = signed ? (v << shift) >> shift : v & mask;
  }
  return out;
}

function colourToRgba(samples, { bitsStored }) {
  const shift = Math.max(bitsStored - 8, 0); // wider samples keep their high byte (dicom.py)
  const rgba = new Uint8Array((samples.length / 3) * 4);
  for (let i = 0, o = 0; i < samples.length; i += 3, o += 4) {
    for (let s = 0; s < 3; s += 1) rgba[o + s] = Math.min(Math.max(samples[i + s] >> shift, 0), 255);
    rgba[o + 3] = 255;
  }
  return rgba;
}

function greyToRgba(grey, photometric) {
  const rgba = new Uint8Array(grey.length * 4);
  const invert = photometric === 'MONOCHROME1';
  for (let i = 0, o = 0; i < grey.length; i += 1, o += 4) {
    const y = invert ? 255 - grey[i] : grey[i];
    rgba[o] = y; rgba[o + 1] = y; rgba[o + 2] = y; rgba[o + 3] = 255;
  }
  return rgba;
}

/** The browser's decode of the JPEG frame: grey frames are stored values, windowed like any. */
function fromDecodedJpeg(decoded, ds, layout) {
  if (layout.samples === 3) return decoded;
  const stored = new Int32Array(decoded.length / 4);
  for (let i = 0; i < stored.length; i += 1) stored[i] = decoded[4 * i];
  return greyToRgba(window8(stored, ds, layout), layout.photometric);
}

// ---- the window: stored values -> 0..255 (dicom.window) ------------------------------------------

/**
 * Stored grey values -> 8-bit, before any MONOCHROME1 inversion: the modality LUT, then the VOI
 * LUT sequence, else the first window, else the stored range; `floor(255 * clip(y) + 0.5)`.
 * Computed once per possible stored value (at most 65,536), in float64 as NumPy does.
 */
function window8(stored, ds, layout) {
  const { bitsStored, signed } = layout;
  const low = signed ? -(2 ** (bitsStored - 1)) : 0;
  const high = signed ? 2 ** (bitsStored - 1) - 1 : 2 ** bitsStored - 1;
  const toFraction = fractionRule(ds, layout, low, high);
  const table = new Uint8Array(high - low + 1);
  for (let v = low; v <= high; v += 1) table[v - low] = Math.floor(Math.min(Math.max(toFraction(v), 0), 1) * 255 + 0.5);
  const out = new Uint8Array(stored.length);
  for (let i = 0; i < stored.length; i += 1) out[i] = table[stored[i] - low];
  return out;
}

/**
 * The rule's fraction 0..1 of a stored value, computed as pneumoscan/dicom.py has pydicom's
 * `apply_modality_lut`, `apply_voi` and `apply_windowing` compute it, operation for operation
 * (so that float64 rounding agrees to the bit): the window's output in pydicom's range
 * [yMin, yMax] (the stored range through the rescale), then back to a fraction.
 */
function fractionRule(ds, layout, low, high) {
  const slope = ds.floatString(TAG.slope) || 1; // as Python's `or 1`: a slope of 0 means 1
  const intercept = ds.floatString(TAG.intercept) || 0;
  const modality = (v) => v * slope + intercept;
  const [yMin, yMax] = [low * slope + intercept, high * slope + intercept];
  const lut = ds.elements[TAG.voiLut];
  const item = lut && lut.items && lut.items.length ? lut.items[0].dataSet : null;
  if (item && item.elements[TAG.lutDescriptor] && item.elements[TAG.lutData]) {
    const apply = voiLut(item, layout);
    return (v) => apply(modality(v));
  }
  const centre = firstNumber(ds, TAG.windowCentre);
  const width = firstNumber(ds, TAG.windowWidth);
  if (centre !== undefined && width !== undefined) {
    const window = windowing(centre, Math.max(width, 1), (ds.string(TAG.voiFunction) || 'LINEAR').toUpperCase(),
      yMin, yMax);
    return (v) => window(modality(v));
  }
  const ends = [yMin, yMax].sort((a, b) => a - b);
  return (v) => (modality(v) - ends[0]) / Math.max(ends[1] - ends[0], 1e-12);
}

/** A window attribute's first value; undefined when empty, not a number or not finite (dicom.py `_first`). */
function firstNumber(ds, tag) {
  const value = ds.floatString(tag, 0);
  return Number.isFinite(value) ? value : undefined;
}

/** pydicom's `apply_windowing` (PS3.3 C.11.2.1.2-3), then back to a fraction of [yMin, yMax]. */
function windowing(centre, width, fn, yMin, yMax) {
  const range = yMax - yMin;
  if (fn === 'SIGMOID') return (x) => (range / (1 + Math.exp((-4 * (x - centre)) / width)) + yMin - yMin) / range;
  const [c, w] = fn === 'LINEAR_EXACT' ? [centre, width] : [centre - 0.5, width - 1]; // else LINEAR
  return (x) => {
    if (x <= c - w / 2) return 0; // (yMin - yMin) / range
    if (x > c + w / 2) return (yMax - yMin) / range;
    return (((x - c) / w + 0.5) * range + yMin - yMin) / range;
  };
}

/**
 * The first VOI LUT item, read as pydicom's `apply_voi` reads it: entries, first mapped value,
 * bits (8 or 10-16); the data 16-bit words in the file's byte order (VR US or OW), or legacy
 * 8-bit entries packed one a byte (OW, as many bytes as entries). The value looked up is x
 * rounded (NumPy's rint) and clamped to the table's inputs; the result a fraction of 2^bits - 1.
 */
function voiLut(item, layout) {
  const { name } = layout;
  const descriptor = item.elements[TAG.lutDescriptor];
  const firstSigned = descriptor.vr ? descriptor.vr === 'SS' : layout.signed;
  const entries = item.uint16(TAG.lutDescriptor, 0) || 65536;
  const first = firstSigned ? item.int16(TAG.lutDescriptor, 1) : item.uint16(TAG.lutDescriptor, 1);
  const bits = item.uint16(TAG.lutDescriptor, 2);
  if (bits !== 8 && !(bits >= 10 && bits <= 16)) {
    throw new ImageError(`${name}: its VOI LUT has ${bits}-bit entries; pneumoscan reads 8 and 10 to 16.`);
  }
  const element = item.elements[TAG.lutData];
  const raw = item.byteArray.subarray(element.dataOffset, element.dataOffset + element.length);
  const packed = element.vr !== 'US' && bits === 8 && raw.length === entries;
  const held = packed ? raw.length : raw.length >> 1;
  if (held < entries) {
    throw new ImageError(`${name}: its VOI LUT holds ${held} of the ${entries} entries its descriptor says.`);
  }
  const [high, low] = layout.bigEndian ? [0, 1] : [1, 0];
  const table = Float64Array.from({ length: entries },
    (_, i) => (packed ? raw[i] : (raw[2 * i + high] << 8) | raw[2 * i + low]));
  const top = 2 ** bits - 1;
  return (x) => table[Math.min(Math.max(rint(x), first), first + entries - 1) - first] / top;
}

/** NumPy's rint: to the nearest integer, halves to even. */
function rint(x) {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** A code string (VR CS) as a message may quote it; '' for anything else (dicom.py `_code_string`). */
function codeString(value) {
  const text = (value || '').trim();
  return /^[A-Za-z0-9 _]{1,16}$/.test(text) ? text : '';
}

/** The header facts that say this is not a frontal chest X-ray (phrases of dicom.py). */
function headerWarnings(ds) {
  const found = [];
  const view = codeString(ds.string(TAG.view)).toUpperCase();
  if (LATERAL_VIEWS.includes(view)) {
    found.push(`the header says the view is lateral (${view}); the model reads frontal chest X-rays`);
  }
  const part = codeString(ds.string(TAG.bodyPart)).toUpperCase();
  if (part && !CHEST_PARTS.includes(part)) found.push(`the header says the body part is ${part}, not the chest`);
  return found;
}
