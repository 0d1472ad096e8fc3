/* SHA-256 of sixteen messages at once, one in each 32-bit lane of AVX-512
 * registers: the same digests as any SHA-256 (FIPS 180-4), computed
 * side by side. The page file's chunks are independent messages of equal
 * length (a MiB), so that sixteen of them are hashed for about the price
 * of a few one at a time with the CPU's SHA instructions (see pages.c,
 * sums_main). Plain C; the caller checks sha256x16_available() first. */
#ifndef APPSHOT_SHA256X16_H
#define APPSHOT_SHA256X16_H

#include <stddef.h>
#include <stdint.h>

#define SHA256X16_LANES 16

/* The running state of sixteen hashes: word i of lane j at h[i][j]. */
typedef struct {
  uint32_t h[8][SHA256X16_LANES];
} sha256x16_state;

/* Whether this CPU runs the 16-lane code (AVX-512 F and BW), and it gave
 * the digests of a fixed set of messages that OpenSSL's SHA-256 gives
 * (checked once, on the first call). */
int sha256x16_available(void);

void sha256x16_init(sha256x16_state* s);

/* Hashes `blocks` 64-byte blocks of each lane's message: lane j's from
 * data[j] (every lane the same number; a lane not wanted may repeat
 * another's pointer). */
void sha256x16_update(sha256x16_state* s, const uint8_t* const data[SHA256X16_LANES], size_t blocks);

/* Ends each lane's message, whose length in all was `total` bytes (a
 * multiple of 64: every message given to update whole), and writes lane
 * j's digest to out + 32 * j for j < lanes. */
void sha256x16_final(sha256x16_state* s, uint64_t total, uint8_t* out, int lanes);

#endif
