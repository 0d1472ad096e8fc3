/**
 * A private /tmp for an application (`appshot run --private-tmp`), as
 * systemd's PrivateTmp= gives a service one: an implicit REDIR PATH rule
 * "/tmp" TO a directory made for it alone. Programs that name files in
 * /tmp after their own PID (the JVM's hsperfdata and attach socket) meet
 * no other application's there: every application's first process is
 * virtual PID 2, and every clone of a template has the template's PIDs.
 *
 * Where: `$APPSHOT_HOME/instances/AID.XXXXXXXX/tmp`, under the
 * application's directory of private copies (its record's privateRoot),
 * so that
 *  - no other user can make or steer it: the state directory is
 *    refused at start if another user can change it (home.ts), and the
 *    directory of private copies is made here, with a random name, by a
 *    mkdir that fails on anything already there;
 *  - `appshot rm` removes it with the record (registry.ts removeMany: a
 *    privateRoot of this home nobody else names), and a snapshot keeps
 *    it while its record is there (privateRootsStillNamed);
 *  - a snapshot carries the rule and the privateRoot (image.instance), so
 *    a restore runs on the same directory, and a template copies it
 *    (template.ts), so each of its clones starts from a copy of its own
 *    (rebasedRedirs).
 * It is not under /tmp: the rule's target would be redirected again (a
 * working directory in it, which getcwd answers as the kernel has it,
 * would be rewritten a second time).
 *
 * Mode: the private root 0711 (other users pass, but cannot list or add),
 * its tmp 01777 as /tmp: an application whose processes switch users
 * (nginx's workers, postgres) uses it as it would use /tmp. Those users
 * must also be able to pass the state directory (root's default,
 * /var/lib/appshot, is 0755).
 */
import { randomBytes } from 'node:crypto';
import { closeSync, constants as fsConstants, fchmodSync, fstatSync, lstatSync, mkdirSync, openSync } from 'node:fs';
import { join } from 'node:path';
import { AppshotError, errorText, ExitCode } from '../errors.js';
import { othersMayChange, ownership } from '../home.js';
import type { InstanceConfig } from '../native.js';

export const PRIVATE_TMP = '/tmp';

/** A new directory of private copies for `aid` in state directory `home`
 * (the shape registry.ts isPrivateRoot accepts). */
export function newPrivateRoot(home: string, aid: string): string {
  return join(home, 'instances', `${aid}.${randomBytes(4).toString('hex')}`);
}

/** The private /tmp under a directory of private copies. */
export const privateTmpOf = (privateRoot: string) => join(privateRoot, 'tmp');

/** Whether `dir` is /tmp or under it: a working directory there is the
 * real /tmp's, not the private one the application's paths lead to. */
export const underTmp = (dir: string) => dir === PRIVATE_TMP || dir.startsWith(`${PRIVATE_TMP}/`);

/** Whether a registered application runs with a private /tmp: its REDIR
 * PATH of /tmp leads into its directory of private copies. */
export function hasPrivateTmp(record: { privateRoot?: string; redirLeaves?: string[] }): boolean {
  return !!record.privateRoot && (record.redirLeaves ?? []).includes(privateTmpOf(record.privateRoot));
}

/** A rules file's REDIR PATH of /tmp itself cannot be kept with a private
 * /tmp (one of the two would be silently dropped): refused. A rule for a
 * path under /tmp is kept, and wins there (the longest `from` does). */
export function checkPrivateTmpRules(redirs: InstanceConfig['redirs']): void {
  const clash = redirs.find((r) => r.from === PRIVATE_TMP || r.from === `${PRIVATE_TMP}/`);
  if (clash) throw new AppshotError(`--private-tmp and the rules' REDIR PATH "${clash.from}" both redirect /tmp: use one of them`, ExitCode.usage);
}

/**
 * Makes `privateRoot` (which must not exist) and its tmp, and returns the
 * rule that leads /tmp there. The directory above (`instances`) is made
 * if needed and must be a directory only this user (or root) can change:
 * the private root is made in it by one mkdir, which never follows a
 * link or takes what someone put there.
 */
export function makePrivateTmp(privateRoot: string): InstanceConfig['redirs'][number] {
  const parent = join(privateRoot, '..');
  try {
    mkdirSync(parent, { recursive: true, mode: 0o755 });
    const st = lstatSync(parent);
    if (!st.isDirectory() || othersMayChange(st, false))
      throw new AppshotError(`${parent} is not a directory only you can change (${ownership(st)}): no private /tmp is made in it`);
    // Others pass (an application's processes of other users reach their
    // /tmp, also under a umask of 077) but cannot list the private roots.
    if (st.uid === (process.geteuid?.() ?? 0)) chmodDirectory(parent, 0o711);
    mkdirSync(privateRoot, { mode: 0o700 });
    const tmp = privateTmpOf(privateRoot);
    mkdirSync(tmp, { mode: 0o700 });
    // Modes set on what was made (mkdir's are cut by the umask), through
    // descriptors of those very directories.
    chmodDirectory(tmp, 0o1777);
    chmodDirectory(privateRoot, 0o711);
    return { kind: 'path', from: PRIVATE_TMP, to: tmp };
  } catch (e) {
    if (e instanceof AppshotError) throw e;
    throw new AppshotError(`cannot make a private /tmp in ${parent}: ${errorText(e)}`);
  }
}

/** A private /tmp that a restore made anew (its image's directory is not
 * on this node: makeRedirTargets made it with the umask's mode) gets
 * /tmp's mode, as makePrivateTmp gives it. `made`: the directories the
 * restore made; `privateRoot`: the image's directory of private copies,
 * only if it is one of this state directory's (registry.ts
 * isPrivateRoot). Only the tmp right under it is made /tmp-like: an image
 * is anyone's, and a rule of its leading /tmp to /root/.ssh or a
 * site-packages directory would otherwise have root make that directory
 * writable by everyone. */
export function privateTmpRemade(redirs: InstanceConfig['redirs'], made: { top: string; leaf: string }[], privateRoot: string | undefined): void {
  if (!privateRoot) return;
  const tmp = privateTmpOf(privateRoot);
  const m = made.find((d) => d.leaf === tmp);
  if (!m || !redirs.some((r) => r.kind === 'path' && r.from === PRIVATE_TMP && r.to === tmp)) return;
  chmodDirectory(tmp, 0o1777);
  // The directories above it that this restore made too, as
  // makePrivateTmp makes them (mkdir's modes were cut by the umask).
  if (m.top !== tmp) chmodDirectory(privateRoot, 0o711);
  if (!m.top.startsWith(`${privateRoot}/`) && m.top !== privateRoot) chmodDirectory(join(privateRoot, '..'), 0o711);
}

function chmodDirectory(path: string, mode: number): void {
  const fd = openSync(path, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY | fsConstants.O_NOFOLLOW);
  try {
    if (fstatSync(fd).uid !== (process.geteuid?.() ?? 0)) throw new AppshotError(`${path}, just made, is not yours: no private /tmp is made`);
    fchmodSync(fd, mode);
  } finally {
    closeSync(fd);
  }
}

/**
 * A clone's private /tmp, if its template's application had one: the
 * image's REDIR PATH of /tmp into its privateRoot, moved to the same place
 * under the clone's own (which inheritPrivateCopies fills with the
 * template's copy), unless the template's rules redirect /tmp
 * themselves.
 */
export function rebasedRedirs(image: { redirs: InstanceConfig['redirs']; privateRoot: string } | undefined, privateRoot: string, own: InstanceConfig['redirs']): InstanceConfig['redirs'] {
  const root = image?.privateRoot;
  if (!root) return [];
  return image.redirs
    .filter((r) => r.kind === 'path' && r.from === PRIVATE_TMP && r.to.startsWith(`${root}/`) && !own.some((o) => o.from === r.from))
    .map((r) => ({ kind: 'path' as const, from: r.from, to: privateRoot + r.to.slice(root.length) }));
}
