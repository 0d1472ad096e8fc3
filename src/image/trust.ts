/**
 * Who wrote an image. An image is code: its pages and registers run as
 * whoever restores it. So `snapshot` signs what it writes, and `restore`,
 * `clone` and `template create` run only what a trusted key signed, or what
 * the user trusts explicitly (--trust-image).
 *
 * Keys are Ed25519, not a shared HMAC secret: what `appshot key export`
 * hands to another node is the public half, which lets that node check this
 * node's images but not forge them; an HMAC key given away would let every
 * node that holds it sign as this one.
 *
 *   $APPSHOT_HOME/keys/self.key          this node's private key (0600, made at first use)
 *   $APPSHOT_HOME/keys/trusted/NAME.pub  public keys of other nodes (appshot key import)
 *
 * A key's id is the first 16 hex digits of the SHA-256 of its public key.
 *
 * The signature is a field of the manifest (with the key's id), not a part
 * of its own: the manifest is what every part's size and SHA-256 hang from
 * already, and the set of parts stays fixed, so that a reader can refuse
 * any name it does not know.
 */
import { uniqueTag } from '../holder.js';
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, type KeyObject, sign, verify } from 'node:crypto';
import { closeSync, constants as fsc, existsSync, fstatSync, linkSync, lstatSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { AppshotError, ExitCode } from '../errors.js';
import { defaultHome } from '../registry.js';
import { makeHome } from '../home.js';
import { currentRequest } from '../engine/request.js';

export interface TrustedKey {
  id: string;
  /** "self" for this node's key, else the name it was imported under. */
  name: string;
  key: KeyObject;
  file: string;
}

/** The signer of an image, as far as this node can tell. */
export interface Signer {
  keyId: string;
  /** Set when the key is trusted here and the signature is good. */
  trusted?: TrustedKey;
  /** Why it is not trusted, when it is not. */
  problem?: string;
}

const KEY_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
/** Key files are a few hundred bytes; anything larger is not one. */
const MAX_KEY_FILE = 4096;

export const keysDir = (home = defaultHome()) => join(home, 'keys');
const selfKeyPath = (home: string) => join(keysDir(home), 'self.key');
const trustedDir = (home: string) => join(keysDir(home), 'trusted');

export function keyId(key: KeyObject): string {
  const pub = key.type === 'private' ? createPublicKey(key) : key;
  return createHash('sha256').update(pub.export({ type: 'spki', format: 'der' })).digest('hex').slice(0, 16);
}

/** A directory of keys must be ours and writable by no one else: whoever
 * can add a file there decides what this node trusts. */
function checkPrivate(path: string, what: string): void {
  const st = statSync(path);
  const uid = process.geteuid?.() ?? 0;
  if (st.uid !== uid || st.mode & 0o022)
    throw new AppshotError(`${path} (${what}) must belong to uid ${uid} and be writable by it alone (chmod go-w ${path})`);
}

/** A key file decides what this node trusts, as its directory does: its
 * owner must be the user reading it, or root. Mode bits alone say nothing
 * of a file another user owns there (made before a chown of the home, or
 * a hard link of theirs), whose owner may chmod it back at will (r344 #9). */
function checkKeyOwner(file: string, owner: number): void {
  const uid = process.geteuid?.() ?? 0;
  if (owner !== uid && owner !== 0) throw new AppshotError(`${file} belongs to uid ${owner}, not to uid ${uid} or root: a key file is trusted only from its user (chown ${uid} ${file})`);
}

function ensureKeysDir(home: string): void {
  makeHome(home);
  mkdirSync(trustedDir(home), { recursive: true, mode: 0o700 });
  checkPrivate(keysDir(home), 'the keys directory');
  checkPrivate(trustedDir(home), 'the trusted keys directory');
}

/** Reads a small key file without following a symlink. */
function readKeyFile(path: string): string {
  const fd = openSync(path, fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK);
  try {
    const st = fstatSync(fd);
    if (!st.isFile() || st.size > MAX_KEY_FILE) throw new AppshotError(`${path} is not a key file`);
    return readFileSync(fd, 'utf8');
  } finally {
    closeSync(fd);
  }
}

/** Key files already parsed, by path, kept while the file holds the same
 * bytes (read again every time: a key is a hundred bytes, and a file's
 * times and inode can come back the same after it was replaced): a
 * resident engine or serve checks a signature for every image it
 * restores, and parsing a PEM key costs more than the check itself. The
 * checks of who may write the key and its directory are made every time. */
const parsedKeys = new Map<string, { text: string; parsed: unknown }>();

/** Reads and parses a key file without following a symlink, or returns
 * what the same bytes parsed to before. */
function readParsedKey<T>(path: string, parse: (pem: string) => T): T {
  const text = readKeyFile(path);
  const kept = parsedKeys.get(path);
  if (kept?.text === text) return kept.parsed as T;
  const parsed = parse(text);
  parsedKeys.set(path, { text, parsed });
  return parsed;
}

/** Reads this node's signing key: undefined if it has none yet. Its
 * public half and id come with it. */
function readSelfKey(home: string): (TrustedKey & { publicKey: KeyObject }) | undefined {
  const file = selfKeyPath(home);
  let parsed: { key: KeyObject; publicKey: KeyObject; id: string };
  try {
    parsed = readParsedKey(file, (pem) => {
      let key: KeyObject;
      try {
        key = createPrivateKey(pem);
      } catch {
        throw new AppshotError(`${file} does not hold a private key`);
      }
      if (key.asymmetricKeyType !== 'ed25519') throw new AppshotError(`${file} is not an Ed25519 key`);
      return { key, publicKey: createPublicKey(key), id: keyId(key) };
    });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
  checkPrivate(keysDir(home), 'the keys directory');
  const st = lstatSync(file);
  checkKeyOwner(file, st.uid);
  if (st.mode & 0o077) throw new AppshotError(`${file} is readable by others than its owner: chmod 600 ${file}`);
  return { id: parsed.id, name: 'self', key: parsed.key, publicKey: parsed.publicKey, file };
}

/** This node's signing key, made at first use. Written under a temporary
 * name and linked into place, so that two first uses at once agree on one
 * key and no reader ever sees half a key. */
export function selfKey(home = defaultHome()): TrustedKey {
  ensureKeysDir(home);
  const existing = readSelfKey(home);
  if (existing) return existing;
  const file = selfKeyPath(home);
  const { privateKey } = generateKeyPairSync('ed25519');
  const tmp = `${file}.new-${uniqueTag()}`;
  writeFileSync(tmp, privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600, flag: 'wx' });
  try {
    linkSync(tmp, file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
  } finally {
    rmSync(tmp, { force: true });
  }
  return readSelfKey(home)!;
}

function parsePublicKey(text: string, source: string): KeyObject {
  let key: KeyObject;
  try {
    key = createPublicKey(text);
  } catch {
    throw new AppshotError(`${source} is not a public key (appshot key export writes one)`, ExitCode.usage);
  }
  if (key.asymmetricKeyType !== 'ed25519') throw new AppshotError(`${source} is not an Ed25519 key`, ExitCode.usage);
  return key;
}

/** Every key this node trusts: its own and the imported ones. Reading
 * them makes nothing: a node that never signed has no key of its own yet. */
export function trustedKeys(home = defaultHome()): TrustedKey[] {
  const keys: TrustedKey[] = [];
  const self = readSelfKey(home);
  if (self) keys.push({ id: self.id, name: self.name, key: self.publicKey, file: self.file });
  if (!existsSync(trustedDir(home))) return keys;
  checkPrivate(trustedDir(home), 'the trusted keys directory');
  for (const f of readdirSync(trustedDir(home)).sort()) {
    if (!f.endsWith('.pub')) continue;
    const file = join(trustedDir(home), f);
    const st = lstatSync(file);
    checkKeyOwner(file, st.uid);
    if (st.mode & 0o022) throw new AppshotError(`${file} is writable by others than its owner: chmod go-w ${file}`);
    const { key, id } = readParsedKey(file, (pem) => {
      const key = parsePublicKey(pem, file);
      return { key, id: keyId(key) };
    });
    keys.push({ id, name: f.slice(0, -4), key, file });
  }
  return keys;
}

/** Signs what `content(keyId)` returns (the encoding of a manifest or
 * template naming this key, with its signature field empty): the key id is
 * signed too. `domain` keeps a manifest's signature from passing as a
 * template's. */
export function signWithSelf(domain: string, content: (keyId: string) => Buffer, home = defaultHome()): { signature: Buffer; keyId: string } {
  const self = selfKey(home);
  return { signature: sign(null, Buffer.concat([Buffer.from(domain + '\0'), content(self.id)]), self.key), keyId: self.id };
}

export function checkSignature(domain: string, data: Buffer, signature: Buffer, id: string, home = defaultHome()): Signer {
  if (!signature.length) return { keyId: '', problem: 'it is not signed' };
  const key = trustedKeys(home).find((k) => k.id === id);
  if (!key) return { keyId: id, problem: `it is signed by key ${id || '(none named)'}, which this node does not trust` };
  const ok = signature.length === 64 && verify(null, Buffer.concat([Buffer.from(domain + '\0'), data]), key.key, signature);
  if (!ok) return { keyId: id, problem: `its signature by key ${id} does not match its contents (modified after it was signed?)` };
  return { keyId: id, trusted: key };
}

/** --trust-image: the user vouches for the images this command reads. Set
 * by the CLI for the one command it runs: the process's in a CLI process,
 * the request's in the engine (never the next command's). */
let trustedExplicitly = false;
export function trustImagesExplicitly(): void {
  const r = currentRequest();
  if (r) r.trustImages = true;
  else trustedExplicitly = true;
}
export const imagesTrustedExplicitly = () => currentRequest()?.trustImages ?? trustedExplicitly;

export const untrustedHint = 'if you trust it, run again with --trust-image, or trust the key of the node that made it (appshot key import FILE)';

// `appshot key ...`

/** Whether `key` (a Signer's trusted key) is this node's own: the one
 * trustedKeys read from self.key, whatever a key was imported as. */
export function isOwnKey(key: TrustedKey, home = defaultHome()): boolean {
  return key.file === selfKeyPath(home);
}

export function exportKey(home = defaultHome()): string {
  return createPublicKey(selfKey(home).key).export({ type: 'spki', format: 'pem' }).toString();
}

export function importKey(file: string, name: string | undefined, home = defaultHome()): TrustedKey {
  let text: string;
  try {
    text = readKeyFile(file);
  } catch (e) {
    if (e instanceof AppshotError) throw e;
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new AppshotError(`no such file: ${file}`, ExitCode.notFound);
    throw new AppshotError(`cannot read ${file}: ${code}`, ExitCode.notFound);
  }
  const key = parsePublicKey(text, file);
  const id = keyId(key);
  ensureKeysDir(home);
  const known = trustedKeys(home).find((k) => k.id === id);
  if (known) throw new AppshotError(`key ${id} is trusted already (as ${known.name})`, ExitCode.conflict);
  const label = name ?? id;
  if (!KEY_NAME.test(label)) throw new AppshotError(`'${label}' cannot name a key: letters, digits, '_', '.', '-'`, ExitCode.usage);
  // What this node's own key is called wherever keys are listed: another
  // node's key under that name would pass for this node's.
  if (label === 'self') throw new AppshotError(`'self' names this node's own key: import the key under another name`, ExitCode.usage);
  const dest = join(trustedDir(home), `${label}.pub`);
  try {
    writeFileSync(dest, key.export({ type: 'spki', format: 'pem' }), { mode: 0o644, flag: 'wx' });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') throw new AppshotError(`a key named '${label}' is trusted already`, ExitCode.conflict);
    throw e;
  }
  return { id, name: label, key, file: dest };
}
