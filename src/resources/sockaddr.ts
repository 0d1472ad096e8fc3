/**
 * struct sockaddr as the kernel gives and takes it (the addon passes raw
 * bytes), read into and written from the names an image records: a unix
 * path, "@" and an abstract name, or "" for unnamed; an IP and a port.
 */
import { isIP } from 'node:net';

export const AF_UNIX = 1;
export const AF_INET = 2;
export const AF_INET6 = 10;

export interface SockName {
  family: number;
  /** unix: path, "@name" (abstract) or ""; inet: the IP. */
  address: string;
  port: number;
}

/** Why a unix name cannot be recorded as a string, or undefined.
 * `relativeOk`: a relative path is recorded (with where it was bound:
 * socketfile.ts). */
export function unixNameProblem(raw: Buffer, relativeOk = false): string | undefined {
  const path = raw.subarray(2);
  if (!path.length) return undefined;
  const body = path[0] === 0 ? path.subarray(1) : path.subarray(0, path.indexOf(0) < 0 ? path.length : path.indexOf(0));
  if (body.includes(0)) return 'its abstract name holds a NUL byte';
  if (!Buffer.from(body.toString('utf8'), 'utf8').equals(body)) return 'its name is not UTF-8';
  if (path[0] !== 0 && body[0] !== 0x2f && !relativeOk) return `it is bound to the relative path ${body.toString('utf8')}`;
  return undefined;
}

export function parseSockaddr(raw: Buffer): SockName {
  const family = raw.length >= 2 ? raw.readUInt16LE(0) : 0;
  if (family === AF_UNIX) {
    const path = raw.subarray(2);
    if (!path.length) return { family, address: '', port: 0 };
    if (path[0] === 0) return { family, address: '@' + path.subarray(1).toString('utf8'), port: 0 };
    const end = path.indexOf(0);
    return { family, address: path.subarray(0, end < 0 ? path.length : end).toString('utf8'), port: 0 };
  }
  if (family === AF_INET) return { family, address: [...raw.subarray(4, 8)].join('.'), port: raw.readUInt16BE(2) };
  if (family === AF_INET6) {
    const groups: string[] = [];
    for (let i = 8; i < 24; i += 2) groups.push(raw.readUInt16BE(i).toString(16));
    return { family, address: compactIPv6(groups), port: raw.readUInt16BE(2) };
  }
  return { family, address: '', port: 0 };
}

function compactIPv6(groups: string[]): string {
  if (groups.slice(0, 5).every((g) => g === '0') && groups[5] === 'ffff') {
    const v4 = parseInt(groups[6], 16) * 65536 + parseInt(groups[7], 16);
    return `::ffff:${[v4 >>> 24, (v4 >>> 16) & 255, (v4 >>> 8) & 255, v4 & 255].join('.')}`;
  }
  // The longest run of zero groups becomes "::".
  let best = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    let j = i;
    while (j < 8 && groups[j] === '0') j++;
    if (j - i > bestLen) [best, bestLen] = [i, j - i];
    i = j === i ? i + 1 : j;
  }
  if (best < 0) return groups.join(':');
  return `${groups.slice(0, best).join(':')}::${groups.slice(best + bestLen).join(':')}`;
}

function ipv6Bytes(address: string): Buffer {
  const out = Buffer.alloc(16);
  let text = address;
  const v4 = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (v4) {
    const parts = v4[1].split('.').map(Number);
    const hex = ((parts[0] << 8) | parts[1]).toString(16) + ':' + ((parts[2] << 8) | parts[3]).toString(16);
    text = text.slice(0, -v4[1].length) + hex;
  }
  const [head, tail] = text.includes('::') ? text.split('::') : [text, undefined];
  const h = head ? head.split(':') : [];
  const t = tail ? tail.split(':') : [];
  const groups = tail === undefined ? h : [...h, ...Array(8 - h.length - t.length).fill('0'), ...t];
  groups.forEach((g, i) => out.writeUInt16BE(parseInt(g, 16), i * 2));
  return out;
}

export function makeSockaddr(n: SockName): Buffer {
  if (n.family === AF_UNIX) {
    if (!n.address) return Buffer.from([AF_UNIX, 0]);
    const body = n.address.startsWith('@') ? Buffer.concat([Buffer.from([0]), Buffer.from(n.address.slice(1), 'utf8')]) : Buffer.from(n.address, 'utf8');
    return Buffer.concat([Buffer.from([AF_UNIX, 0]), body]);
  }
  if (n.family === AF_INET) {
    const b = Buffer.alloc(16);
    b.writeUInt16LE(AF_INET, 0);
    b.writeUInt16BE(n.port, 2);
    Buffer.from((n.address || '0.0.0.0').split('.').map(Number)).copy(b, 4);
    return b;
  }
  const b = Buffer.alloc(28);
  b.writeUInt16LE(AF_INET6, 0);
  b.writeUInt16BE(n.port, 2);
  ipv6Bytes(n.address || '::').copy(b, 8);
  return b;
}

/** Whether `address` is an IP of `family` (an image's, before use). */
export function isAddressOf(family: number, address: string): boolean {
  return isIP(address) === (family === AF_INET ? 4 : 6);
}

/** The sun_path limit: 108 bytes, a path's terminating NUL included. */
export function unixNameFits(address: string): boolean {
  return Buffer.byteLength(address, 'utf8') <= (address.startsWith('@') ? 108 : 107);
}
