// What a card shows of its image: the pixels the model analysed (the page's own decode,
// oriented, in luma; never the browser's <img>, which orients and decodes by its own rules),
// the heatmap stacked on them behind a toggle, and a larger view in a <dialog> that the
// thumbnail (a button) opens, with the overlay and a ring at the heatmap's peak.
import { heatmapRgba, paintHeatmap } from './heatmap.js';
import { flagWords, formatPercent } from './wording.js';

const THUMBNAIL_SIDE = 256; // canvas pixels of a card's image (shown at 8rem, sharp at 2x)
const VIEW_SIDE = 768; // the larger view's
const views = new WeakMap(); // card -> what it shows
const viewer = { view: null, opener: null }; // what the dialog shows, and who opened it
const $ = (selector) => document.querySelector(selector);

/** The analysed luma as an ImageBitmap of at most VIEW_SIDE pixels a side (what is kept). */
export function previewBitmap(gray, width, height) {
  const rgba = new Uint8ClampedArray(width * height * 4);
  for (let i = 0, o = 0; i < gray.length; i += 1, o += 4) {
    rgba[o] = gray[i]; rgba[o + 1] = gray[i]; rgba[o + 2] = gray[i]; rgba[o + 3] = 255;
  }
  const [w, h] = fit(width, height, VIEW_SIDE, false);
  return createImageBitmap(new ImageData(rgba, width, height), {
    resizeWidth: w, resizeHeight: h, resizeQuality: 'high',
  });
}

/** Free the bitmaps of cards about to be removed. */
export function closeBitmaps(cards) {
  for (const card of cards) views.get(card)?.bitmap.close();
}

/** [w, h] of a width x height image scaled to `side` pixels on its longer side (never up
 * unless `up`). */
function fit(width, height, side, up = true) {
  const scale = up ? side / Math.max(width, height) : Math.min(1, side / Math.max(width, height));
  return [Math.max(1, Math.round(width * scale)), Math.max(1, Math.round(height * scale))];
}

function drawBitmap(canvas, bitmap, side) {
  [canvas.width, canvas.height] = fit(bitmap.width, bitmap.height, side);
  const context = canvas.getContext('2d');
  context.imageSmoothingQuality = 'high';
  context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  return context;
}

/**
 * Draw a card's image and heatmap, and wire its toggle and thumbnail.
 * @param view {bitmap, map ({grid, gridHeight, gridWidth} or null), peak, name, label,
 *   probability, positive (the positive class, in words), describe and unavailable (the map's)}
 */
export function showImage(card, view) {
  views.set(card, view);
  const image = card.querySelector('canvas.image');
  drawBitmap(image, view.bitmap, THUMBNAIL_SIDE);
  const heat = card.querySelector('canvas.heatmap');
  [heat.width, heat.height] = [image.width, image.height];
  const toggle = card.querySelector('.heatmap-toggle');
  if (view.map) {
    const { grid, gridHeight, gridWidth } = view.map;
    const rgba = heatmapRgba(grid, gridHeight, gridWidth, heat.width, heat.height);
    heat.getContext('2d').putImageData(new ImageData(rgba, heat.width, heat.height), 0, 0);
  } else {
    toggle.disabled = true;
    toggle.title = view.unavailable;
  }
  toggle.setAttribute('aria-label', `Heatmap of ${view.name}`); // the visible word, then which card
  toggle.addEventListener('click', () => {
    heat.hidden = !heat.hidden;
    toggle.setAttribute('aria-pressed', String(!heat.hidden));
  });
  const thumb = card.querySelector('.thumb');
  thumb.setAttribute('aria-label', `Larger view of ${view.name}${view.map ? ' with its heatmap' : ''}`);
  thumb.addEventListener('click', () => openViewer(view, thumb));
}

// ---- the larger view ------------------------------------------------------------------------

function openViewer(view, opener) {
  Object.assign(viewer, { view, opener });
  $('#viewer-title').textContent = view.name;
  // The label with its flags, as on the card: a flagged photograph is never just "PNEUMONIA".
  const warning = $('#viewer-warning');
  warning.hidden = !view.ood;
  warning.textContent = view.ood
    ? 'Not a chest X-ray? This does not look like a chest X-ray — the answer below is not meaningful.' : '';
  $('#viewer-verdict').textContent = verdictLine(view);
  $('#viewer-verdict').classList.toggle('ood', Boolean(view.ood));
  const overlay = $('#viewer-overlay');
  overlay.disabled = !view.map;
  overlay.checked = Boolean(view.map);
  drawViewer();
  $('#viewer').showModal();
}

function drawViewer() {
  const { view } = viewer;
  const canvas = $('#viewer-canvas');
  const context = drawBitmap(canvas, view.bitmap, VIEW_SIDE);
  let caption = `${verdictLine(view)} `;
  if (view.map && $('#viewer-overlay').checked) {
    paintHeatmap(context, view.map);
    const [x, y] = view.peak;
    markPeak(context, x * canvas.width, y * canvas.height);
    caption += `Heatmap: the ${view.describe}, brighter where the model found more evidence of ` +
      `${view.positive}; the ring marks its peak, ${Math.round(100 * x)}% from the left and ` +
      `${Math.round(100 * y)}% from the top.`;
    if (view.label.toLowerCase() !== view.positive) {
      caption += ` On a ${view.label} answer the map still shows where that evidence was strongest, ` +
        'but it was too weak to pass the threshold: the bright areas are not findings.';
    }
  } else {
    caption += view.map ? 'Heatmap hidden.' : `The page has ${view.unavailable}.`;
  }
  $('#viewer-legend').hidden = !(view.map && $('#viewer-overlay').checked);
  canvas.setAttribute('aria-label', `${view.name} as the model analysed it. ${caption}`);
  $('#viewer-caption').textContent = caption;
}

/** "LABEL, probability of pneumonia P." and the result's flags, in words. */
function verdictLine(view) {
  const flags = flagWords(view).map((words) => ` ${words[0].toUpperCase()}${words.slice(1)}.`).join('');
  return `${view.label}, probability of ${view.positive} ${formatPercent(view.probability)}.${flags}`;
}

function markPeak(context, x, y) {
  const radius = Math.max(6, context.canvas.width / 40);
  for (const [colour, width] of [['#000', 4], ['#fff', 2]]) {
    context.beginPath();
    context.arc(x, y, radius, 0, 2 * Math.PI);
    context.strokeStyle = colour;
    context.lineWidth = width;
    context.stroke();
  }
}

/** The dialog's controls: Close, the overlay checkbox; Escape closes it (the browser's). */
/** The legend's colour scale: the map's colours from its weakest to its strongest value,
 * over black as on a film. */
function drawLegend() {
  const canvas = $('#viewer-legend-scale');
  const context = canvas.getContext('2d');
  context.fillStyle = '#000';
  context.fillRect(0, 0, canvas.width, canvas.height);
  const grid = Float64Array.from({ length: canvas.width }, (_, i) => i);
  paintHeatmap(context, { grid, gridHeight: 1, gridWidth: canvas.width });
}

export function wireViewer() {
  const dialog = $('#viewer');
  drawLegend();
  $('#viewer-close').addEventListener('click', () => dialog.close());
  $('#viewer-overlay').addEventListener('change', drawViewer);
  dialog.addEventListener('close', () => {
    if (viewer.opener && viewer.opener.isConnected) viewer.opener.focus();
    Object.assign(viewer, { view: null, opener: null });
  });
  // A click on the backdrop (outside the dialog's box) closes it too.
  dialog.addEventListener('click', (event) => {
    const box = dialog.getBoundingClientRect();
    const inside = event.clientX >= box.left && event.clientX <= box.right &&
      event.clientY >= box.top && event.clientY <= box.bottom;
    if (event.target === dialog && !inside) dialog.close();
  });
}
