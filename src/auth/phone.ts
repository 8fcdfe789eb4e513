import { type CountryCode, parsePhoneNumberFromString } from 'libphonenumber-js/max';
import { AppError } from '../lib/errors.js';

const MOBILE_TYPES = new Set(['MOBILE', 'FIXED_LINE_OR_MOBILE', 'PERSONAL_NUMBER', undefined]);

/**
 * Parses an E.164 or national number (in `region`) into E.164. Numbers that are valid but cannot
 * receive SMS (fixed lines, toll-free) are refused too.
 */
export function normalizeMobile(input: string, region: string, field = 'body.mobile'): string {
  const parsed = parsePhoneNumberFromString(input.trim(), region as CountryCode);
  if (!parsed?.isValid() || !MOBILE_TYPES.has(parsed.getType())) {
    throw new AppError({
      code: 'VALIDATION_FAILED',
      message: `${field}: not a valid mobile number`,
      details: { issues: [{ field, message: 'not a valid mobile number' }] },
    });
  }
  return parsed.number;
}
