/**
 * The trusted keys a resident engine keeps between commands (trust.ts
 * trustedKeys): kept only while nothing they were read from changed, so
 * that a key added, removed or replaced, or a directory made writable by
 * others, is seen by the very next check. Each change is made once what
 * was read before it was kept (its files' times settled), the case the
 * keeping could get wrong.
 */
import { generateKeyPairSync } from 'node:crypto';
import { chmodSync, lstatSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { importKey, keyId, keysDir, selfKey, trustedKeys } from '../src/image/trust.js';
import { waitFor } from './helpers.js';
import { scratchDir } from './scratch.js';

const dir = scratchDir('appshot-trust-cache-');

/** A fresh Ed25519 public key, PEM, and its id. */
function newKey(): { pem: string; id: string } {
  const { publicKey } = generateKeyPairSync('ed25519');
  return { pem: publicKey.export({ type: 'spki', format: 'pem' }).toString(), id: keyId(publicKey) };
}

describe('trusted keys kept between checks', () => {
  it('sees a key removed, added, replaced in place, and a directory made writable by others', async () => {
    const home = join(dir, 'home');
    selfKey(home);
    const trusted = join(keysDir(home), 'trusted');
    const listed = () =>
      trustedKeys(home)
        .map((k) => `${k.name}:${k.id}`)
        .sort();
    /** Until every file the keys come from last changed more than 2.5 s
     * ago (trust.ts keeps what it read only then), and they were read. */
    const settledAndRead = async (files: string[]) => {
      const paths = [keysDir(home), join(keysDir(home), 'self.key'), trusted, ...files];
      const age = (p: string) => {
        const st = lstatSync(p, { bigint: true });
        return BigInt(Date.now()) * 1_000_000n - (st.ctimeNs > st.mtimeNs ? st.ctimeNs : st.mtimeNs);
      };
      await waitFor(() => paths.every((p) => age(p) > 2_500_000_000n), 20_000, 'the key files to be left unchanged for 2.5 s');
      listed();
    };
    const self = trustedKeys(home)[0];
    expect(self.name).toBe('self');
    const own = `self:${self.id}`;

    const one = newKey();
    writeFileSync(join(dir, 'one.pem'), one.pem);
    importKey(join(dir, 'one.pem'), 'one', home);
    const oneFile = join(trusted, 'one.pub');
    await settledAndRead([oneFile]);
    expect(listed()).toEqual([`one:${one.id}`, own].sort());

    rmSync(oneFile);
    expect(listed(), 'a key removed').toEqual([own]);

    await settledAndRead([]);
    const two = newKey();
    writeFileSync(join(dir, 'two.pem'), two.pem);
    importKey(join(dir, 'two.pem'), 'two', home);
    expect(listed(), 'a key added').toEqual([own, `two:${two.id}`].sort());

    // The same inode, the same size (every Ed25519 public key's PEM is as
    // long): only its times say it changed.
    const twoFile = join(trusted, 'two.pub');
    await settledAndRead([twoFile]);
    const inode = statSync(twoFile).ino;
    const three = newKey();
    expect(three.pem.length).toBe(two.pem.length);
    writeFileSync(twoFile, three.pem);
    expect(statSync(twoFile).ino).toBe(inode);
    expect(listed(), 'a key replaced in place').toEqual([own, `two:${three.id}`].sort());

    await settledAndRead([twoFile]);
    chmodSync(trusted, 0o777);
    try {
      expect(() => trustedKeys(home)).toThrow(/the trusted keys directory\) must belong to uid \d+ and be writable by it alone/);
    } finally {
      chmodSync(trusted, 0o700);
    }
    expect(listed()).toEqual([own, `two:${three.id}`].sort());
  }, 120_000);
});
