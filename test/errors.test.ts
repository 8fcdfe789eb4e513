import { describe, expect, it } from 'vitest';
import { isConnectionError } from '../src/lib/errors.js';

describe('isConnectionError', () => {
  it('recognises a driver error wrapped by the query builder', () => {
    const driver = Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:5432'), {
      code: 'ECONNREFUSED',
    });
    const wrapped = new Error('Failed query: select 1', { cause: driver });
    expect(isConnectionError(wrapped)).toBe(true);
  });

  it('recognises PostgreSQL shutting down or restarting', () => {
    for (const [message, code] of [
      ['terminating connection due to administrator command', '57P01'],
      ['the database system is shutting down', '57P03'],
      ['the database system is starting up', '57P03'],
    ]) {
      const driver = Object.assign(new Error(message), { code });
      expect(isConnectionError(new Error('Failed query', { cause: driver }))).toBe(true);
    }
  });

  it('does not mistake an ordinary query error for an outage', () => {
    const driver = Object.assign(new Error('duplicate key value violates unique constraint'), {
      code: '23505',
    });
    expect(isConnectionError(new Error('Failed query', { cause: driver }))).toBe(false);
    expect(isConnectionError(new Error('boom'))).toBe(false);
    expect(isConnectionError('ECONNREFUSED')).toBe(false);
  });
});
