/* SHA-256 (FIPS 180-4) of sixteen equal-length messages at once: each
 * 32-bit lane of a 512-bit register carries one message's working
 * variables, so that every instruction below advances sixteen hashes. The
 * compression function is the standard's, word for word; only the layout
 * is ours: a block of each lane is loaded as a row, byte-swapped to big
 * endian, and the 16 x 16 words transposed so that register t holds word
 * t of every lane. See sha256x16.h. Included by pages.c, whose unit it
 * is compiled in. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "sha256x16.h"

#include <pthread.h>
#include <string.h>

#include <openssl/evp.h>

#if defined(__x86_64__)
#include <immintrin.h>

#define SHA_TARGET __attribute__((target("avx512f,avx512bw")))

static const uint32_t sha_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

static const uint32_t sha_h0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                               0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

/* The ternary-logic tables: x ^ y ^ z, (x ? y : z), majority. */
#define SHA_XOR3 0x96
#define SHA_CH 0xca
#define SHA_MAJ 0xe8

#define SHA_ROR(x, n) _mm512_ror_epi32((x), (n))
#define SHA_TERN(x, y, z, f) _mm512_ternarylogic_epi32((x), (y), (z), (f))

/* Words t of the 16 lanes' current blocks, big-endian, one register each. */
SHA_TARGET static inline void sha_load_words(__m512i w[16], const uint8_t* const data[16], size_t off) {
  const __m512i swap = _mm512_set4_epi32(0x0c0d0e0f, 0x08090a0b, 0x04050607, 0x00010203);
  __m512i r[16], t[16];
  for (int j = 0; j < 16; j++) r[j] = _mm512_shuffle_epi8(_mm512_loadu_si512((const void*)(data[j] + off)), swap);
  /* Rows j (lane j's 16 words) into columns t: pairs of rows interleaved
   * by words, then by double words, then the 128-bit quarters of four
   * registers exchanged twice. */
  for (int g = 0; g < 4; g++) {
    __m512i a0 = _mm512_unpacklo_epi32(r[4 * g], r[4 * g + 1]);
    __m512i a1 = _mm512_unpackhi_epi32(r[4 * g], r[4 * g + 1]);
    __m512i a2 = _mm512_unpacklo_epi32(r[4 * g + 2], r[4 * g + 3]);
    __m512i a3 = _mm512_unpackhi_epi32(r[4 * g + 2], r[4 * g + 3]);
    /* t[4g + m], quarter k: rows 4g..4g+3 of word 4k + m. */
    t[4 * g + 0] = _mm512_unpacklo_epi64(a0, a2);
    t[4 * g + 1] = _mm512_unpackhi_epi64(a0, a2);
    t[4 * g + 2] = _mm512_unpacklo_epi64(a1, a3);
    t[4 * g + 3] = _mm512_unpackhi_epi64(a1, a3);
  }
  for (int m = 0; m < 4; m++) {
    __m512i x0 = _mm512_shuffle_i32x4(t[m], t[4 + m], 0x44);
    __m512i x1 = _mm512_shuffle_i32x4(t[m], t[4 + m], 0xee);
    __m512i x2 = _mm512_shuffle_i32x4(t[8 + m], t[12 + m], 0x44);
    __m512i x3 = _mm512_shuffle_i32x4(t[8 + m], t[12 + m], 0xee);
    w[m] = _mm512_shuffle_i32x4(x0, x2, 0x88);
    w[4 + m] = _mm512_shuffle_i32x4(x0, x2, 0xdd);
    w[8 + m] = _mm512_shuffle_i32x4(x1, x3, 0x88);
    w[12 + m] = _mm512_shuffle_i32x4(x1, x3, 0xdd);
  }
}

/* One round: the standard's T1 and T2, the eight variables named by
 * position so that no register moves (the caller rotates the names). */
#define SHA_ROUND(a, b, c, d, e, f, g, h, kw)                                                      \
  do {                                                                                         \
    __m512i t1 = _mm512_add_epi32(_mm512_add_epi32(h, SHA_TERN(SHA_ROR(e, 6), SHA_ROR(e, 11), SHA_ROR(e, 25), SHA_XOR3)), \
                                  _mm512_add_epi32(SHA_TERN(e, f, g, SHA_CH), kw));                   \
    __m512i t2 = _mm512_add_epi32(SHA_TERN(SHA_ROR(a, 2), SHA_ROR(a, 13), SHA_ROR(a, 22), SHA_XOR3), SHA_TERN(a, b, c, SHA_MAJ)); \
    d = _mm512_add_epi32(d, t1);                                                               \
    h = _mm512_add_epi32(t1, t2);                                                              \
  } while (0)

/* Message schedule word t (16 <= t < 64) in place of word t - 16. */
#define SHA_SCHEDULE(w, t)                                                                         \
  do {                                                                                         \
    __m512i x = w[((t) - 15) & 15], y = w[((t) - 2) & 15];                                     \
    __m512i s0 = SHA_TERN(SHA_ROR(x, 7), SHA_ROR(x, 18), _mm512_srli_epi32(x, 3), SHA_XOR3);                   \
    __m512i s1 = SHA_TERN(SHA_ROR(y, 17), SHA_ROR(y, 19), _mm512_srli_epi32(y, 10), SHA_XOR3);                 \
    w[(t) & 15] = _mm512_add_epi32(_mm512_add_epi32(w[(t) & 15], s0),                          \
                                   _mm512_add_epi32(w[((t) - 7) & 15], s1));                   \
  } while (0)

#define SHA_EIGHT(t0)                                                                              \
  SHA_ROUND(a, b, c, d, e, f, g, h, _mm512_add_epi32(_mm512_set1_epi32((int)sha_k[(t0) + 0]), w[((t0) + 0) & 15])); \
  SHA_ROUND(h, a, b, c, d, e, f, g, _mm512_add_epi32(_mm512_set1_epi32((int)sha_k[(t0) + 1]), w[((t0) + 1) & 15])); \
  SHA_ROUND(g, h, a, b, c, d, e, f, _mm512_add_epi32(_mm512_set1_epi32((int)sha_k[(t0) + 2]), w[((t0) + 2) & 15])); \
  SHA_ROUND(f, g, h, a, b, c, d, e, _mm512_add_epi32(_mm512_set1_epi32((int)sha_k[(t0) + 3]), w[((t0) + 3) & 15])); \
  SHA_ROUND(e, f, g, h, a, b, c, d, _mm512_add_epi32(_mm512_set1_epi32((int)sha_k[(t0) + 4]), w[((t0) + 4) & 15])); \
  SHA_ROUND(d, e, f, g, h, a, b, c, _mm512_add_epi32(_mm512_set1_epi32((int)sha_k[(t0) + 5]), w[((t0) + 5) & 15])); \
  SHA_ROUND(c, d, e, f, g, h, a, b, _mm512_add_epi32(_mm512_set1_epi32((int)sha_k[(t0) + 6]), w[((t0) + 6) & 15])); \
  SHA_ROUND(b, c, d, e, f, g, h, a, _mm512_add_epi32(_mm512_set1_epi32((int)sha_k[(t0) + 7]), w[((t0) + 7) & 15]))

#define SHA_SCHEDULE8(t0)                                                                          \
  SHA_SCHEDULE(w, (t0) + 0);                                                                       \
  SHA_SCHEDULE(w, (t0) + 1);                                                                       \
  SHA_SCHEDULE(w, (t0) + 2);                                                                       \
  SHA_SCHEDULE(w, (t0) + 3);                                                                       \
  SHA_SCHEDULE(w, (t0) + 4);                                                                       \
  SHA_SCHEDULE(w, (t0) + 5);                                                                       \
  SHA_SCHEDULE(w, (t0) + 6);                                                                       \
  SHA_SCHEDULE(w, (t0) + 7)

SHA_TARGET static void sha_blocks_avx512(sha256x16_state* s, const uint8_t* const data[16], size_t blocks) {
  __m512i a = _mm512_loadu_si512(s->h[0]), b = _mm512_loadu_si512(s->h[1]);
  __m512i c = _mm512_loadu_si512(s->h[2]), d = _mm512_loadu_si512(s->h[3]);
  __m512i e = _mm512_loadu_si512(s->h[4]), f = _mm512_loadu_si512(s->h[5]);
  __m512i g = _mm512_loadu_si512(s->h[6]), h = _mm512_loadu_si512(s->h[7]);
  for (size_t n = 0; n < blocks; n++) {
    __m512i w[16];
    sha_load_words(w, data, n * 64);
    __m512i a0 = a, b0 = b, c0 = c, d0 = d, e0 = e, f0 = f, g0 = g, h0 = h;
    SHA_EIGHT(0);
    SHA_EIGHT(8);
    SHA_SCHEDULE8(16);
    SHA_EIGHT(16);
    SHA_SCHEDULE8(24);
    SHA_EIGHT(24);
    SHA_SCHEDULE8(32);
    SHA_EIGHT(32);
    SHA_SCHEDULE8(40);
    SHA_EIGHT(40);
    SHA_SCHEDULE8(48);
    SHA_EIGHT(48);
    SHA_SCHEDULE8(56);
    SHA_EIGHT(56);
    a = _mm512_add_epi32(a, a0);
    b = _mm512_add_epi32(b, b0);
    c = _mm512_add_epi32(c, c0);
    d = _mm512_add_epi32(d, d0);
    e = _mm512_add_epi32(e, e0);
    f = _mm512_add_epi32(f, f0);
    g = _mm512_add_epi32(g, g0);
    h = _mm512_add_epi32(h, h0);
  }
  _mm512_storeu_si512(s->h[0], a);
  _mm512_storeu_si512(s->h[1], b);
  _mm512_storeu_si512(s->h[2], c);
  _mm512_storeu_si512(s->h[3], d);
  _mm512_storeu_si512(s->h[4], e);
  _mm512_storeu_si512(s->h[5], f);
  _mm512_storeu_si512(s->h[6], g);
  _mm512_storeu_si512(s->h[7], h);
}

void sha256x16_init(sha256x16_state* s) {
  for (int i = 0; i < 8; i++)
    for (int j = 0; j < SHA256X16_LANES; j++) s->h[i][j] = sha_h0[i];
}

void sha256x16_update(sha256x16_state* s, const uint8_t* const data[SHA256X16_LANES], size_t blocks) {
  if (blocks) sha_blocks_avx512(s, data, blocks);
}

void sha256x16_final(sha256x16_state* s, uint64_t total, uint8_t* out, int lanes) {
  /* The padding of a message of whole blocks is one block of its own: the
   * bit 1, zeros, and the length in bits, big-endian; the same for every
   * lane. */
  uint8_t pad[64] = {0x80};
  uint64_t bits = total * 8;
  for (int i = 0; i < 8; i++) pad[63 - i] = (uint8_t)(bits >> (8 * i));
  const uint8_t* p[SHA256X16_LANES];
  for (int j = 0; j < SHA256X16_LANES; j++) p[j] = pad;
  sha_blocks_avx512(s, p, 1);
  for (int j = 0; j < lanes && j < SHA256X16_LANES; j++)
    for (int i = 0; i < 8; i++) {
      uint32_t v = s->h[i][j];
      out[32 * j + 4 * i] = (uint8_t)(v >> 24);
      out[32 * j + 4 * i + 1] = (uint8_t)(v >> 16);
      out[32 * j + 4 * i + 2] = (uint8_t)(v >> 8);
      out[32 * j + 4 * i + 3] = (uint8_t)v;
    }
}

/* Sixteen different messages of each of a few lengths (0 to 9 blocks),
 * hashed here and by OpenSSL: any difference and the 16-lane code is not
 * used. Each is hashed three ways: given to one update; given to two (the
 * second part from another buffer, as the page file's chunks are fed a
 * slice at a time); and with only the first 5 lanes used, the others
 * repeating lane 0's pointer, whose digests must not be written. */
static int sha_lanes_self_test(void) {
  static const size_t lengths[] = {0, 1, 2, 9};
  static uint8_t msg[16][9 * 64], tail[16][9 * 64];
  for (size_t l = 0; l < sizeof lengths / sizeof *lengths; l++) {
    size_t blocks = lengths[l];
    for (int j = 0; j < 16; j++)
      for (size_t i = 0; i < sizeof msg[j]; i++) msg[j][i] = (uint8_t)(i * 131 + (size_t)j * 7 + (i >> 6) + l);
    uint8_t theirs[16][32];
    for (int j = 0; j < 16; j++) {
      unsigned int n = 0;
      if (EVP_Digest(msg[j], blocks * 64, theirs[j], &n, EVP_sha256(), NULL) != 1 || n != 32) return 0;
    }
    for (int way = 0; way < 3; way++) {
      int lanes = way == 2 ? 5 : 16;
      size_t first = way == 1 ? blocks / 2 : blocks;
      const uint8_t* p[16];
      for (int j = 0; j < 16; j++) p[j] = j < lanes ? msg[j] : msg[0];
      sha256x16_state s;
      sha256x16_init(&s);
      sha256x16_update(&s, p, first);
      if (first < blocks) {
        for (int j = 0; j < 16; j++) {
          memcpy(tail[j], msg[j] + first * 64, (blocks - first) * 64);
          p[j] = tail[j];
        }
        sha256x16_update(&s, p, blocks - first);
      }
      uint8_t mine[32 * 16];
      memset(mine, 0xa5, sizeof mine);
      sha256x16_final(&s, blocks * 64, mine, lanes);
      for (int j = 0; j < lanes; j++)
        if (memcmp(mine + 32 * j, theirs[j], 32)) return 0;
      for (size_t i = 32 * (size_t)lanes; i < sizeof mine; i++)
        if (mine[i] != 0xa5) return 0;
    }
  }
  return 1;
}

#undef SHA_TARGET
#undef SHA_XOR3
#undef SHA_CH
#undef SHA_MAJ
#undef SHA_ROR
#undef SHA_TERN
#undef SHA_ROUND
#undef SHA_SCHEDULE
#undef SHA_EIGHT
#undef SHA_SCHEDULE8

static int sha_lanes_usable;
static pthread_once_t sha_lanes_checked = PTHREAD_ONCE_INIT;

static void sha_lanes_check(void) {
  __builtin_cpu_init();
  sha_lanes_usable = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && sha_lanes_self_test();
}

int sha256x16_available(void) {
  pthread_once(&sha_lanes_checked, sha_lanes_check);
  return sha_lanes_usable;
}

#else

int sha256x16_available(void) { return 0; }
void sha256x16_init(sha256x16_state* s) { (void)s; }
void sha256x16_update(sha256x16_state* s, const uint8_t* const data[SHA256X16_LANES], size_t blocks) {
  (void)s;
  (void)data;
  (void)blocks;
}
void sha256x16_final(sha256x16_state* s, uint64_t total, uint8_t* out, int lanes) {
  (void)s;
  (void)total;
  (void)out;
  (void)lanes;
}

#endif
