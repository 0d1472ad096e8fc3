/* The page file's chunk digests, two ways (pages.c, sums_main): OpenSSL's
 * SHA-256 one chunk at a time (SHA instructions where the CPU has them),
 * and addon/src/sha256x16.c's sixteen chunks side by side (AVX-512).
 *
 *   shalanes [ROUNDS]
 *
 * First checks that both give the same digests (random lengths, lanes at
 * random, unaligned offsets, a message fed in two parts), then times each
 * over 16 chunks of 1 MiB, read in slices of 64 KiB per lane as pages.c
 * does, and prints GB/s and the CPU time per 256 MiB. Needs libcrypto
 * (make -C bench bin/shalanes). */
#include "../addon/src/sha256x16.c"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define CHUNK (1u << 20)

static double cpu_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char** argv) {
  if (!sha256x16_available()) {
    puts("{\"available\":false}");
    return 1;
  }
  int rounds = argc > 1 ? atoi(argv[1]) : 16;
  uint8_t* buf = malloc((size_t)CHUNK * 16 + 64);
  if (!buf) return 1;
  srand(1);
  for (size_t i = 0; i < (size_t)CHUNK * 16 + 64; i++) buf[i] = (uint8_t)rand();
  for (int trial = 0; trial < 300; trial++) {
    size_t blocks = (size_t)(rand() % 70);
    const uint8_t *p[16], *q[16];
    for (int j = 0; j < 16; j++) p[j] = buf + (size_t)(rand() % (CHUNK * 15 / 64)) * 64 + (size_t)(rand() % 64);
    sha256x16_state s;
    sha256x16_init(&s);
    size_t first = blocks ? (size_t)rand() % blocks : 0;
    sha256x16_update(&s, p, first);
    for (int j = 0; j < 16; j++) q[j] = p[j] + first * 64;
    sha256x16_update(&s, q, blocks - first);
    uint8_t out[32 * 16], ref[32];
    sha256x16_final(&s, blocks * 64, out, 16);
    for (int j = 0; j < 16; j++) {
      unsigned int n = 0;
      EVP_Digest(p[j], blocks * 64, ref, &n, EVP_sha256(), NULL);
      if (memcmp(ref, out + 32 * j, 32)) {
        printf("{\"mismatch\":{\"trial\":%d,\"lane\":%d,\"blocks\":%zu}}\n", trial, j, blocks);
        return 1;
      }
    }
  }
  uint8_t out[32 * 16];
  double t0 = cpu_s();
  for (int r = 0; r < rounds; r++)
    for (int j = 0; j < 16; j++) {
      unsigned int n = 0;
      EVP_Digest(buf + (size_t)j * CHUNK, CHUNK, out + 32 * j, &n, EVP_sha256(), NULL);
    }
  double t1 = cpu_s();
  for (int r = 0; r < rounds; r++) {
    sha256x16_state s;
    sha256x16_init(&s);
    const uint8_t* p[16];
    for (size_t at = 0; at < CHUNK; at += CHUNK / 16) {
      for (int j = 0; j < 16; j++) p[j] = buf + (size_t)j * CHUNK + at;
      sha256x16_update(&s, p, CHUNK / 16 / 64);
    }
    sha256x16_final(&s, CHUNK, out, 16);
  }
  double t2 = cpu_s();
  double gb = rounds * 16.0 * CHUNK / 1e9, per = 268.435456 / (rounds * 16.0 * CHUNK / 1e6);
  printf("{\"openssl_GBps\":%.2f,\"lanes_GBps\":%.2f,\"openssl_ms_per_256MiB\":%.1f,\"lanes_ms_per_256MiB\":%.1f}\n",
         gb / (t1 - t0), gb / (t2 - t1), (t1 - t0) * 1e3 * per, (t2 - t1) * 1e3 * per);
  free(buf);
  return 0;
}
