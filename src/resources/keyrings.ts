/**
 * A process's session keyring (keyrings(7)): the one pam_keyinit gives
 * every sshd or login session, or `keyctl session` makes, and the keys
 * linked in it. A restored process would otherwise find its user's
 * default session keyring instead (`_uid_ses.UID`, shared by every
 * process of that user with none of its own), its keys gone and whatever
 * it adds seen by all of them.
 *
 * Only the process can name its session keyring (KEY_SPEC_SESSION_KEYRING)
 * and it alone possesses it: it is described and read by calls injected
 * into it. At restore the process that had one joins a new anonymous one
 * before its children are forked, so that those that shared it share the
 * new one; its keys are added again from inside it once its memory is in
 * place, then owners and permissions set as they were.
 *
 * Carried: an anonymous session keyring (named `_ses`, as the kernel names
 * them) holding keys of type "user" of up to PAYLOAD_MAX bytes, and links
 * to users' keyrings (`_uid.UID`, which pam_keyinit links in), made again. A named
 * one is refused at snapshot: joining it by name at restore would join
 * whichever keyring of that name the restorer may search. So are other
 * key types (a "logon" key cannot be read back, a keyring in it would
 * need a walk; a keyring named `_uid.UID` that is not that user's keyring
 * is one), a process without a session keyring of its own whose parent
 * has one (a forked child would inherit the parent's at restore), a
 * thread whose session keyring is not its main thread's (threads made at
 * restore inherit the main thread's; one in the main thread's with
 * credentials of its own is carried, its credentials set after), and processes that share one but
 * not through their parents (forks cannot make that sharing again).
 */
import type { Key, Process, SessionKeyring } from '../image/types.js';
import type { Answer, CallQueue } from '../ptrace/queries.js';
import type { NamedCall, RemoteProcess } from '../ptrace/remote.js';
import { errnoName } from '../errors.js';
import { Unsupported } from './context.js';

const NR_ADD_KEY = 248;
const NR_KEYCTL = 250;
const KEYCTL_GET_KEYRING_ID = 0;
const KEYCTL_JOIN_SESSION_KEYRING = 1;
const KEYCTL_CHOWN = 4;
const KEYCTL_SETPERM = 5;
const KEYCTL_DESCRIBE = 6;
const KEYCTL_LINK = 8;
const KEYCTL_READ = 11;
const KEY_SPEC_USER_KEYRING = -4;
const KEY_SPEC_USER_SESSION_KEYRING = -5;
const NR_SETREUID = 113;
const KEY_SPEC_SESSION_KEYRING = -3;
const NR_GETRESUID = 118;
const NR_SETRESUID = 117;
const NR_CAPGET = 125;
const LINUX_CAPABILITY_VERSION_3 = 0x20080522;
/** The name the kernel gives an anonymous session keyring. */
const ANONYMOUS = '_ses';
/** A key's payload carried at most (the injector's buffer, without batches). */
export const PAYLOAD_MAX = 480;
/** Keys in one keyring carried at most (their serials in one read). */
export const KEYS_MAX = 60;
const DESCRIBE_MAX = 256;
const ENOSYS = 38n;
const EPERM = 1n;
const EDQUOT = 122n;
const EKEYEXPIRED = 127n;
const EKEYREVOKED = 128n;

export interface KeyringAsked {
  id: Answer;
  describe: Answer;
  list: Answer;
  /** Each thread's session keyring and its user's default one (their
   * serials), the main thread first. */
  threadRings: { session: Answer; userDefault: Answer }[];
  /** The main thread's real, effective and saved uids (three u32). */
  resuid: Answer;
  /** Its capabilities (a v3 header, then two u32 triples). */
  caps: Answer;
  /** For the keys' questions, asked once these are answered. */
  calls: CallQueue;
}

/** `tids`: the process's threads, the main one first. */
export function askSessionKeyring(calls: CallQueue, tids: readonly number[]): KeyringAsked {
  const capHeader = Buffer.alloc(8 + 24);
  capHeader.writeUInt32LE(LINUX_CAPABILITY_VERSION_3, 0);
  return {
    // Without creating one: a process with none is answered with its
    // user's default session keyring.
    id: calls.ask(NR_KEYCTL, [KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0]),
    describe: calls.ask(NR_KEYCTL, [KEYCTL_DESCRIBE, KEY_SPEC_SESSION_KEYRING, 'buf', DESCRIBE_MAX], { outLength: DESCRIBE_MAX }),
    list: calls.ask(NR_KEYCTL, [KEYCTL_READ, KEY_SPEC_SESSION_KEYRING, 'buf', KEYS_MAX * 4], { outLength: KEYS_MAX * 4 }),
    // A thread's session keyring is its own credentials': one thread can
    // join another (review 245: only the main thread's was looked at).
    // One with none of its own is answered with its user's default (of
    // its real uid: threads of other users have other defaults).
    threadRings: tids.map((tid) => ({
      session: calls.ask(NR_KEYCTL, [KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0], { tid }),
      userDefault: calls.ask(NR_KEYCTL, [KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_SESSION_KEYRING, 0], { tid }),
    })),
    resuid: calls.ask(NR_GETRESUID, ['buf', { bufAt: 4 }, { bufAt: 8 }], { outLength: 12 }),
    caps: calls.ask(NR_CAPGET, ['buf', { bufAt: 8 }], { input: capHeader }),
    calls,
  };
}

/** "type;uid;gid;perm;description", as KEYCTL_DESCRIBE writes it. */
function parseDescription(a: Answer, what: string): { type: string; uid: number; gid: number; perm: number; description: string } {
  if (a.ret < 0n) throw new Unsupported(`${what} cannot be described (${failed(a.ret)})`);
  if (a.ret > BigInt(a.out.length)) throw new Unsupported(`${what}'s description is ${a.ret} bytes, more than appshot reads (${a.out.length})`);
  const written = a.out.subarray(0, Number(a.ret));
  const nul = written.indexOf(0);
  const bytes = nul < 0 ? written : written.subarray(0, nul);
  const text = bytes.toString('utf8');
  // Kept as text in the image: bytes that are not UTF-8 would come back
  // changed (U+FFFD), a key of another name (review 245).
  if (!Buffer.from(text, 'utf8').equals(bytes)) throw new Unsupported(`${what}'s description is not UTF-8 text, which cannot be captured yet`);
  const m = /^([^;]*);(\d+);(\d+);([0-9a-f]{8});(.*)$/s.exec(text);
  if (!m) throw new Unsupported(`${what}'s description cannot be read: ${JSON.stringify(text)}`);
  return { type: m[1], uid: Number(m[2]), gid: Number(m[3]), perm: parseInt(m[4], 16), description: m[5] };
}

/** A call's negative result in words. */
const failed = (ret: bigint) => errnoName(Number(-ret));

/** The process's session keyring, if it has one of its own; undefined if
 * its user's default, or the keyring of the session that ran the
 * application (`launched`: AppRecord.launchKeyring) holding nothing but
 * links to users' keyrings. `who`: the process, as messages name it. */
export function dumpSessionKeyring(asked: KeyringAsked, who: string, launched?: number): SessionKeyring | undefined {
  const what = `${who}'s session keyring`;
  // Threads made at restore inherit the main thread's session keyring
  // (or its lack of one): a thread that joined another would come back
  // in the main thread's.
  const own = (t: { session: Answer; userDefault: Answer }) => (t.session.ret >= 0n && t.session.ret === t.userDefault.ret ? undefined : t.session.ret);
  const ownText = (ret: bigint | undefined) => (ret === undefined ? 'none of its own' : ret < 0n ? failed(ret) : `serial ${ret}`);
  const [main, ...others] = asked.threadRings;
  // A thread in the main thread's very keyring (one serial) is in it
  // whatever its credentials: one that took another uid by a raw
  // setresuid (its own credentials, carried per thread) keeps the
  // keyring, which is then not its new uid's default, while the main
  // thread's may be its own uid's (root's `_uid_ses.0`, installed by a
  // first look at it and inherited): not a keyring of its own (hunt 313
  // refused such a thread so). Made at restore from the main thread, it
  // inherits the main thread's keyring and keeps it through its
  // credentials, as it did.
  const sharesMain = (t: { session: Answer }) => t.session.ret >= 0n && t.session.ret === main.session.ret;
  const apart = others.find((t) => !sharesMain(t) && own(t) !== own(main));
  if (apart) throw new Unsupported(`a thread of ${who} has a session keyring (${ownText(own(apart))}) other than its main thread's (${ownText(own(main))}), which cannot be captured yet`);
  // A kernel without keyrings; or a session keyring revoked or expired
  // (pam_keyinit's "revoke" when the session that started a daemon
  // closed): nothing to carry, and a restored process finds its user's
  // default one.
  // EPERM: a seccomp filter answers keyctl so (Docker's default profile
  // does), and the process, and its children under the same filter, can
  // never use a keyring (review 245: every such snapshot failed).
  if (asked.id.ret === -ENOSYS || asked.id.ret === -EKEYEXPIRED || asked.id.ret === -EKEYREVOKED || asked.id.ret === -EPERM) return undefined;
  if (asked.id.ret < 0n) throw new Unsupported(`${what} cannot be found (${failed(asked.id.ret)})`);
  const ring = parseDescription(asked.describe, what);
  // Its user's default: what a restored process of that user finds.
  if (/^_uid_ses\.\d+$/.test(ring.description)) return undefined;
  if (ring.description !== ANONYMOUS) throw new Unsupported(`${what} is the named keyring '${ring.description}', which cannot be captured yet (only an anonymous one, as pam_keyinit makes)`);
  const list = asked.list;
  if (list.ret < 0n) throw new Unsupported(`${what} cannot be read (${failed(list.ret)})`);
  if (list.ret > BigInt(list.out.length)) throw new Unsupported(`${what} holds ${list.ret / 4n} keys, more than appshot carries (${KEYS_MAX})`);
  const serials = Array.from({ length: Number(list.ret) / 4 }, (_, i) => list.out.readInt32LE(i * 4));
  const questions = serials.map((serial) => ({
    describe: asked.calls.ask(NR_KEYCTL, [KEYCTL_DESCRIBE, serial, 'buf', DESCRIBE_MAX], { outLength: DESCRIBE_MAX }),
    read: asked.calls.ask(NR_KEYCTL, [KEYCTL_READ, serial, 'buf', PAYLOAD_MAX], { outLength: PAYLOAD_MAX }),
  }));
  if (questions.length) asked.calls.run();
  const keys: Key[] = questions.map((q, i) => {
    const key = parseDescription(q.describe, `key ${serials[i]} in ${what}`);
    const named = `key '${key.description}' (${key.type}) in ${what}`;
    // A user's own keyring, linked in by pam_keyinit: linked again, never
    // copied (it is that user's, the host's).
    if (isUserKeyringLink(key)) return { ...key, payload: Buffer.alloc(0) };
    if (key.type !== 'user') throw new Unsupported(`${named}: only keys of type "user" can be captured yet`);
    if (q.read.ret < 0n) throw new Unsupported(`${named} cannot be read (${failed(q.read.ret)})`);
    if (q.read.ret > BigInt(PAYLOAD_MAX)) throw new Unsupported(`${named} holds ${q.read.ret} bytes, more than appshot carries (${PAYLOAD_MAX})`);
    return { ...key, payload: Buffer.from(q.read.out.subarray(0, Number(q.read.ret))) };
  });
  // The keyring of the login session the application was run from (as
  // pam_keyinit makes one for every ssh login, with its user's keyring
  // linked in) is that session's, as its terminal is: a daemon that made
  // itself nobody there holds root's keyring, which no restore should
  // give it, and which its snapshot was refused for. It is not carried: a
  // restored application's first processes join a new, empty keyring. A
  // launch keyring holding keys is carried (or refused) as any other, so
  // that none of its keys is dropped unsaid.
  // Its links told from keyrings of their names first: one the
  // application made and named `_uid.N` holds keys of its own, which
  // leaving the launch keyring out would drop unsaid (review r256).
  const untold = checkUserKeyringLinks(asked, serials, keys, what);
  if (launched !== undefined && Number(asked.id.ret) === launched && keys.every(isUserKeyringLink)) return undefined;
  const recorded = { serial: Number(asked.id.ret), description: ring.description, uid: ring.uid, gid: ring.gid, perm: ring.perm, keys };
  if (untold) untoldLinks.set(recorded, untold);
  return recorded;
}

/** Keyrings of this snapshot holding a `_uid.UID` keyring the process that
 * read them could not tell from that user's keyring, and why: refused by
 * keyringTreeFault only where the process makes it at restore. One that
 * inherits it (a nobody worker in its root master's keyring, which links
 * root's user keyring) has it made by its ancestor, which tells. */
const untoldLinks = new WeakMap<SessionKeyring, string>();

/**
 * Whether each keyring named `_uid.UID` in the session keyring is that
 * user's keyring, which the restore links again, or a keyring of that
 * name the process made itself (`keyctl newring _uid.0 @s`), which would
 * come back as the user's keyring, its own keys lost (review 245):
 * refused, as a keyring in it is. Told apart by serial, from inside the
 * process: KEY_SPEC_USER_KEYRING is the keyring of the calling thread's
 * real uid. For another uid (sshd's monitor, root, links the keyring of
 * the user logging in) the main thread takes it as its real uid for the
 * question and back, only where that cannot fail nor cost it anything:
 * its effective uid root (kept, so no capability is dropped) with
 * CAP_SETUID in effect. Else it cannot be told: why, returned (refused
 * by name where this process makes the keyring at restore).
 */
function checkUserKeyringLinks(asked: KeyringAsked, serials: number[], keys: Key[], what: string): string | undefined {
  const links = keys.flatMap((k, i) => (isUserKeyringLink(k) ? [{ uid: Number(k.description.slice('_uid.'.length)), serial: serials[i], name: k.description }] : []));
  if (!links.length) return undefined;
  if (asked.resuid.ret < 0n) return `${what}: the user keyrings linked in cannot be told from keyrings of their name (getresuid: ${failed(asked.resuid.ret)})`;
  const [ruid, euid] = [asked.resuid.out.readUInt32LE(0), asked.resuid.out.readUInt32LE(4)];
  const setuidInEffect = asked.caps.ret === 0n && ((asked.caps.out.readUInt32LE(8) >>> 7) & 1) === 1;
  const calls = asked.calls;
  const questions = links.map((l): { uid: number; serial: number; name: string; ring?: Answer; took?: Answer; back?: Answer } => {
    if (l.uid === ruid) return { ...l, ring: calls.ask(NR_KEYCTL, [KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0]) };
    if (euid !== 0 || !setuidInEffect) return { ...l };
    const took = calls.ask(NR_SETRESUID, [l.uid, -1, -1]);
    const ring = calls.ask(NR_KEYCTL, [KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0]);
    return { ...l, took, ring, back: calls.ask(NR_SETRESUID, [ruid, -1, -1]) };
  });
  calls.run();
  let untold: string | undefined;
  for (const q of questions) {
    if (q.back && q.back.ret !== 0n) throw new Error(`${what}: taking back real uid ${ruid} after looking up the keyring of uid ${q.uid} failed (${failed(q.back.ret)})`);
    if (!q.ring || (q.took && q.took.ret !== 0n)) {
      untold ??= `${what} holds a keyring '${q.name}' that cannot be told from the keyring of uid ${q.uid} (the process neither runs as that uid nor as root with CAP_SETUID), which cannot be captured yet`;
      continue;
    }
    if (q.ring.ret !== BigInt(q.serial)) throw new Unsupported(`${what} holds a keyring named '${q.name}' that is not the keyring of uid ${q.uid} (serial ${q.serial}, not ${q.ring.ret}): only keys of type "user" can be captured yet`);
  }
  return untold;
}

/** A link to a user's keyring (`_uid.UID`), as pam_keyinit makes in
 * every session keyring. */
const isUserKeyringLink = (k: Pick<Key, 'type' | 'description'>) => k.type === 'keyring' && /^_uid\.\d+$/.test(k.description);

/**
 * Whether the process gets a new session keyring where its tree is made,
 * before its children are forked: it had one and its parent (if in the
 * image) had not the same.
 */
export function joinsSessionKeyring(p: Process, parent: Process | undefined): boolean {
  const own = p.sessionKeyring;
  const parents = parent?.sessionKeyring;
  // (None of its own under a parent with one: refused by keyringTreeFault.)
  if (!own) return false;
  return !parents || parents.serial !== own.serial;
}

/** A new anonymous session keyring for the process (no memory needed:
 * its children forked after share it). `needed`: the image records one
 * (its owner set by fillSessionKeyring); otherwise a kernel without
 * keyrings (ENOSYS) or a filter that refuses keyctl (EPERM) leaves the
 * process none to leak, and is no failure, and the new one is given to
 * the process's real ids (`creds`), as the kernel gives one the process
 * joins itself: made by the seed, it was the restorer's, root's in a
 * nobody process, which its next snapshot refuses (an owner it could not
 * have given). A restorer that may not give it away, or a user whose key
 * quota is full, leaves it the restorer's, as before. */
export function joinNewSessionKeyring(r: RemoteProcess, needed: boolean, creds: { uid: number[]; gid: number[] }): void {
  if (needed) {
    r.call('joining a new session keyring', NR_KEYCTL, [KEYCTL_JOIN_SESSION_KEYRING, 0]);
    return;
  }
  const ret = r.raw(NR_KEYCTL, [KEYCTL_JOIN_SESSION_KEYRING, 0]);
  if (ret < 0n && ret > -4096n && ret !== -ENOSYS && ret !== -EPERM) throw new Error(`joining a new session keyring: ${failed(ret)}`);
  if (ret < 0n) return;
  seedsJoinKeyrings = true;
  const given = r.raw(NR_KEYCTL, [KEYCTL_CHOWN, KEY_SPEC_SESSION_KEYRING, creds.uid[0], creds.gid[0]]);
  if (given < 0n && given !== -EPERM && given !== -EDQUOT) throw new Error(`giving the new session keyring to ${creds.uid[0]}:${creds.gid[0]}: ${failed(given)}`);
}

/** A seed of this restorer has joined a new session keyring: then every
 * seed can (the same kernel, and the same seccomp filters, the
 * restorer's own, which a process can add to but never lift), and a join
 * can no longer fail with the ENOSYS or EPERM that joinNewSessionKeyring
 * lets pass. */
let seedsJoinKeyrings = false;

/**
 * joinNewSessionKeyring's calls, when they can wait for the process's next
 * stop (RemoteProcess.defer: its memory's first batch), one stop fewer:
 * where the image records a keyring (the call that fails fails the
 * restore either way), or where the join is known to work here
 * (seedsJoinKeyrings) and the keyring it makes is its owner's already
 * (the process's real ids are the restorer's: the kernel gives a new
 * session keyring its maker's real uid and gid, not its effective ones
 * (install_session_keyring_to_cred), so `restorer` is the real ids (review
 * r295): the KEYCTL_CHOWN would change nothing). Undefined: they run
 * now (joinNewSessionKeyring). The caller defers them only where nothing
 * the process does before that stop inherits the keyring (no thread made,
 * no child forked).
 */
export function sessionKeyringJoinLater(needed: boolean, creds: { uid: number[]; gid: number[] }, restorer: { uid: number; gid: number }): NamedCall[] | undefined {
  const join: NamedCall = { what: 'joining a new session keyring', nr: NR_KEYCTL, args: [KEYCTL_JOIN_SESSION_KEYRING, 0] };
  if (needed) return [join];
  return seedsJoinKeyrings && creds.uid[0] === restorer.uid && creds.gid[0] === restorer.gid ? [join] : undefined;
}

/**
 * Fills the session keyring the process joined (joinNewSessionKeyring)
 * from inside it: its keys, then each key's and the keyring's owner and
 * permissions (last: a permission without the possessor's "setattr" would
 * stop the next change). Needs the process's scratch memory.
 */
export function fillSessionKeyring(r: RemoteProcess, ring: SessionKeyring, restorer: { uid: number; gid: number; realUid: number }): void {
  r.reset();
  const calls = r.batch();
  const owned = (serialCall: number | bigint, uid: number, gid: number, perm: number, what: string, from?: number) => {
    if (uid !== restorer.uid || gid !== restorer.gid) calls.add(`giving ${what} to ${uid}:${gid}`, NR_KEYCTL, [KEYCTL_CHOWN, serialCall, uid, gid], from === undefined ? undefined : { call: from, arg: 1 });
    calls.add(`setting ${what}'s permissions to ${perm.toString(16).padStart(8, '0')}`, NR_KEYCTL, [KEYCTL_SETPERM, serialCall, perm], from === undefined ? undefined : { call: from, arg: 1 });
  };
  for (const k of ring.keys) {
    if (isUserKeyringLink(k)) {
      // KEY_SPEC_USER_KEYRING is the keyring of the caller's real uid: the
      // seed's (the restorer's) taken for a while as that user's where it
      // differs (its credentials are set whole later). Its owner and
      // permissions are that user's keyring's own, left as they are.
      const uid = Number(k.description.slice('_uid.'.length));
      // (The real uid, which KEY_SPEC_USER_KEYRING follows, not the
      // effective one that owns what the seed makes.)
      if (uid !== restorer.realUid) calls.add(`taking uid ${uid} as real uid to link its keyring`, NR_SETREUID, [uid, -1]);
      calls.add(`linking the keyring of uid ${uid} into the session keyring`, NR_KEYCTL, [KEYCTL_LINK, KEY_SPEC_USER_KEYRING, KEY_SPEC_SESSION_KEYRING]);
      if (uid !== restorer.realUid) calls.add('taking back the real uid', NR_SETREUID, [restorer.realUid, -1]);
      continue;
    }
    const what = `key '${k.description}'`;
    const added = calls.add(`adding ${what} to the session keyring`, NR_ADD_KEY, [r.str(k.type), r.str(k.description), r.put(k.payload.length ? k.payload : Buffer.alloc(1)), k.payload.length, KEY_SPEC_SESSION_KEYRING]);
    owned(0, k.uid, k.gid, k.perm, what, added);
  }
  owned(KEY_SPEC_SESSION_KEYRING, ring.uid, ring.gid, ring.perm, 'the session keyring');
  calls.run();
}

const CAP_SETUID = 7n;
const CAP_SYS_ADMIN = 21n;

/** What a process of an image could do with keyrings itself, any thread's
 * credentials counted: the user and group ids it runs with (real,
 * effective, saved, filesystem; groups), and whether it holds CAP_SETUID
 * (it could take any uid and link that user's keyring) or CAP_SYS_ADMIN
 * (it could give a key to any owner, KEYCTL_CHOWN) in its permitted set.
 * Not uid 0 alone: without those capabilities root can do neither
 * (review 245). */
export interface KeyringRights {
  uids: Set<number>;
  gids: Set<number>;
  anyUser: boolean;
  anyOwner: boolean;
}

export function keyringRights(p: Process): KeyringRights {
  const all = [p.creds, ...p.threads.map((t) => t.creds).filter((c) => c !== undefined)];
  const holds = (cap: bigint) => all.some((c) => (c.capPrm >> cap) & 1n);
  return {
    uids: new Set(all.flatMap((c) => c.uid)),
    gids: new Set(all.flatMap((c) => [...c.gid, ...c.groups])),
    anyUser: holds(CAP_SETUID),
    anyOwner: holds(CAP_SYS_ADMIN),
  };
}

/** Permission bits a key can have (possessor, user, group, other: six
 * each). */
const PERM_BITS = 0x3f3f3f3f;

/** An image's session keyring as a restore can make it, else why not
 * (validate.ts: an image is untrusted input). `rights`: those of the
 * process that makes it at restore (joinsSessionKeyring); undefined for
 * one it inherits, whose owners and links are its ancestor's, checked
 * with that one's rights (a nobody worker of a root master in root's
 * session keyring). A link to a user's keyring
 * must be to one of the process's own users' (review of servers36: root
 * restoring an image whose nobody process linked `_uid.0` would have
 * handed it root's user keyring, and its keys); an owner, one of the
 * process's ids, root among the others (review 245: a nobody process got
 * back a key of root's; pam_keyinit makes the session keyring with the
 * user's uid as its real one, so the user owns it); anything a process
 * holding CAP_SETUID (links) or CAP_SYS_ADMIN (owners) could have made
 * itself. */
export function keyringFault(ring: SessionKeyring, rights?: KeyringRights): string | undefined {
  if (ring.description !== ANONYMOUS) return `a session keyring named ${JSON.stringify(ring.description.slice(0, 40))}`;
  if (ring.keys.length > KEYS_MAX) return `${ring.keys.length} keys in its session keyring (at most ${KEYS_MAX})`;
  const ownerFault = (what: string, uid: number, gid: number, perm: number) => {
    if ((perm & ~PERM_BITS) !== 0) return `${what} with permissions ${(perm >>> 0).toString(16)}, which no key has`;
    if (rights && !rights.anyOwner && (!rights.uids.has(uid) || !rights.gids.has(gid))) return `${what} owned by ${uid}:${gid}, ids the process does not have`;
    return undefined;
  };
  const ringOwner = ownerFault('a session keyring', ring.uid, ring.gid, ring.perm);
  if (ringOwner) return ringOwner;
  for (const k of ring.keys) {
    if (isUserKeyringLink(k)) {
      const uid = Number(k.description.slice(5));
      if (k.payload.length || !(uid <= 0xfffffffe)) return 'a link to a user keyring with a payload or no such uid';
      if (rights && !rights.anyUser && !rights.uids.has(uid)) return `a link to the keyring of uid ${uid}, which the process does not run as`;
      continue;
    }
    const owner = ownerFault(`key '${k.description.slice(0, 40)}'`, k.uid, k.gid, k.perm);
    if (owner) return owner;
    if (k.type !== 'user') return `a key of type ${JSON.stringify(k.type.slice(0, 40))}`;
    // The snapshot reads descriptions of DESCRIBE_MAX bytes at most (with
    // the type and ids before them): a longer one is no image of ours, and
    // 60 of 4095 bytes would not fit the restore's scratch memory.
    if (!k.description || k.description.includes('\0') || Buffer.byteLength(k.description) > DESCRIBE_MAX) return 'a key description that is empty, holds a NUL or is too long';
    if (!k.payload.length || k.payload.length > PAYLOAD_MAX) return `a key of ${k.payload.length} bytes (1 to ${PAYLOAD_MAX})`;
  }
  return undefined;
}

/** Why the processes' session keyrings cannot be made again as they were,
 * or undefined. Checked at snapshot, so that such an application is left
 * running rather than ended into an image no restore takes (review 245),
 * and by validate.ts:
 * - a keyring a restore would refuse to make for the process that makes
 *   it (keyringFault: an owner that process could not have given, say, as
 *   a daemon started in root's session keyring and then become nobody
 *   has), or one holding a `_uid.UID` keyring that process could not tell
 *   from the user's (at snapshot only: what the snapshot learnt);
 * - a process without one of its own whose parent (in the image) has one
 *   would inherit its parent's at restore;
 * - processes sharing one (one serial) not through their parents: each
 *   would get one of its own (a process that had one joins a new one
 *   before it forks, and only its descendants inherit it). */
export function keyringTreeFault(processes: readonly Process[]): string | undefined {
  const byVpid = new Map(processes.map((p) => [p.vpid, p]));
  /** The process whose new keyring p has at restore (joinsSessionKeyring). */
  const joiner = (p: Process): Process => {
    let at = p;
    // (Bounded: a loop of parents in a crafted image.)
    for (let steps = 0; steps < processes.length; steps++) {
      const parent = byVpid.get(at.vppid);
      if (!parent || joinsSessionKeyring(at, parent)) return at;
      at = parent;
    }
    return at;
  };
  const made = new Map<number, Process>();
  for (const p of processes) {
    const parent = byVpid.get(p.vppid);
    if (!p.sessionKeyring && parent?.sessionKeyring) return `process ${p.vpid} has no session keyring of its own while its parent ${parent.vpid} has one, which a restore cannot make yet`;
    if (!p.sessionKeyring) continue;
    const by = joiner(p);
    // (validate.ts checked the rest of each one already, as the snapshot
    // did while reading it.)
    const fault = by === p ? keyringFault(p.sessionKeyring, keyringRights(p)) : undefined;
    if (fault) return `process ${p.vpid} has ${fault}`;
    const untold = by === p ? untoldLinks.get(p.sessionKeyring) : undefined;
    if (untold) return untold;
    const other = made.get(p.sessionKeyring.serial);
    if (other && other !== by) return `processes ${other.vpid} and ${by.vpid} share a session keyring (serial ${p.sessionKeyring.serial}) not inherited from a parent they share it with, which a restore cannot make yet`;
    made.set(p.sessionKeyring.serial, by);
  }
  return undefined;
}
