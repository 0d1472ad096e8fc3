/*
 * A copy of the tracer's batch code (appshot_batch.h) in the library's
 * text, and an area for its tables in the library's .bss: a snapshot runs
 * its questions to a frozen process from here, in one stop per thread,
 * instead of mapping an executable scratch area in the process first and
 * unmapping it after (an injected call each, two stops each). Nothing in
 * the library runs or touches either; the tracer checks the code's bytes
 * against its own before it runs them (src/ptrace/remote.ts).
 */
#include "appshot_batch.h"

__asm__(".pushsection .text\n"
        APPSHOT_BATCH_CODE("appshot_resident_batch_code", "appshot_resident_batch_stopped", "appshot_resident_batch_trapped",
                           "appshot_resident_batch_end")
        ".popsection\n");

__attribute__((visibility("default"), used, aligned(4096))) unsigned char appshot_batch_area[APPSHOT_BATCH_AREA_SIZE];
__attribute__((visibility("default"), used)) const unsigned long appshot_batch_area_size = APPSHOT_BATCH_AREA_SIZE;
