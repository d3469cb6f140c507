// What a result means, in words a clinician reads: the probability as a number that never
// claims certainty, the share of pneumonia the calibration assumes, and the flags that go
// wherever a label goes (the card, the larger view, the saved CSV and the printed summary).

/** `p` (in [0, 1]) to three decimals and as a percentage, never "1.000 (100.0%)" or
 * "0.000 (0.0%)": a model's estimate is never certain, so the ends read "> 0.999 (> 99.9%)"
 * and "< 0.001 (< 0.1%)". */
export function formatProbability(p) {
  if (p >= 0.9995) return '> 0.999 (> 99.9%)';
  if (p < 0.0005) return '< 0.001 (< 0.1%)';
  const percent = 100 * p;
  const shown = percent >= 99.95 ? '> 99.9' : percent < 0.05 ? '< 0.1' : percent.toFixed(1);
  return `${p.toFixed(3)} (${shown}%)`;
}

/** The percentage alone, with the same ends as `formatProbability`. */
export function formatPercent(p) {
  return formatProbability(p).match(/\((.*)\)/)[1];
}

/**
 * The share of the positive class in the split the calibration was fitted on (what a
 * calibrated probability assumes of the films it is given), as `{share, split}`; null when
 * the model is uncalibrated or its metadata does not record that split's counts.
 */
export function assumedPrevalence(metadata) {
  const split = metadata.calibration && metadata.calibration.fitted_on;
  const counts = split && metadata.data && metadata.data.splits && metadata.data.splits[split]
    && metadata.data.splits[split].counts;
  if (metadata.calibration.method === 'none' || !counts) return null;
  const total = Object.values(counts).reduce((a, b) => a + b, 0);
  const positive = counts[metadata.positive_class];
  if (!(total > 0) || !Number.isFinite(positive)) return null;
  return { share: positive / total, split };
}

/** One sentence: what the card's probability is, and the prevalence it assumes. */
export function probabilityMeaning(metadata) {
  const positive = metadata.positive_class.toLowerCase();
  if (metadata.calibration.method === 'none') {
    return `The model's score for ${positive}, not calibrated: read it against the threshold, not as a chance.`;
  }
  const prevalence = assumedPrevalence(metadata);
  if (!prevalence) return `The model's estimate of the chance of ${positive}, calibrated on its ${metadata.calibration.fitted_on || 'validation'} films.`;
  const share = Math.round(100 * prevalence.share);
  return `The chance of ${positive} among films like those it was calibrated on, where ${share}% ` +
    `had ${positive}; where ${positive} is rarer, the real chance is lower.`;
}

/** The flags of a result, in words, most serious first (empty when there are none). */
export function flagWords(result) {
  const words = [];
  if (result.ood) words.push('does not look like a chest X-ray: the answer is not meaningful');
  if (result.borderline) words.push('borderline: uncertain, needs a reader');
  return words;
}
