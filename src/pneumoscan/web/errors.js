// The two ways the page refuses, shared by its modules (preprocess.js re-exports them).

/** A problem with one file; `message` is one sentence naming it, shown on its card. */
export class ImageError extends Error {}

/** A model bundle this page cannot run faithfully. */
export class MetadataError extends Error {}

/** Throw a MetadataError quoting metadata.json unless `condition` holds. */
export function need(condition, message) {
  if (!condition) throw new MetadataError(`metadata.json: ${message}`);
}
