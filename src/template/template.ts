/**
 * Snapshot virtual templates (FIG. 7 and 8): an image, kept exactly as it
 * was taken (references in their pre-customized form), plus template.pb:
 * the rules and each resource's verdict, which say how a clone handles it.
 *
 * A template is a directory: the image's three parts (hard links to the
 * snapshot's where the filesystem allows, so making one costs no copy) and
 * template.pb. It is still an image: `appshot restore` brings back the
 * template's own application.
 */
import { uniqueTag } from '../holder.js';
import { copyFileSync, existsSync, fstatSync, linkSync, lstatSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { AppshotError, ExitCode } from '../errors.js';
import { decodeTemplate, digestBuffer, encodeImage, encodeSignedManifest, encodeTemplate, isOwnSnapshot, type LoadedImage, loadImage, notOwnSnapshot, PARTS, readSmallPart, signTemplate, templateSigner } from '../image/format.js';
import { makePartialDir } from '../image/partial.js';
import { imagesTrustedExplicitly, isOwnKey, untrustedHint } from '../image/trust.js';
import type { Action, Rules, Template, Verdict } from '../image/types.js';
import { type SharedState, sharedState } from '../resources/identity.js';
import { classify, refusals, type UnmatchedRule, unmatchedRules } from './classify.js';
import { loadRules, parseRules, type RulesFile } from './rules.js';
import { cachedTemplate } from './cache.js';
import type { ByteProgress } from '../progress.js';
import { defaultHome, isPrivateRoot } from '../registry.js';
import { copyPrivately } from './copies.js';

export const TEMPLATE_PART = 'template.pb';
/** A template made of a clone: that clone's private copies, as they were
 * when the template was made (its files under copy-on-write and duplicate
 * rules hold what it wrote). Laid out as below a private root. */
export const PRIVATE_DIR = 'private';
const TEMPLATE_MAGIC = 'appshot-template';

export interface CreateOptions {
  /** A rules file to classify with, instead of the rules the application
   * ran under. */
  rules?: string;
  name?: string;
  /** Told the snapshot's page data checked, as it is (progress.ts). */
  progress?: ByteProgress;
  /** Ctrl-C: heard while the snapshot is checked (the long part) and
   * before anything is written; once the template is being written it is
   * made whole. */
  signal?: AbortSignal;
}

/** The one line an interrupted `template create` ends with. */
export const TEMPLATE_INTERRUPTED = 'interrupted: no template was made, the snapshot is as it was';

export interface TemplateSummary {
  template: string;
  name: string;
  imageId: string;
  rules?: string;
  /** How many resources each action handles. */
  actions: Partial<Record<Action, number>>;
  verdicts: Verdict[];
  /** What every clone would share with the others and the template, and
   * what the rules do about it (resources/identity.ts). */
  shared: SharedState[];
  /** template create: the resource rules that decided nothing for this
   * snapshot (classify.ts, unmatchedRules). */
  unmatched?: UnmatchedRule[];
  /** The IDENTITY hooks every clone runs, as written ("SIGNAL SIGUSR2",
   * "EXEC /bin/sh -c ..."): what a template made of an image's own rules
   * (template create --trust-image) would run is shown before any clone
   * runs it (fuzz33 H2). */
  hooks: string[];
}

export function summarize(path: string, t: Template, shared: SharedState[]): TemplateSummary {
  const actions: Partial<Record<Action, number>> = {};
  for (const v of t.verdicts) actions[v.action] = (actions[v.action] ?? 0) + 1;
  const hooks = t.rules?.text ? parseRules(t.rules.text, t.rules.source).identity.hooks.map((h) => (h.kind === 'signal' ? `SIGNAL ${h.name}` : `EXEC ${h.argv.join(' ')}`)) : [];
  return { template: path, name: t.name, imageId: t.imageId, rules: t.rules?.source, actions, verdicts: t.verdicts, shared, hooks };
}

/** The rules a template is made with: a file given now, else those the
 * application ran under (kept in the image). */
function chooseRules(image: LoadedImage['image'], rulesPath: string | undefined): { parsed?: RulesFile; kept?: Rules } {
  if (rulesPath) {
    const parsed = loadRules(rulesPath);
    return { parsed, kept: { source: basename(rulesPath), text: parsed.text } };
  }
  if (image.rules?.text) return { parsed: parseRules(image.rules.text, image.rules.source), kept: image.rules };
  return {};
}

/** A hard link where the filesystem allows (the image's parts are never
 * written again), else a copy. */
function linkOrCopy(from: string, to: string): void {
  try {
    linkSync(from, to);
  } catch {
    copyFileSync(from, to);
  }
}

/** The page file that was checked (`checkedFd`, held open since), linked
 * or copied to `to`. Linked by its path, the link must be that very file:
 * the path may name another by now, which a clone, checking only its
 * size, would map unread under this node's signature. Copied, it is
 * copied from the descriptor. */
function linkOrCopyChecked(from: string, to: string, checkedFd: number): void {
  try {
    linkSync(from, to);
  } catch {
    copyFileSync(`/proc/self/fd/${checkedFd}`, to);
    return;
  }
  const linked = statSync(to);
  const checked = fstatSync(checkedFd);
  if (linked.dev !== checked.dev || linked.ino !== checked.ino) {
    rmSync(to, { force: true });
    throw new AppshotError(`${from} changed since it was checked (replaced): make the template again`);
  }
}

export async function createTemplate(imagePath: string, output: string, opts: CreateOptions): Promise<TemplateSummary> {
  const dest = resolve(output);
  if (existsSync(dest)) throw new AppshotError(`${output} already exists`, ExitCode.conflict);
  if (!existsSync(dirname(dest))) throw new AppshotError(`no such directory: ${dirname(output)}`, ExitCode.notFound);
  let size = 0;
  let checked = 0;
  const progress = opts.progress;
  const interrupted = () => new AppshotError(TEMPLATE_INTERRUPTED, ExitCode.interrupted);
  const loaded = await loadImage(imagePath, {
    // The page file checked stays open: the template gets that file.
    holdPages: true,
    onPagesSize: (n) => progress?.bytes(checked, (size = n)),
    onBytes: (n) => progress?.bytes((checked += n), size),
    signal: opts.signal,
  }).catch((e) => {
    throw opts.signal?.aborted ? interrupted() : e;
  });
  try {
    // A turn of the event loop: a Ctrl-C that came as the last bytes were
    // checked is heard before anything is written.
    if (opts.signal) await new Promise((resolve) => setImmediate(resolve));
    if (opts.signal?.aborted) throw interrupted();
    const { image, manifest } = loaded;
    if (image.parent)
      throw new AppshotError(
        `${imagePath} is an incremental snapshot (its parent is ${image.parent.path}); make templates from a full one (appshot snapshot --full)`,
        ExitCode.usage,
      );
    const { parsed, kept } = chooseRules(image, opts.rules);
    // The verdicts made while the application ran stand, unless other
    // rules are given now.
    const verdicts = opts.rules || !image.verdicts.length ? classify(image, parsed) : image.verdicts;
    const refused = refusals(image, verdicts, parsed);
    if (refused.length)
      // One line, as every refusal (printable would show a newline as \n).
      throw new AppshotError(`cannot make a template of ${imagePath}: ${refused.length === 1 ? refused[0] : `${refused.length} resources: ${refused.join('; ')}`}`);
    const name = opts.name ?? basename(dest).replace(/\.[^.]*$/, '');
    // Signed with this node's key, as is a new manifest for the parts: the
    // image was verified (and trusted) just now, and the template vouches
    // for what it verified, whoever signed the snapshot.
    const template = signTemplate({ magic: TEMPLATE_MAGIC, name, created: new Date().toISOString(), imageId: manifest.imageId, rules: kept, verdicts, signature: Buffer.alloc(0), keyId: '', snapshotWordChecked: true });
    // Built under a hidden name and renamed into place: no half-made
    // template is ever seen under the name asked for.
    const journal = makePartialDir(join(dirname(dest), `.${basename(dest)}.partial-${uniqueTag()}`));
    const partial = journal.path;
    try {
      // This node's key signs the template's manifest whoever signed the
      // image: an image.pb that says a snapshot wrote it (fromSnapshot), and
      // whose word is not this node's own (isOwnSnapshot: a file its
      // processes held past a drop of privileges), loses that word here.
      let digests = loaded.digests;
      if (loaded.image.fromSnapshot && !isOwnSnapshot(loaded.image)) {
        const unsaid = encodeImage({ ...loaded.image, fromSnapshot: undefined });
        writeFileSync(join(partial, PARTS.image), unsaid, { mode: 0o600 });
        digests = new Map(digests).set(PARTS.image, digestBuffer(unsaid));
      } else linkOrCopy(join(loaded.dir, PARTS.image), join(partial, PARTS.image));
      linkOrCopyChecked(join(loaded.dir, PARTS.pages), join(partial, PARTS.pages), loaded.pagesFd!);
      writeFileSync(join(partial, PARTS.manifest), encodeSignedManifest(manifest.imageId, digests, loaded.image), { mode: 0o600 });
      // A clone's private copies, if its rules give it any (one without
      // copy-on-write or duplicate rules never has the directory).
      const privateRoot = image.instance?.privateRoot;
      // An image may name any directory: only a clone's own of this state
      // directory is copied into the template (and so into every clone);
      // not one of another user's (fuzz33 M2), whatever its shape.
      if (privateRoot && !isPrivateRoot(defaultHome(), privateRoot))
        throw new AppshotError(`corrupt image: ${imagePath} names ${JSON.stringify(privateRoot)} as a clone's private copies, which is not a directory of them`);
      const hasCopies = !!privateRoot && (image.instance?.redirs ?? []).some((r) => r.to.startsWith(`${privateRoot}/`));
      if (privateRoot && (hasCopies || existsSync(privateRoot))) {
        if (!existsSync(privateRoot))
          throw new AppshotError(`${imagePath} is of a clone whose private copies are gone (${privateRoot}): what it wrote to its files cannot be templated`);
        // As they are, owners kept, no set-id bit (copies.ts): root's copy
        // of a nobody application's 4755 file would be root's set-user-ID
        // program in every clone.
        copyPrivately(privateRoot, join(partial, PRIVATE_DIR), "the clone's private copy");
      }
      // Explicitly as the manifest beside it, whatever the umask: the
      // rules (hooks included) are in it (fuzz33 L8: 0666 under umask 0).
      writeFileSync(join(partial, TEMPLATE_PART), encodeTemplate(template), { mode: 0o600 });
      renameSync(partial, dest);
    } catch (e) {
      rmSync(partial, { recursive: true, force: true });
      throw e;
    } finally {
      journal.done();
    }
    return { ...summarize(dest, template, sharedState(image, parsed)), unmatched: unmatchedRules(parsed, verdicts) };
  } finally {
    loaded.dispose();
  }
}

export interface OpenedTemplate {
  path: string;
  template: Template;
  loaded: LoadedImage;
  rules?: RulesFile;
}

const ACTIONS = new Set<string>(['share', 'copy-on-write', 'duplicate', 'virtualize', 'multiplex', 'allocate', 'recreate']);

/** The actions each kind of resource (by its reference's prefix) can be
 * given, as classify.ts gives them (fuzz33 L4: `allocate` on a process,
 * `multiplex` on memory were taken; a SysV segment's mapping is virtualized with it). */
const ACTIONS_FOR_REF: Record<string, ReadonlySet<string>> = {
  pid: new Set(['virtualize']),
  vma: new Set(['share', 'copy-on-write', 'duplicate', 'recreate', 'virtualize']),
  fd: new Set(['share', 'copy-on-write', 'duplicate', 'recreate', 'multiplex', 'allocate']),
  port: new Set(['multiplex', 'allocate']),
  pipe: new Set(['duplicate', 'recreate']),
  sem: new Set(['virtualize']),
  shm: new Set(['virtualize']),
  msg: new Set(['virtualize']),
  env: new Set(['duplicate']),
};

/** How many allocated ports an instance's port table holds (APPSHOT_IPC_CAPACITY in
 * addon/include/appshot_table.h, which every table but the PID one has). */
const PORT_VERDICTS = 2048;

/** The verdicts a clone acts on: known actions, each for a kind of
 * resource it applies to, one per resource, ports that are ports. */
function checkVerdicts(verdicts: Verdict[], toAct: boolean): void {
  const seen = new Set<string>();
  let ports = 0;
  for (const v of verdicts) {
    if (!ACTIONS.has(v.action)) throw new AppshotError(`corrupt template: resource ${v.ref} has action '${v.action}'`);
    const port = /^port:(.*)$/.exec(v.ref)?.[1];
    if (port !== undefined && !(/^\d+$/.test(port) && Number(port) >= 1 && Number(port) <= 65535)) throw new AppshotError(`corrupt template: '${v.ref}' is not a port`);
    // What follows matters to a clone, which acts on them; `template
    // show` shows them as they are (a changed template included).
    if (!toAct) continue;
    const kind = v.ref.slice(0, v.ref.indexOf(':'));
    const allowed = Object.hasOwn(ACTIONS_FOR_REF, kind) ? ACTIONS_FOR_REF[kind] : undefined;
    if (!allowed) throw new AppshotError(`corrupt template: ${JSON.stringify(v.ref)} names no kind of resource`);
    if (!allowed.has(v.action)) throw new AppshotError(`corrupt template: resource ${v.ref} has action '${v.action}', which does not apply to it`);
    if (seen.has(v.ref)) throw new AppshotError(`corrupt template: resource ${v.ref} has more than one verdict`);
    seen.add(v.ref);
    // (A multiplexed port is the same number inside and out: no entry.)
    if (kind === 'port' && v.action === 'allocate' && ++ports > PORT_VERDICTS) throw new AppshotError(`corrupt template: more than ${PORT_VERDICTS} allocated ports, which an instance's port table cannot hold`);
  }
}

/** A clone takes template.pb as the image's parts are taken (format.ts
 * checkOnlyOwnerCanChange): its owner's or root's, writable by no one
 * else, who could change its rules between template create and a clone
 * vouched for with --trust-image (fuzz33 L8). A missing one is reported
 * where it is read. */
function checkTemplateOwner(path: string): void {
  let st;
  try {
    st = lstatSync(path);
  } catch {
    return;
  }
  const uid = process.geteuid?.() ?? 0;
  if (st.uid !== uid && st.uid !== 0) throw new AppshotError(`${path} belongs to uid ${st.uid}, who could change its rules: copy the template to a directory of your own`);
  if (st.mode & 0o022 && !st.isSymbolicLink()) throw new AppshotError(`${path} is writable by others, who could change its rules: chmod go-w ${path}`);
}

/** template.pb holds rules and verdicts: a few KiB, a few MiB at most. */
const TEMPLATE_CEILING = 16 * 1024 * 1024;

/** Opens a template: its image verified (checksums, format; the page file's
 * only with `verify`, as it was when the template was made) and its
 * template.pb read. With trust 'require' (clone), both must be signed by a
 * trusted key, or trusted explicitly; 'report' (template show) only reads.
 * The caller disposes of `loaded`. */
export async function openTemplate(path: string, verify = true, trust: 'require' | 'report' = 'require'): Promise<OpenedTemplate> {
  if (!existsSync(path)) throw new AppshotError(`no such template: ${path}`, ExitCode.notFound);
  if (!existsSync(join(path, TEMPLATE_PART)))
    throw new AppshotError(`not a template: ${path} (no ${TEMPLATE_PART}; make one with appshot template create)`, ExitCode.notFound);
  // In the engine, a template opened before and unchanged since is not
  // read again (cache.ts); --verify always reads it whole.
  if (!verify) return cachedTemplate(path, PARTS.manifest, `${trust}:${imagesTrustedExplicitly()}`, () => openTemplateNow(path, verify, trust));
  return openTemplateNow(path, verify, trust);
}

async function openTemplateNow(path: string, verify: boolean, trust: 'require' | 'report'): Promise<OpenedTemplate> {
  const loaded = await loadImage(path, { sizeOnly: !verify, trust });
  try {
    if (trust === 'require') checkTemplateOwner(join(path, TEMPLATE_PART));
    const template = decodeTemplate(readSmallPart(path, TEMPLATE_PART, TEMPLATE_CEILING));
    if (template.magic !== TEMPLATE_MAGIC) throw new AppshotError(`not a template: ${path}`);
    const signer = templateSigner(template);
    if (!signer.trusted && trust === 'require' && !imagesTrustedExplicitly())
      throw new AppshotError(`${path} is not a template this node trusts: its ${TEMPLATE_PART} ${signer.problem?.replace(/^it(s)? /, '')}; ${untrustedHint}`);
    if (template.imageId !== loaded.manifest.imageId)
      throw new AppshotError(`corrupt template: ${TEMPLATE_PART} was made for another image than the one beside it`);
    checkVerdicts(template.verdicts, trust === 'require');
    // An older template create linked any image.pb as it was, whatever it
    // said: its image's word that a snapshot of ours wrote it is taken
    // only from a template.pb of this node's that says it was checked.
    if (!template.snapshotWordChecked || !signer.trusted || !isOwnKey(signer.trusted)) notOwnSnapshot(loaded.image);
    const rules = template.rules?.text ? parseRules(template.rules.text, template.rules.source) : undefined;
    return { path: resolve(path), template, loaded, rules };
  } catch (e) {
    loaded.dispose();
    throw e;
  }
}
