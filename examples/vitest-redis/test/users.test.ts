import { expect, it } from 'vitest';
import { KEYS } from '../global-setup.js';
import { redis } from './redis.js';

it('starts from the loaded dataset', () => {
  expect(redis('GET user:0', `GET user:${KEYS - 1}`)).toEqual(['name-0', `name-${KEYS - 1}`]);
});

it('renames a user without another worker seeing it', () => {
  expect(redis('SET user:1 renamed', 'GET user:1')).toEqual(['OK', 'renamed']);
});
