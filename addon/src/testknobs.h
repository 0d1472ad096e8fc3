/* The test knobs' gate, one for every part of the addon that has knobs
 * (pages.c's check, fsident's mount id): testknobs.c says why. */
#ifndef APPSHOT_TESTKNOBS_H
#define APPSHOT_TESTKNOBS_H

#ifdef __cplusplus
extern "C" {
#endif

/* A test knob's value (getenv), or NULL unless this process was started
 * with APPSHOT_TEST_KNOBS=1 in its own environment. Asked on the
 * process's own threads (getenv is read as the variable is now). */
const char* appshot_test_knob(const char* name);

#ifdef __cplusplus
}
#endif

#endif
