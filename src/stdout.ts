import { write } from 'node:fs';
import { Writable } from 'node:stream';
import { setImmediate as nextTurn, setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';

/**
 * What standard output is being used for. The CLI treats a reader that goes
 * away (EPIPE) as the end of a listing (`appshot ps | head`), but when
 * standard output carries an image (`snapshot -o -`), a reader gone means
 * the image was not delivered: the command must fail as any failed write
 * does, and give the application back, not exit 0.
 */
export const standardOutput = { carriesImage: false };

/**
 * A stream that writes all it is given to descriptor `fd` (standard
 * output: an image's tar stream), and never closes it.
 *
 * Not fs.createWriteStream: once process.stdout exists (the CLI's
 * main() listens on it) and fd 1 is a pipe or a socket, libuv has set
 * O_NONBLOCK on its open file description (so may whoever shares it).
 * A write to the full pipe then fails with EAGAIN, which fs.WriteStream
 * counts as "wrote nothing" and retries at once; the sixth time in a row
 * it gives up with an error without errno ("A system error occurred:
 * undefined returned undefined"). A reader a few microseconds slower
 * than that, as on a loaded machine, lost the image. Here a full pipe is
 * waited for, however long the reader takes: tried again at once a few
 * times, then after 1 ms, twice as long each time up to 20 ms (a
 * descriptor libuv does not own cannot be waited on from JavaScript). Any other failure is the
 * write's own (its message names the errno).
 */
export function descriptorWriter(fd: number): Writable {
  return new Writable({
    highWaterMark: 1 << 20,
    write(chunk: Buffer, _encoding, callback) {
      writeWhole(fd, chunk).then(() => callback(), callback);
    },
    writev(chunks, callback) {
      writeWhole(fd, Buffer.concat(chunks.map((c) => c.chunk as Buffer))).then(() => callback(), callback);
    },
  });
}

const writeSome = promisify(write);

async function writeWhole(fd: number, data: Buffer): Promise<void> {
  // Full pipes met in a row: a reader that keeps up has made room by the
  // next turn of the event loop or two (a whole millisecond per pipeful
  // would cost ~15% of a 5 MB stream to `| cat`); one that does not is
  // waited for with naps, not a spin.
  let full = 0;
  for (let done = 0; done < data.length; ) {
    try {
      done += (await writeSome(fd, data, done, data.length - done)).bytesWritten;
      full = 0;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e;
      if (++full <= 5) await nextTurn();
      else await sleep(Math.min(2 ** (full - 6), 20));
    }
  }
}
