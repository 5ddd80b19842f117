// Number formats shared by the widgets (the same texts the Python tables would show).

/** A number in the reader's locale (thousands separators) with at most `digits` decimals. */
export function formatNumber(value: number, digits = 0): string {
  return value.toLocaleString(undefined, { maximumFractionDigits: digits });
}

/** A cost or price with a few significant digits and no trailing zeros (0.000021, 0.0125). */
export function formatCost(cost: number): string {
  if (cost === 0) return "0";
  return String(Number(Math.abs(cost) >= 0.01 ? cost.toFixed(4) : cost.toPrecision(3)));
}

/** A price or cost followed by its unit, if any ("0.002 USDC"). */
export function formatPrice(value: number, unit?: string | null): string {
  const text = formatCost(value);
  return unit ? `${text} ${unit}` : text;
}
