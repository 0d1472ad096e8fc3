import { expect, it } from 'vitest';
import { redis } from './redis.js';

// A test that deletes data costs the other workers nothing: each has a
// clone of its own. (Test files of one worker share its clone: each file
// here touches keys of its own.)
it('deletes a user from its own database', () => {
  expect(redis('DEL user:2', 'EXISTS user:2', 'GET user:3')).toEqual(['1', '0', 'name-3']);
});
