/**
 * What standard output is being used for. The CLI treats a reader that goes
 * away (EPIPE) as the end of a listing (`appshot ps | head`), but when
 * standard output carries an image (`snapshot -o -`), a reader gone means
 * the image was not delivered: the command must fail as any failed write
 * does, and give the application back, not exit 0.
 */
export const standardOutput = { carriesImage: false };
