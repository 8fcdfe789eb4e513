import { createHash, createHmac } from 'node:crypto';

/** A sub-key for one purpose, derived from the server secret (keys never serve two purposes). */
export function deriveKey(secret: Uint8Array, purpose: string): Buffer {
  return createHmac('sha256', secret).update(`gemini-chat:${purpose}`).digest();
}

export function hmacHex(key: Buffer, value: string): string {
  return createHmac('sha256', key).update(value).digest('hex');
}

export function sha256Hex(value: string): string {
  return createHash('sha256').update(value).digest('hex');
}
