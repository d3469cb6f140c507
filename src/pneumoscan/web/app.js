// The pneumoscan page (served by `pneumoscan serve`): load the model bundle, pick a TF.js
// backend, and classify the chest X-rays a person drops or picks, one card per file.
//
// Each card shows the image as the model analysed it, its heatmap a click away and a larger
// view in a dialog (viewer.js); the map (heatmap.js) and the out-of-distribution features come
// from the same forward pass (forward.js), and the verdict from decision.js.
//
// Test hooks (a contract with tests/test_web.py and benchmarks/speed/browser_bench.py):
//   <body data-backend="webgl|wasm|cpu" data-ready="true">  once the model is loaded;
//   <body data-threads> the CPU threads the backend computes on (wasm: TF.js' count, cpu: 1;
//   absent for webgl), set with data-backend, and shown on the #backend line ("wasm, 2 threads");
//   ?threads=N (1 to 8) asks wasm for N threads instead of the automatic choice;
//   every processed file: [data-testid=result][data-filename] with data-label,
//   data-probability (full precision) and data-heatmap-peak ("x,y", set with the probability;
//   absent where the model's map cannot be computed), data-warning when a DICOM header speaks
//   against the image, or data-error; data-ms is the time it took (decode to probability and
//   map) and data-infer-ms the model's share; <body data-ready-ms> the load time. In a card,
//   canvas[data-testid=heatmap] (hidden until) [data-testid=heatmap-toggle] is pressed.
//   With the bundle's `ood` block, data-ood ("true"/"false") and data-ood-score (full
//   precision), and with its `borderline` block data-borderline ("true"/"false"), all set with
//   the probability; absent for a bundle without the block, or one the page cannot follow
//   (#ood-method / #borderline-band then say so).
// What a result means (issue 23, tests/test_web.py): a card's .verdict holds .label and, when
//   borderline, .band-tag; .bar .band is the borderline band (shown with the bundle's block);
//   .probability never reads 100.0% or 0.0% (wording.js), .probability-meaning says what it is.
//   The dialog repeats the flags (#viewer-verdict, #viewer-warning) and the map's scale
//   (#viewer-legend). #summary, #download-csv, #print and #print-header are the batch's
//   (results.js); #model-plain leads the model panel, whose details #details-toggle shows.
import { readBorderline, readDecision, readOod, verdict } from './decision.js';
import { makeForward, readTestTime } from './forward.js';
import { heatmapPeak, heatmapSpec, makeMap } from './heatmap.js';
import {
  ImageError, MetadataError, aspect, preprocess, readPlan,
} from './preprocess.js';
import { closeBitmaps, previewBitmap, showImage, wireViewer } from './viewer.js';
import { formatPercent, formatProbability, probabilityMeaning } from './wording.js';
import { cardRecords, download, sha256Hex, summarize, toCsv } from './results.js';

const tf = globalThis.tf; // the UMD builds served from /vendor/ (see index.html)
const BACKENDS = ['webgl', 'wasm', 'cpu'];
// Renderer strings of software WebGL: about 10x slower than WebAssembly for these models.
const SOFTWARE_RENDERER = /swiftshader|llvmpipe|softpipe|software|basic render/i;
// Web workers TF.js' threaded wasm build starts (its pthread pool): the most threads it can use.
const WASM_MAX_THREADS = 8;

const $ = (selector) => document.querySelector(selector);
const state = {
  model: null, forward: null, heatmap: null, metadata: null, plan: null, decision: null,
  queue: Promise.resolve(), oodNote: '', bandNote: '', digest: null, threadsWhy: '',
};

function say(message) {
  // One polite announcement at a time for screen readers; the cards hold the details.
  $('#announcer').textContent = message;
}

// ---- backend choice -------------------------------------------------------------------

/** The WebGL renderer string, or null when the browser has no WebGL. */
function webglRenderer() {
  const canvas = document.createElement('canvas');
  const gl = canvas.getContext('webgl2') || canvas.getContext('webgl');
  if (!gl) return null;
  const info = gl.getExtension('WEBGL_debug_renderer_info');
  const renderer = String(gl.getParameter(info ? info.UNMASKED_RENDERER_WEBGL : gl.RENDERER));
  const lose = gl.getExtension('WEBGL_lose_context');
  if (lose) lose.loseContext();
  return renderer;
}

/** Whether a worker started from a blob: URL may import a script from another blob: URL, as each
 * thread of TF.js' threaded wasm build does. A Content-Security-Policy without blob: in
 * script-src forbids it, and that build would then wait for its workers for ever. */
function blobWorkersRun(timeoutMs = 5000) {
  const urls = [];
  const blobUrl = (code) => {
    urls.push(URL.createObjectURL(new Blob([code], { type: 'text/javascript' })));
    return urls[urls.length - 1];
  };
  return new Promise((resolve) => {
    let worker = null;
    const done = (works) => {
      clearTimeout(timer);
      if (worker) worker.terminate();
      urls.forEach((url) => URL.revokeObjectURL(url));
      resolve(works);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    try {
      worker = new Worker(blobUrl(`importScripts(${JSON.stringify(blobUrl('self.imported = true;'))}); postMessage(self.imported === true);`));
      worker.onmessage = (event) => done(event.data === true);
      worker.onerror = (event) => {
        event.preventDefault();
        done(false);
      };
    } catch (error) {
      done(false);
    }
  });
}

/** `?threads=` as a number of threads, or null (automatic). */
function readThreads(text) {
  if (text === null || text === '') return null;
  const threads = Number(text);
  if (!Number.isInteger(threads) || threads < 1 || threads > WASM_MAX_THREADS) {
    throw new Error(`?threads=${text} is not a whole number from 1 to ${WASM_MAX_THREADS}.`);
  }
  return threads;
}

/** Threads for the wasm backend, and why: `forced` (?threads=) or, automatically, every logical
 * core the browser reports (up to the workers TF.js' threaded build starts) where it reports more
 * than 2, and 1 where it reports 2 or fewer: on the project's 2-core machine a second thread made
 * each film slower, not faster (BENCHMARKS.md, "The page on every core"). More than one needs
 * the page cross-origin isolated (serve's COOP and COEP: sharing memory with workers) and allowed
 * to start the workers' blob: scripts. With one, TF.js loads its single-threaded SIMD build. */
async function wasmThreads(forced) {
  const cores = navigator.hardwareConcurrency || 1;
  const wanted = forced || (cores > 2 ? Math.min(WASM_MAX_THREADS, cores) : 1);
  const why = `${wanted} thread${wanted === 1 ? '' : 's'}: ` + (forced ? 'chosen in the address (?threads=)'
    : cores > 2 ? `one per logical core this browser reports (${cores}), at most ${WASM_MAX_THREADS}`
      : `this browser reports ${cores} logical core${cores === 1 ? '' : 's'}, where a second thread measured slower`);
  let reason = null;
  if (wanted > 1 && !globalThis.crossOriginIsolated) {
    reason = 'the page is not cross-origin isolated (COOP/COEP headers)';
  } else if (wanted > 1 && !(await blobWorkersRun())) {
    reason = "this page's Content-Security-Policy forbids the threads' blob: scripts";
  }
  return reason ? { threads: 1, why: `one thread: ${reason}; asked for ${why}` } : { threads: wanted, why };
}

/** `tf.setBackend('wasm')` with `threads` threads (TF.js' threaded build). TF.js 4.22 caps the
 * count it is given at half of navigator.hardwareConcurrency, read once as its module starts (it
 * assumes two logical cores per physical one), so a 2-core machine would get 1 thread whatever
 * it asks: the count is shown to it doubled for the start, then the browser's own is back. */
async function startThreadedWasm(threads) {
  tf.wasm.setThreadsCount(threads);
  Object.defineProperty(navigator, 'hardwareConcurrency', { value: 2 * threads, configurable: true });
  try {
    return await tf.setBackend('wasm');
  } finally {
    delete navigator.hardwareConcurrency; // the own property: Navigator.prototype's getter is back
  }
}

/** `tf.setBackend(name)`; for wasm, with the threads `wasmThreads` chooses (the reason kept for
 * the model details): TF.js' threaded build for more than one, else its single-threaded one. */
async function startBackend(name, threads) {
  if (name !== 'wasm') return tf.setBackend(name);
  const chosen = await wasmThreads(threads);
  state.threadsWhy = chosen.why;
  if (chosen.threads === 1) {
    tf.env().set('WASM_HAS_MULTITHREAD_SUPPORT', false); // the build the page ran before threads
    return tf.setBackend('wasm');
  }
  return startThreadedWasm(chosen.threads);
}

/** The CPU threads `backend` computes on: TF.js' own count for wasm, 1 for cpu (this page's
 * thread), null for webgl (the graphics chip). */
function backendThreads(backend) {
  if (backend === 'wasm') return tf.wasm.getThreadsCount();
  return backend === 'cpu' ? 1 : null;
}

async function tryBackend(name, threads) {
  try {
    if (!(await startBackend(name, threads))) return false;
    await tf.ready();
    const probe = tf.tidy(() => tf.add(tf.scalar(1), tf.scalar(1)));
    const works = (await probe.data())[0] === 2;
    probe.dispose();
    return works;
  } catch (error) {
    console.warn(`pneumoscan: the ${name} backend failed to start:`, error);
    return false;
  }
}

/** Forced by ?backend=, else the first that works of webgl, wasm, cpu (wasm first on software GL);
 * wasm with `threads` (?threads=; null: automatic). */
async function chooseBackend(forced, threads) {
  if (forced) {
    if (!BACKENDS.includes(forced)) {
      throw new Error(`?backend=${forced} is not one of ${BACKENDS.join(', ')}.`);
    }
    if (!(await tryBackend(forced, threads))) throw new Error(`The ${forced} backend does not work in this browser.`);
    return { name: forced, why: 'chosen in the address (?backend=)', renderer: null };
  }
  const renderer = webglRenderer();
  let order = BACKENDS;
  let why = renderer ? `GPU: ${renderer}` : 'WebGL is not available';
  if (renderer === null) {
    order = ['wasm', 'cpu'];
  } else if (SOFTWARE_RENDERER.test(renderer)) {
    order = ['wasm', 'webgl', 'cpu'];
    why = `WebGL is software-rendered here (${renderer.match(SOFTWARE_RENDERER)[0]}), ` +
      'so WebAssembly is faster';
  }
  for (const name of order) {
    if (await tryBackend(name, threads)) return { name, why, renderer };
  }
  throw new Error('No TensorFlow.js backend works in this browser.');
}

// ---- model ----------------------------------------------------------------------------

async function loadMetadata() {
  const response = await fetch('model/metadata.json', { cache: 'no-cache' });
  if (!response.ok) throw new Error(`model/metadata.json: HTTP ${response.status}.`);
  const bytes = await response.arrayBuffer();
  state.digest = await sha256Hex(bytes); // names the model in what is saved (metadata.digest)
  return JSON.parse(new TextDecoder().decode(bytes));
}

/** `read(...)`, or null and `{note}` when the block cannot be followed: the page then says so
 * once and shows no flag rather than a guessed one. */
function optionalBlock(read, ...args) {
  try {
    return { spec: read(...args), note: null };
  } catch (error) {
    if (!(error instanceof MetadataError)) throw error;
    console.warn(`pneumoscan: ${error.message}`);
    return { spec: null, note: `not shown: this page cannot follow the model's ${error.message}` };
  }
}

/** The layers model and what runs it per image: its output, its heatmap and the features of
 * the out-of-distribution flag, in one pass (forward.js); the verdict's blocks (decision.js). */
async function loadModel(metadata, plan, decision) {
  const url = new URL('model/tfjs/model.json', document.baseURI).href;
  const model = await tf.loadLayersModel(url);
  const ood = optionalBlock(readOod, metadata, model);
  const band = optionalBlock(readBorderline, metadata);
  const heatmap = makeMap(tf, model, heatmapSpec(metadata, model));
  const forward = makeForward(tf, model, {
    map: heatmap.map, extraLayer: ood.spec && ood.spec.featureLayer, testTime: readTestTime(metadata, plan.height, plan.width),
  });
  // One pass on a blank image compiles kernels, so the first file's time is honest.
  const blank = tf.zeros([1, plan.height, plan.width, 1]);
  try {
    await forward.run(blank);
  } finally {
    blank.dispose();
  }
  return {
    model, forward, heatmap, decision: { ...decision, ood: ood.spec, band: band.spec },
    oodNote: ood.note || (ood.spec ? `images unlike the training X-rays are flagged (features of ` +
      `${ood.spec.featureLayer}, colour, shape)` : 'not in this model bundle (made before the flag): images are not checked'),
    bandNote: band.note || (band.spec ? `answers with a probability between ${band.spec.low.toFixed(3)} and ` +
      `${band.spec.high.toFixed(3)} are marked "uncertain, needs a reader"` : 'not in this model bundle: no answer is marked'),
  };
}

function describeModel(metadata) {
  const { arch, input, calibration, threshold } = metadata;
  const calibrated = calibration.method === 'none' ? 'uncalibrated' : `${calibration.method} calibration`;
  const copies = metadata.test_time ? metadata.test_time.shifts.length - 1 : 0;
  const averaged = copies > 0 ? `, each image averaged with ${copies} shifted ${copies === 1 ? 'copy' : 'copies'}` : '';
  return `${arch}${adaptedTo(metadata) || ","} ${input.width}×${input.height} grayscale input${averaged}, ${calibrated}, ` +
    `threshold ${threshold.value.toFixed(3)} (${threshold.rule})`;
}

// ---- one file -> one card ---------------------------------------------------------------

/** A file name with break opportunities after _ - . (so a narrow card wraps it between
 * its parts, not mid-word); its text stays the name. */
function showName(element, name) {
  element.replaceChildren();
  for (const part of name.split(/(?<=[_\-.])/)) {
    if (element.childNodes.length) element.append(document.createElement('wbr'));
    element.append(part);
  }
}

/** The status panel's first line, in plain words (the details are behind the disclosure). */
function plainStatus(metadata, backend) {
  const where = { webgl: "this computer's graphics chip", wasm: 'WebAssembly', cpu: 'plain JavaScript' }[backend];
  const checks = [state.decision.ood && 'flags images that do not look like chest X-rays',
    state.decision.band && 'marks uncertain answers for a reader'].filter(Boolean);
  return `Ready: the ${metadata.arch} model${adaptedTo(metadata)} runs in this browser (${where})` +
    (checks.length ? `; it ${checks.join(' and ')}.` : '.');
}

/** ", adapted to SITE on N films (DATE)," for a bundle `pneumoscan adapt` wrote, else "". */
function adaptedTo(metadata) {
  const block = metadata.adaptation;
  if (!block) return '';
  const films = Object.values(block.films).reduce((sum, n) => sum + n, 0);
  return `, adapted to ${block.site} on ${films} films (${block.date}),`;
}

function newCard(file) {
  const card = $('#card-template').content.firstElementChild.cloneNode(true);
  showName(card.querySelector('.filename'), file.name);
  card.setAttribute('aria-busy', 'true');
  $('#results').append(card);
  return card;
}

async function classify(file) {
  const started = performance.now();
  const { input, width, height, gray, warnings, colourfulness } = await preprocess(tf, file, state.plan);
  const inferStart = performance.now();
  let output;
  try {
    output = await state.forward.run(input); // the output, the map and the features, one pass
  } finally {
    input.dispose();
  }
  const map = output.grid && { grid: output.grid, gridHeight: output.gridHeight, gridWidth: output.gridWidth };
  const peak = map && heatmapPeak(map.grid, map.gridHeight, map.gridWidth);
  const decided = verdict(state.decision, output.p, output.features, colourfulness, aspect(width, height));
  const done = performance.now();
  return { ...decided, width, height, gray, warnings, map, peak, ms: done - started, inferMs: done - inferStart };
}

function showResult(card, file, result) {
  const { metadata } = state;
  const positive = result.label === metadata.class_names[1];
  const percent = formatPercent(result.probability);
  card.classList.add(positive ? 'positive' : 'negative');
  card.querySelector('.label').textContent = result.label;
  card.querySelector('.probability-key').textContent = `Probability of ${metadata.positive_class.toLowerCase()}`;
  drawBar(card.querySelector('.bar'), result.probability, metadata.threshold.value, state.decision.band);
  card.querySelector('.probability').textContent = formatProbability(result.probability);
  card.querySelector('.probability-meaning').textContent = probabilityMeaning(metadata);
  card.querySelector('.threshold').textContent = metadata.threshold.value.toFixed(3);
  card.querySelector('.size').textContent = `${result.width}×${result.height} px`;
  card.querySelector('.time').textContent = `${Math.round(result.ms)} ms`;
  const warning = result.warnings.length ? `${file.name}: ${result.warnings.join('; ')}.` : null;
  if (warning) {
    const text = card.querySelector('.warning');
    text.querySelector('.warning-text').textContent = `${result.warnings.join('; ')}.`;
    text.hidden = false;
  }
  if (result.ood) {
    card.classList.add('ood');
    card.querySelector('.ood-warning').hidden = false;
  }
  if (result.borderline) {
    card.classList.add('borderline');
    card.querySelector('.borderline-note').hidden = false;
    card.querySelector('.band-tag').hidden = false;
  }
  showImage(card, {
    ...result, name: file.name, positive: metadata.positive_class.toLowerCase(),
    describe: state.heatmap.describe, unavailable: state.heatmap.unavailable,
  });
  // One step: whoever sees data-probability sees the peak (and any warning) too.
  Object.assign(card.dataset, {
    label: result.label, probability: String(result.probability),
    ...(result.peak ? { heatmapPeak: result.peak.map(String).join(',') } : {}),
    ...(warning ? { warning } : {}),
    ...(result.oodScore !== null ? { ood: String(result.ood), oodScore: String(result.oodScore) } : {}),
    ...(result.borderline !== null ? { borderline: String(result.borderline) } : {}),
    ms: result.ms.toFixed(2), inferMs: result.inferMs.toFixed(2),
    width: String(result.width), height: String(result.height),
  });
  const notXray = result.ood;
  say(`${file.name}: ` +
    (notXray ? 'does not look like a chest X-ray, so this answer is not meaningful: ' : '') +
    `${result.label}, probability of ${metadata.positive_class.toLowerCase()} ${percent}.` +
    (result.borderline ? ' Uncertain, needs a reader.' : '') +
    (warning ? ` Warning: ${result.warnings.join('; ')}.` : ''));
}

/** The bar's fill (the probability), mark (the threshold) and, with a band, its shaded span. */
function drawBar(bar, probability, threshold, band) {
  bar.style.setProperty('--value', String(probability));
  bar.style.setProperty('--threshold', String(threshold));
  if (!band) return;
  bar.style.setProperty('--band-low', String(band.low));
  bar.style.setProperty('--band-high', String(band.high));
  bar.querySelector('.band').hidden = false;
}

function showError(card, file, error) {
  const message = error instanceof ImageError ? error.message
    // Only the error's kind: its text could quote the file (the console has the whole error).
    : `${file.name}: could not be analysed (${error && error.name ? error.name : 'an unexpected error'}).`;
  card.classList.add('failed');
  card.querySelector('.outcome').hidden = true;
  const text = card.querySelector('.error');
  text.textContent = message;
  text.hidden = false;
  card.dataset.error = message;
  say(message);
}

async function processFile(file, card) {
  try {
    const result = await classify(file);
    result.bitmap = await previewBitmap(result.gray, result.width, result.height);
    delete result.gray; // the bitmap is what the card keeps
    showResult(card, file, result);
  } catch (error) {
    if (!(error instanceof ImageError)) console.error(error);
    showError(card, file, error);
  } finally {
    card.dataset.filename = file.name;
    card.dataset.testid = 'result';
    card.removeAttribute('aria-busy');
    showSummary();
  }
}

// ---- the batch: summary, CSV, print -------------------------------------------------------

function resultRecords() {
  const { metadata } = state;
  const model = { name: metadata.arch, digest: state.digest, threshold: metadata.threshold.value };
  return cardRecords($('#results').children, model);
}

function showSummary() {
  const records = resultRecords();
  const summary = $('#summary');
  summary.hidden = records.length === 0;
  summary.textContent = records.length ? summarize(records) : '';
  $('#download-csv').disabled = records.length === 0;
  $('#print').disabled = records.length === 0;
  const digest = state.digest ? `metadata.json SHA-256 ${state.digest.slice(0, 16)}` : 'digest not available here';
  $('#print-header').textContent = `pneumoscan, model ${state.metadata.arch} (${digest}), ` +
    `${new Date().toISOString().slice(0, 16).replace('T', ' ')} UTC. Research tool, not a diagnosis.`;
}

function wireBatch() {
  $('#download-csv').addEventListener('click', () => {
    download('pneumoscan-results.csv', toCsv(resultRecords()));
    say('The results were saved as a CSV file.');
  });
  $('#print').addEventListener('click', () => window.print());
}

function wireDetails() {
  const toggle = $('#details-toggle');
  toggle.addEventListener('click', () => {
    const open = toggle.getAttribute('aria-expanded') !== 'true';
    toggle.setAttribute('aria-expanded', String(open));
    $('#model-details').hidden = !open;
  });
}

function addFiles(files) {
  if (!state.model) {
    say('The model is not loaded yet; add the images again once it is.');
    return;
  }
  for (const file of files) {
    const card = newCard(file);
    // One file at a time: bounded memory, and each card's time is its own.
    state.queue = state.queue.then(() => processFile(file, card));
  }
}

// ---- page wiring ------------------------------------------------------------------------

function wirePicker() {
  const input = $('#files');
  const zone = $('#drop-zone');
  input.addEventListener('change', () => {
    addFiles([...input.files]);
    input.value = ''; // picking the same file again still fires `change`
  });
  for (const type of ['dragenter', 'dragover']) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add('dragging');
    });
  }
  for (const type of ['dragleave', 'drop']) {
    zone.addEventListener(type, () => zone.classList.remove('dragging'));
  }
  zone.addEventListener('drop', (event) => {
    event.preventDefault();
    addFiles([...event.dataTransfer.files]);
  });
  // A file dropped beside the zone must not navigate away (and lose the results).
  for (const type of ['dragover', 'drop']) {
    document.addEventListener(type, (event) => event.preventDefault());
  }
  $('#clear').addEventListener('click', () => {
    closeBitmaps($('#results').children);
    $('#results').replaceChildren();
    if (state.metadata) showSummary();
    say('Results cleared.');
  });
}

async function main() {
  const params = new URLSearchParams(location.search);
  const forced = params.get('backend');
  const select = $('#backend-choice');
  select.value = BACKENDS.includes(forced) ? forced : '';
  try {
    if (!tf || !tf.wasm) throw new Error('the TensorFlow.js scripts did not load from /vendor/.');
    tf.wasm.setWasmPaths('/vendor/'); // before any backend starts
    const threads = readThreads(params.get('threads'));
    const [metadata, backend] = await Promise.all([loadMetadata(), chooseBackend(forced, threads)]);
    state.metadata = metadata;
    state.plan = readPlan(metadata);
    const decision = readDecision(metadata);
    const running = backendThreads(tf.getBackend());
    $('#backend').textContent = backend.name + (running ? `, ${running} thread${running === 1 ? '' : 's'}` : '');
    $('#backend-why').textContent = backend.why + (state.threadsWhy && tf.getBackend() === 'wasm' ? `; ${state.threadsWhy}` : '');
    if (backend.renderer) $('#backend-why').title = `WebGL renderer: ${backend.renderer}`;
    document.body.dataset.backend = tf.getBackend();
    if (running) document.body.dataset.threads = String(running);
    Object.assign(state, await loadModel(metadata, state.plan, decision));
    $('#model').textContent = describeModel(metadata);
    $('#heatmap-method').textContent = state.heatmap.describe || state.heatmap.unavailable;
    $('#ood-method').textContent = state.oodNote;
    $('#borderline-band').textContent = state.bandNote;
    $('#probability-meaning').textContent = probabilityMeaning(metadata);
    $('#model-plain').textContent = plainStatus(metadata, backend.name);
    $('#files').disabled = false;
    // Milliseconds from navigation start to a usable model (benchmarks/speed/browser_bench.py).
    document.body.dataset.readyMs = performance.now().toFixed(1);
    document.body.dataset.ready = 'true';
    say(`Model loaded; running on ${backend.name}. Choose or drop chest X-ray images.`);
  } catch (error) {
    console.error(error);
    const what = error instanceof MetadataError ? 'This model bundle cannot run here' : 'The model could not be loaded';
    $('#load-error').textContent = `${what}: ${error.message}`;
    $('#load-error').hidden = false;
    $('#model').textContent = 'not loaded';
    $('#model-plain').textContent = 'The model is not loaded.';
    $('#probability-meaning').textContent = 'not loaded';
    $('#heatmap-method').textContent = 'not loaded';
    $('#ood-method').textContent = 'not loaded';
    $('#borderline-band').textContent = 'not loaded';
    document.body.dataset.ready = 'false';
  }
}

wirePicker();
wireViewer();
wireBatch();
wireDetails();
main();
