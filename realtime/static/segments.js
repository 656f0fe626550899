// SMS segment counting in the browser: the same rules as the server's counter
// (storage/domain/segments.py), checked against the same vectors
// (tests/vectors/segments.json) by tests/realtime/test_dashboard_page.py.
//
// A body is counted as written: merge fields ({{first_name}}) count as their
// template text, as the server counts a personalized broadcast.

// The GSM-7 default alphabet without ESC itself: a literal ESC cannot be
// encoded, so it makes a text UCS-2.
const GSM7_BASIC = new Set(
  "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?" +
  "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà");
// An extension character is sent as ESC plus the character: two septets.
const GSM7_EXTENSION = new Set("\f^{}\\[]~|€");

export const GSM7_SINGLE = 160;
export const GSM7_PART = 153;
export const UCS2_SINGLE = 70;
export const UCS2_PART = 67;

// {encoding: "GSM-7" | "UCS-2", segments, units, perPart, left}
// units: septets (GSM-7) or UTF-16 code units (UCS-2); left: what still fits
// in the last part before another part starts.
export function countSegments(body) {
  // Iterating a string walks code points, so an astral character is one item.
  const chars = [...body];
  const gsm = chars.every((ch) => GSM7_BASIC.has(ch) || GSM7_EXTENSION.has(ch));
  const widths = gsm
    ? chars.map((ch) => (GSM7_EXTENSION.has(ch) ? 2 : 1))
    : chars.map((ch) => (ch.codePointAt(0) > 0xffff ? 2 : 1));
  const single = gsm ? GSM7_SINGLE : UCS2_SINGLE;
  const multi = gsm ? GSM7_PART : UCS2_PART;
  const units = widths.reduce((sum, width) => sum + width, 0);
  if (units <= single) {
    return { encoding: gsm ? "GSM-7" : "UCS-2", segments: 1, units, perPart: single, left: single - units };
  }
  // A two-wide character never straddles two parts (a handset could not
  // reassemble half of it): a part with one unit left closes early.
  let parts = 1;
  let used = 0;
  for (const width of widths) {
    if (used + width > multi) {
      parts += 1;
      used = 0;
    }
    used += width;
  }
  return { encoding: gsm ? "GSM-7" : "UCS-2", segments: parts, units, perPart: multi, left: multi - used };
}

// The characters that force UCS-2, each once, in order of appearance.
export function nonGsmCharacters(body) {
  const seen = [];
  for (const ch of body) {
    if (!GSM7_BASIC.has(ch) && !GSM7_EXTENSION.has(ch) && !seen.includes(ch)) seen.push(ch);
  }
  return seen;
}
