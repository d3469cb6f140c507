// What a person takes away from the page, computed here from the cards (nothing leaves the
// device unless they save it): the batch summary, a CSV file with predict's columns plus the
// model's name and metadata.json digest, and the print view (style.css's @media print).

// `pneumoscan predict --format csv`'s columns, in its order, then the model that answered.
const COLUMNS = ['path', 'label', 'probability', 'threshold', 'error', 'warning', 'borderline', 'ood',
  'ood_score', 'model', 'model_digest'];
// Python's str() of a flag, as predict's CSV writes it, so that both files read the same way.
const PYTHON_BOOLEAN = { true: 'True', false: 'False' };

/** The SHA-256 (hex) of `bytes`, as metadata.digest computes it in Python; null where the
 * browser offers no crypto.subtle (a page served over plain HTTP to another machine). */
export async function sha256Hex(bytes) {
  if (!globalThis.crypto || !crypto.subtle) return null;
  const hash = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  return [...hash].map((byte) => byte.toString(16).padStart(2, '0')).join('');
}

/** One record per finished card, from its data attributes (the test hooks are the record). */
export function cardRecords(cards, model) {
  return [...cards].filter((card) => card.dataset.testid === 'result').map((card) => {
    const d = card.dataset;
    const record = { path: d.filename, model: model.name, model_digest: model.digest || '' };
    if (d.error) return { ...record, error: d.error };
    return {
      ...record, label: d.label, probability: d.probability, threshold: String(model.threshold),
      warning: d.warning || '', borderline: PYTHON_BOOLEAN[d.borderline] || '',
      ood: PYTHON_BOOLEAN[d.ood] || '', ood_score: d.oodScore || '',
    };
  });
}

function csvCell(value) {
  const text = value === undefined || value === null ? '' : String(value);
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

/** The records as CSV text: a header, then one line each. */
export function toCsv(records) {
  const lines = [COLUMNS.join(',')];
  for (const record of records) lines.push(COLUMNS.map((column) => csvCell(record[column])).join(','));
  return `${lines.join('\n')}\n`;
}

/** The batch in one sentence: the labels, the borderline ones, the flagged films counted apart
 * (a photograph called PNEUMONIA is not a pneumonia), the failures. */
export function summarize(records) {
  const labels = {};
  let flagged = 0;
  let borderline = 0;
  let failed = 0;
  for (const record of records) {
    if (record.error) {
      failed += 1;
    } else if (record.ood === 'True') {
      flagged += 1;
    } else {
      labels[record.label] = (labels[record.label] || 0) + 1;
      if (record.borderline === 'True') borderline += 1;
    }
  }
  const parts = Object.keys(labels).sort().map((label) => `${labels[label]} ${label}`);
  let text = `${records.length} ${records.length === 1 ? 'file' : 'files'}: ${parts.join(', ') || 'no label'}`;
  if (borderline) text += ` (${borderline} borderline, needing a reader)`;
  if (flagged) text += `; ${flagged} flagged as not a chest X-ray, not counted by label`;
  return `${text}; ${failed} could not be read.`;
}

/** Offer `text` as a file download named `name` (a blob URL: nothing is uploaded). */
export function download(name, text) {
  const url = URL.createObjectURL(new Blob([text], { type: 'text/csv;charset=utf-8' }));
  const link = document.createElement('a');
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 0);
}
