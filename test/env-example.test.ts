import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { envSchema, loadConfig } from '../src/config.js';

describe('.env.example', () => {
  const text = readFileSync(new URL('../.env.example', import.meta.url), 'utf8');
  const names = [...text.matchAll(/^([A-Z0-9_]+)=/gm)].map((m) => m[1]);

  it('lists every configuration variable and nothing else', () => {
    const keys = Object.keys(envSchema.shape);
    expect([...names].sort()).toEqual([...keys].sort());
  });

  it('parses as a valid configuration', () => {
    const env = Object.fromEntries(
      [...text.matchAll(/^([A-Z0-9_]+)=(.*)$/gm)].map((m) => [m[1], m[2]]),
    );
    expect(() => loadConfig(env)).not.toThrow();
  });
});
